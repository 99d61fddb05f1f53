// `blockmirror fault set|clear|list -c FILE`: inject faults into a running cluster, for tests
// and for operators rehearsing a failure (docs/faults.md).
//
//   fault set -c FILE 1:8 error --op write --range 0:1MiB --probability 0.5
//   fault set -c FILE link:1-2 drop
//   fault clear -c FILE 1:8 [--kind error]
//   fault list -c FILE
//
// A volume target goes to its storage system; a link target to both ends, so a cut is cut on
// both sides. Options are checked here first, with the same rules as the YAML's `faults:`.
import type { Command } from 'commander';
import { clearFault, listFaults, setFault } from '../admin/client.js';
import type { ClusterConfig } from '../cluster/config.js';
import type { FaultStatus } from '../controller/fault-table.js';
import { UsageError } from './errors.js';
import { adminEndpoint, loadConfigOrUsage, parseTimeout } from './status.js';

interface SetOptions {
  config: string;
  op?: string;
  range?: string;
  probability?: string;
  ms?: string;
  jitter?: string;
  mode?: string;
  timeout: string;
}

export function registerFaultCommand(program: Command): void {
  const fault = program
    .command('fault')
    .description('inject faults into volumes and links of a running cluster (for tests and failure drills)')
    .argument('[command]')
    .allowExcessArguments()
    .usage('set|clear|list ... -c <file>')
    .action((sub: string | undefined) => {
      throw new UsageError(sub === undefined ? 'fault: missing command (set, clear, list)' : `fault: unknown command "${sub}" (expected set, clear, list)`);
    });

  fault
    .command('set <target> <kind>')
    .description('set a fault: TARGET is SS:VOL (error, delay, offline, corrupt, torn) or link:A-B (delay, drop, reset)')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
    .option('--op <ops>', 'read, write, flush, or a comma-separated list (volumes; default all)')
    .option('--range <start:len>', 'bytes hit, e.g. 1MiB:64KiB (volumes; default the whole volume)')
    .option('--probability <p>', 'chance that a matching request is hit, 0 < p <= 1 (default 1)')
    .option('--ms <n>', 'delay in milliseconds')
    .option('--jitter <n>', 'up to this many more milliseconds of delay')
    .option('--mode <mode>', 'offline: hang (requests wait until cleared, default) or fail (EIO at once)')
    .option('--timeout <ms>', 'how long to wait for the storage system', '10000')
    .action(async (targetText: string, kind: string, opts: SetOptions) => {
      // Loaded here: the schema pulls in zod, which no other command should pay for at start.
      const ft = await import('../controller/fault-table.js');
      const config = await loadConfigOrUsage(opts.config);
      const timeoutMs = parseTimeout(opts.timeout);
      const options = setOptions(ft, targetText, kind, opts);
      const shown: FaultStatus[] = [];
      for (const ep of endpointsFor(ft, config, opts.config, targetText)) {
        const faults = await setFault(ep, targetText, kind, options, timeoutMs);
        shown.push(...faults.filter((f) => f.target === normalise(ft, targetText)));
      }
      printFaults(dedupe(shown));
    });

  fault
    .command('clear <target>')
    .description('clear the faults of a target (all of them, or one kind)')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
    .option('--kind <kind>', 'clear only this kind')
    .option('--timeout <ms>', 'how long to wait for the storage system', '10000')
    .action(async (targetText: string, opts: { config: string; kind?: string; timeout: string }) => {
      const ft = await import('../controller/fault-table.js');
      const config = await loadConfigOrUsage(opts.config);
      const timeoutMs = parseTimeout(opts.timeout);
      for (const ep of endpointsFor(ft, config, opts.config, targetText)) await clearFault(ep, targetText, opts.kind, timeoutMs);
      process.stdout.write(`${normalise(ft, targetText)}: cleared\n`);
    });

  fault
    .command('list')
    .description('list the faults set in every storage system of the file')
    .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
    .option('--timeout <ms>', 'how long to wait for each storage system', '10000')
    .action(async (opts: { config: string; timeout: string }) => {
      const config = await loadConfigOrUsage(opts.config);
      const timeoutMs = parseTimeout(opts.timeout);
      const all = await Promise.all(config.storageSystems.map((ss) => listFaults(adminEndpoint(config, ss), timeoutMs)));
      const faults = dedupe(all.flat());
      if (faults.length === 0) process.stdout.write('no faults\n');
      else printFaults(faults);
    });
}

/** The fault's options as the admin API takes them, checked with the YAML's rules. */
type FaultTable = typeof import('../controller/fault-table.js');

function setOptions(ft: FaultTable, targetText: string, kind: string, opts: SetOptions): Record<string, unknown> {
  const { FaultRequestSchema, FaultSpecError, parseByteRange, resolveFault } = ft;
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`fault set: --${name}: expected a number, got "${v}"`);
    return n;
  };
  try {
    const options: Record<string, unknown> = {};
    if (opts.op !== undefined) options.op = opts.op.split(',').map((s) => s.trim());
    if (opts.range !== undefined) options.range = parseByteRange(opts.range);
    const p = num('probability', opts.probability);
    if (p !== undefined) options.probability = p;
    const ms = num('ms', opts.ms);
    if (ms !== undefined) options.ms = ms;
    const jitter = num('jitter', opts.jitter);
    if (jitter !== undefined) options.jitter = jitter;
    if (opts.mode !== undefined) options.mode = opts.mode;
    const parsed = FaultRequestSchema.safeParse({ ...options, target: targetText, kind });
    if (!parsed.success) throw new FaultSpecError(`fault ${kind} on ${targetText}: ${parsed.error.issues.map((i) => `${i.path.join('.') || 'options'}: ${i.message}`).join('; ')}`);
    resolveFault(parsed.data);
    return options;
  } catch (e) {
    if (e instanceof FaultSpecError) throw new UsageError(e.message);
    throw e;
  }
}

function normalise(ft: FaultTable, targetText: string): string {
  const t = ft.parseFaultTarget(targetText);
  return t.type === 'volume' ? `${t.ss}:${t.vol}` : `link:${t.a}-${t.b}`;
}

/** Where a target's faults are set: its storage system, or both ends of a link. */
function endpointsFor(ft: FaultTable, config: ClusterConfig, file: string, targetText: string) {
  let t;
  try {
    t = ft.parseFaultTarget(targetText);
  } catch (e) {
    if (e instanceof ft.FaultSpecError) throw new UsageError(e.message);
    throw e;
  }
  const ids = t.type === 'volume' ? [t.ss] : [t.a, t.b];
  return ids.map((id) => {
    const ss = config.storageSystems.find((s) => s.id === id);
    if (!ss) throw new UsageError(`fault target ${targetText}: ${file} has no storage system ${id} (it has ${config.storageSystems.map((s) => s.id).join(', ')})`);
    return adminEndpoint(config, ss);
  });
}

/** A link's fault is reported by both of its ends: show it once. */
function dedupe(faults: FaultStatus[]): FaultStatus[] {
  const seen = new Set<string>();
  return faults.filter((f) => {
    const key = `${f.target} ${f.kind}`;
    if (seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

function printFaults(faults: FaultStatus[]): void {
  for (const f of faults) process.stdout.write(`${f.target}: ${f.description}\n`);
}
