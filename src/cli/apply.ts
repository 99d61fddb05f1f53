// `blockmirror apply -c FILE [--dry-run] [--wait]`: change a running cluster to what FILE says,
// as `drbdadm adjust` does (docs: README "Changing a running cluster", admin-api.md /api/config).
//
//   1. FILE is checked here first (a bad YAML is refused with its line and column);
//   2. every storage system of FILE plans its part (POST /api/config, dryRun): one refusal, and
//      nothing is applied anywhere; the plan is printed;
//   3. each process applies its part, all or nothing (cluster/reconfigure.ts), in an order that
//      puts a new mirror's storage system before its master and a master before a mirror it drops
//      (applyOrder). If a later one fails, those already changed are given their previous YAML back.
// A storage system that does not answer is listed, not changed: new in FILE, it is started
// with `blockmirror up -c FILE --only ID` and runs FILE from the start.
import fs from 'node:fs';
import path from 'node:path';
import type { Command } from 'commander';
import { AdminReplyError, AdminUnreachableError, applyConfig, getConfig, getStatus, type AdminEndpoint } from '../admin/client.js';
import { parseConfig, type ClusterConfig } from '../cluster/config.js';
import { UsageError } from './errors.js';
import { adminEndpoint, loadConfigOrUsage, parseTimeout } from './status.js';

const DEFAULT_APPLY_TIMEOUT_MS = 60_000;

/** A failure of apply: one line, nothing applied (or everything undone). */
export class ApplyError extends Error {
  override readonly name = 'ApplyError';
}

export function registerApplyCommand(program: Command): void {
  program
    .command('apply')
    .description('change the running storage systems to what a YAML says: print the plan, then apply it (all or nothing)')
    .requiredOption('-c, --config <file>', 'the cluster YAML, edited')
    .option('--dry-run', 'print the plan only')
    .option('--wait', 'after applying, wait until no pair is copying (new mirrors in PAIR)')
    .option('--timeout <ms>', 'how long to wait for each storage system', String(DEFAULT_APPLY_TIMEOUT_MS))
    .action(async (opts: { config: string; dryRun?: boolean; wait?: boolean; timeout: string }) => {
      const timeoutMs = parseTimeout(opts.timeout);
      const config = await loadConfigOrUsage(opts.config);
      const text = fs.readFileSync(opts.config, 'utf8');
      await applyToCluster(config, opts.config, text, { dryRun: opts.dryRun === true, wait: opts.wait === true, timeoutMs });
    });
}

/** Plan and apply `text` (already checked as `config`) on every storage system of it; prints the plan. */
export async function applyToCluster(config: ClusterConfig, file: string, text: string, opts: { dryRun: boolean; wait: boolean; timeoutMs: number }): Promise<void> {
  const out = (line: string) => process.stdout.write(`${line}\n`);
  const endpoints: AdminEndpoint[] = [];
  for (const ss of config.storageSystems) {
    try {
      endpoints.push(adminEndpoint(config, ss));
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  }
  // 1. Plans, and each process's YAML as it is (to give it back if a later process fails).
  const live: { ep: AdminEndpoint; before: string; changes: string[] }[] = [];
  const notes = new Set<string>();
  for (const ep of endpoints) {
    let before: string;
    try {
      before = await getConfig(ep, opts.timeoutMs);
    } catch (e) {
      if (!(e instanceof AdminUnreachableError)) throw new ApplyError((e as Error).message);
      notes.add(`storage system ${ep.ss} does not answer (${e.code}): it is not changed; if it is new, start it with blockmirror up -c ${file} --only ${ep.ss}`);
      continue;
    }
    const plan = await applyConfig(ep, text, true, opts.timeoutMs).catch((e: Error) => {
      throw new ApplyError(`${e instanceof AdminReplyError && e.serverMessage ? e.serverMessage : e.message}; nothing was applied`);
    });
    for (const n of plan.notes) notes.add(n);
    live.push({ ep, before, changes: plan.changes });
  }
  // "storage system 3 is new: start it" (for SIGHUP's log): here each one either answered, or has its note above.
  for (const n of notes) if (/^storage system \d+ is new:/.test(n)) notes.delete(n);
  if (live.length === 0) throw new ApplyError(`no storage system of ${file} answered: start them with blockmirror up -c ${file}`);
  // The plan in the order the processes will apply it.
  const order = applyOrder(live, config, file);
  const changes = new Set(order.flatMap((l) => l.changes));
  out(changes.size === 0 ? 'no changes' : `plan (${changes.size} change${changes.size === 1 ? '' : 's'}):`);
  for (const c of changes) out(`  ${c}`);
  for (const n of notes) out(`note: ${n}`);
  // With no change, the processes still take the new YAML (a storage system added elsewhere, comments).
  if (opts.dryRun) return;

  // 2. Apply, process by process; a failure gives the ones already changed their YAML back.
  const done: typeof live = [];
  for (const l of order) {
    try {
      await applyConfig(l.ep, text, false, opts.timeoutMs);
      done.push(l);
    } catch (e) {
      const why = e instanceof AdminReplyError && e.serverMessage ? e.serverMessage : (e as Error).message;
      const back: number[] = [];
      for (const d of done.reverse()) {
        try {
          await applyConfig(d.ep, d.before, false, opts.timeoutMs);
          back.push(d.ep.ss!);
        } catch {
          // Said below: this one keeps the new YAML.
        }
      }
      const lost = done.filter((d) => !back.includes(d.ep.ss!)).map((d) => d.ep.ss);
      const after = back.length ? `; storage system${back.length > 1 ? 's' : ''} ${back.join(', ')} went back to the previous YAML` : '';
      const stuck = lost.length ? `; storage system${lost.length > 1 ? 's' : ''} ${lost.join(', ')} kept the new one` : '';
      throw new ApplyError(`${why}${after}${stuck}`);
    }
  }
  if (changes.size > 0) out(`applied ${changes.size} change${changes.size === 1 ? '' : 's'}`);
  if (opts.wait) await waitCopied(live.map((l) => l.ep), opts.timeoutMs);
}

/**
 * The order the processes apply in: config order, except that a storage system taking a new
 * mirror of a pair across storage systems goes before the pair's master (its side must exist
 * when the master attaches it), and a master dropping a mirror goes before that mirror's
 * storage system (it stops replicating first). A change needing both orders at once is refused,
 * naming the changes that conflict.
 */
function applyOrder<T extends { ep: AdminEndpoint; before: string }>(live: T[], next: ClusterConfig, file: string): T[] {
  let prev: ClusterConfig;
  try {
    prev = parseConfig(live[0]!.before, file, path.dirname(path.resolve(file)));
  } catch {
    return live; // the running YAML always parsed once; if not now, there is no membership to order
  }
  // ss -> the storage systems that must apply before it, each with why.
  const after = new Map<number, Map<number, string>>();
  const edge = (first: number, then: number, why: string) => {
    if (first === then) return;
    const before = after.get(then) ?? after.set(then, new Map()).get(then)!;
    if (!before.has(first)) before.set(first, why);
  };
  const key = (r: { ss: number; vol: number }) => `${r.ss}:${r.vol}`;
  for (const b of next.pairs) {
    const a = prev.pairs.find((p) => p.name === b.name);
    if (!a) continue;
    const was = new Set(a.mirrors.map(key));
    const now = new Set(b.mirrors.map(key));
    for (const m of b.mirrors) if (!was.has(key(m))) edge(m.ss, b.master.ss, `${b.name} gains mirror ${key(m)}`);
    for (const m of a.mirrors) if (!now.has(key(m))) edge(a.master.ss, m.ss, `${a.name} drops mirror ${key(m)}`);
  }
  const out: T[] = [];
  const left = [...live];
  const waitsOn = (ss: number) => [...(after.get(ss) ?? [])].filter(([first]) => left.some((o) => o.ep.ss === first));
  while (left.length > 0) {
    const i = left.findIndex((l) => waitsOn(l.ep.ss!).length === 0);
    if (i < 0) throw new ApplyError(`${describeCycle(left.map((l) => l.ep.ss!), waitsOn)}: no order of the storage systems does all of that in one pass; apply it in two steps (a YAML with one of these changes, then the whole); nothing was applied`);
    out.push(left.splice(i, 1)[0]!);
  }
  return out;
}

/** The first cycle of "must apply before" among `ids`, as "ss1 must apply before ss2 (pair1 drops mirror 2:1), ss2 must apply before ss1 (pair2 gains mirror 2:2)". */
function describeCycle(ids: number[], waitsOn: (ss: number) => [number, string][]): string {
  const path: [number, number, string][] = []; // [first, then, why]
  const seen = new Map<number, number>(); // ss -> its index in path
  let at = ids[0]!;
  while (!seen.has(at)) {
    seen.set(at, path.length);
    const [first, why] = waitsOn(at)[0]!;
    path.push([first, at, why]);
    at = first;
  }
  // The path walked backwards along "must apply before"; the cycle is its part from `at` on, read forwards.
  return path
    .slice(seen.get(at)!)
    .reverse()
    .map(([first, then, why]) => `ss${first} must apply before ss${then} (${why})`)
    .join(', ');
}

/** Until no pair any storage system reports is in COPY (a new mirror has its full copy and is in PAIR). */
async function waitCopied(eps: AdminEndpoint[], timeoutMs: number): Promise<void> {
  for (;;) {
    const reports = await Promise.all(eps.map((ep) => getStatus(ep, timeoutMs).catch(() => undefined)));
    const copying = reports.flatMap((r) => r?.pairs.filter((p) => p.state === 'COPY' && p.role !== 'mirror').map((p) => p.name) ?? []);
    if (copying.length === 0) {
      process.stdout.write('every pair is in sync\n');
      return;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
}
