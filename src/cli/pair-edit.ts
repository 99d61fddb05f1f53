// `blockmirror pair create|delete NAME -c FILE`: add a pair to the YAML or take one out, apply
// that to the running storage systems (apply.ts: plan, all or nothing), then write FILE. The YAML
// is the record: a restart of `up` keeps the pair (and each `up` writes its own file as well).
// The file is edited as a document, so its comments and layout stay. YAML, the configuration's
// checks and apply.ts are loaded when one of these runs: `pair split` and the like, whose module
// registers these, must not pay for them at start-up.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import type { Document, YAMLMap } from 'yaml';
import { atomicWrite } from '../util/atomic-write.js';
import { UsageError } from './errors.js';
import { parseTimeout } from './status.js';

interface EditOptions {
  config: string;
  dryRun?: boolean;
  wait?: boolean;
  timeout: string;
}

interface CreateOptions extends EditOptions {
  master: string;
  mirror: string[];
  mode: string;
  syncRate?: string;
  fence?: string;
}

/** "1:5" -> { ss: 1, vol: 5 } */
export function parseVolRef(text: string, option: string): { ss: number; vol: number } {
  const m = /^(\d+):(\d+)$/.exec(text.trim());
  if (!m || Number(m[1]) < 1 || Number(m[2]) < 1) throw new UsageError(`${option}: expected SS:VOL, e.g. 1:5 (storage system 1, volume 5), got "${text}"`);
  return { ss: Number(m[1]), vol: Number(m[2]) };
}

export function registerPairEditCommands(pair: Command): void {
  pair
    .command('create <name>')
    .description('add a pair to the YAML and to the running storage systems: its mirrors copy the master whole, then it is in PAIR')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML); written once the pair runs')
    .requiredOption('--master <ss:vol>', 'the master volume, e.g. 1:5')
    .option('--mirror <ss:vol>', 'a mirror volume (repeat for more), e.g. 1:6', (v: string, all: string[]) => [...all, v], [] as string[])
    .option('--mode <mode>', 'sync or async', 'sync')
    .option('--sync-rate <rate>', 'sync daemon limit, e.g. 100MiB')
    .option('--fence <level>', 'never or data (sync pairs)')
    .option('--dry-run', 'print the plan only')
    .option('--wait', 'wait until the full copy is done (PAIR)')
    .option('--timeout <ms>', 'how long to wait for each storage system', '60000')
    .allowExcessArguments(false)
    .action(async (name: string, opts: CreateOptions) => {
      const master = parseVolRef(opts.master, '--master');
      if (opts.mirror.length === 0) throw new UsageError('pair create: give at least one --mirror SS:VOL');
      const mirrors = opts.mirror.map((m) => parseVolRef(m, '--mirror'));
      await edit(opts, (doc, { isMap, isSeq }) => {
        const pairs = doc.get('pairs');
        if (isSeq(pairs) && pairs.items.some((p) => isMap(p) && p.get('name') === name)) throw new UsageError(`pair create: ${opts.config} already has a pair named ${name}`);
        const entry: Record<string, unknown> = { name, mode: opts.mode, master, mirrors };
        if (opts.syncRate !== undefined) entry.syncRate = opts.syncRate;
        if (opts.fence !== undefined) entry.fence = opts.fence;
        const node = doc.createNode(entry) as YAMLMap;
        for (const key of ['master', 'mirrors']) (node.get(key, true) as { flow?: boolean }).flow = true;
        for (const m of (node.get('mirrors', true) as unknown as { items: { flow?: boolean }[] }).items) m.flow = true;
        if (isSeq(pairs)) {
          pairs.flow = false; // `pairs: []` becomes a block list
          pairs.add(node);
        }
        else doc.set('pairs', doc.createNode([node]));
      });
    });
  pair
    .command('delete <name>')
    .description('take a pair out of the YAML and of the running storage systems: its volumes stay, with their data, as simplex volumes')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML); written once the pair is gone')
    .option('--dry-run', 'print the plan only')
    .option('--timeout <ms>', 'how long to wait for each storage system', '60000')
    .allowExcessArguments(false)
    .action(async (name: string, opts: EditOptions) => {
      await edit(opts, (doc, { isMap, isSeq }) => {
        const pairs = doc.get('pairs');
        const i = isSeq(pairs) ? pairs.items.findIndex((p) => isMap(p) && p.get('name') === name) : -1;
        if (i < 0) throw new UsageError(`pair delete: ${opts.config} has no pair named ${name}`);
        (pairs as { delete(i: number): void }).delete(i);
        // The CFS lists its pairs by name: one deleted there must go from that list too (or the YAML is refused, which says so).
      });
    });
}

async function edit(opts: EditOptions, change: (doc: Document, yaml: typeof import('yaml')) => void): Promise<void> {
  const timeoutMs = parseTimeout(opts.timeout);
  const [yaml, { ConfigError, parseConfig }, { applyToCluster }] = await Promise.all([import('yaml'), import('../cluster/config.js'), import('./apply.js')]);
  let text: string;
  try {
    text = fs.readFileSync(opts.config, 'utf8');
  } catch (e) {
    throw new UsageError(`${opts.config}: cannot read the file: ${(e as Error).message}`);
  }
  const doc = yaml.parseDocument(text);
  if (doc.errors.length > 0) throw new UsageError(`${opts.config}: YAML syntax error: ${doc.errors[0]!.message}; correct it first`);
  change(doc, yaml);
  const next = doc.toString();
  let config;
  try {
    config = parseConfig(next, opts.config, path.dirname(path.resolve(opts.config)));
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw e;
  }
  await applyToCluster(config, opts.config, next, { dryRun: opts.dryRun === true, wait: opts.wait === true, timeoutMs });
  if (!opts.dryRun) atomicWrite(opts.config, next.replace(/\n$/, ''));
}
