// Live reconfiguration of the storage systems one `up` process runs, from a new YAML: what
// `blockmirror apply` (through the admin API) and SIGHUP (`up` reads its file again) call.
//
//   1. parse and check the new YAML as `up` would (a ConfigError names line and column);
//   2. plan every storage system of this process (controller/reconfigure.ts): a refusal there
//      stops everything before anything is applied;
//   3. dry run: return the plan. Otherwise run all the steps of all the storage systems as one
//      list, so a failure in the second one undoes the first one too;
//   4. the process runs the new YAML from now on: the etcd tables follow (agent.reconfigured),
//      and the YAML is written to the file `up` was started with, so a restart keeps it.
//
// Applies are serialized: a SIGHUP during an apply waits for it.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { planChanges, ReconfigureRefused, runSteps, type Step } from '../controller/reconfigure.js';
import { PHASE } from '../controller/remote-membership.js';
import type { StorageSystem } from '../controller/storage-system.js';
import { ClusterError, specFor } from './cluster.js';
import { parseConfig, type ClusterConfig } from './config.js';
import { atomicWrite } from '../controller/pair-files.js';

export interface ApplyResult {
  /** One line per change, in the order applied; empty when the YAML changes nothing here. */
  changes: string[];
  /** What the operator must do besides (a storage system new in the YAML must be started). */
  notes: string[];
  applied: boolean;
}

export class ClusterReconfigurer {
  private lock: Promise<unknown> = Promise.resolve();
  /** The YAML running now: the file as `up` read it, then each applied text. */
  private text: string;

  constructor(
    private config: ClusterConfig,
    /** The file `up` was started with: read on SIGHUP, written after each apply. */
    readonly file: string,
    private readonly systems: StorageSystem[],
    private readonly log: Logger,
    private readonly onApplied: (config: ClusterConfig) => Promise<void> = async () => {},
  ) {
    this.text = fs.readFileSync(file, 'utf8');
  }

  get current(): ClusterConfig {
    return this.config;
  }

  /** The YAML this process runs now. */
  currentText(): string {
    return this.text;
  }

  /** Apply YAML text (or, without, the file again: SIGHUP). Serialized with other applies. */
  apply(text: string | undefined, opts: { dryRun: boolean }): Promise<ApplyResult> {
    const run = this.lock.catch(() => {}).then(() => this.applyNow(text ?? fs.readFileSync(this.file, 'utf8'), opts));
    this.lock = run;
    return run;
  }

  private async applyNow(text: string, opts: { dryRun: boolean }): Promise<ApplyResult> {
    // Relative paths mean what they would mean on a restart: relative to our own file.
    const next = parseConfig(text, this.file, path.dirname(path.resolve(this.file)));
    // The CFS server and its clients took the pairs' copies at start (docs/cfs.md).
    if (cfsLayout(this.config) !== cfsLayout(next)) {
      throw new ReconfigureRefused('the cfs: section and the copies of the pairs it keeps files on cannot change at run time; restart the storage systems with the new YAML');
    }
    const steps: Step[] = [];
    for (const ss of this.systems) {
      if (!next.storageSystems.some((s) => s.id === ss.spec.id)) {
        throw new ReconfigureRefused(`storage system ${ss.spec.id} runs here but is not in the new YAML: stop its process to remove it, then apply`);
      }
      let spec;
      try {
        spec = specFor(next, ss.spec.id);
      } catch (e) {
        if (e instanceof ClusterError) throw new ReconfigureRefused(e.message, { cause: e });
        throw e;
      }
      steps.push(...(await planChanges(ss, spec)));
    }
    const fresh = next.storageSystems.filter((s) => !this.config.storageSystems.some((o) => o.id === s.id));
    const notes = fresh.map((s) => `storage system ${s.id} is new: start it on its host with blockmirror up -c FILE --only ${s.id}`);
    // Across the storage systems of this process: a new mirror's side before its master, a master before a leaving mirror.
    const ordered = steps.map((s, i) => [s, i] as const).sort(([a, i], [b, j]) => (a.phase ?? PHASE.local) - (b.phase ?? PHASE.local) || i - j).map(([s]) => s);
    const changes = ordered.map((s) => s.line).filter((l) => l !== '');
    if (opts.dryRun) return { changes, notes, applied: false };
    if (ordered.length > 0) await runSteps(ordered, this.log);
    this.config = next;
    this.text = text;
    try {
      await this.onApplied(next);
    } catch (e) {
      this.log.error({ err: (e as Error).message }, `the new configuration runs, but the cluster tables could not follow: ${(e as Error).message}`);
    }
    if (fs.readFileSync(this.file, 'utf8') !== text) atomicWrite(this.file, text.replace(/\n$/, ''));
    if (changes.length > 0) this.log.info({ changes: changes.length }, `configuration applied: ${changes.length} change(s)`);
    return { changes, notes, applied: true };
  }
}

/** What the CFS depends on: its section, and the copies of its pairs. */
function cfsLayout(c: ClusterConfig): string {
  if (!c.cfs) return '';
  const pairs = c.pairs.filter((p) => c.cfs!.pairs.includes(p.name)).map((p) => [p.name, p.mode, p.master, p.mirrors]);
  return JSON.stringify([c.cfs, pairs]);
}
