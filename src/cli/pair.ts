// `blockmirror pair split|resync|verify|swap|takeover NAME -c FILE`: send a pair
// command to the storage system that can run it and print the pair's state
// afterwards, e.g. "pair1: PSUS" (--json: the pair's status). `verify` and `resync --wait` follow
// the work to its end, with a progress bar on a terminal (pair-progress.ts).
//
// Which storage system: the pair's current master for split, resync, verify and
// swap; its mirror for takeover. After a swap or a takeover the master is no
// longer the one in the file, so the copies' storage systems are asked first
// and the one reporting the master role in the newest epoch wins.
import type { Command } from 'commander';
import { AdminReplyError, getStatus, pairCommand, type AdminEndpoint, type PairCommand } from '../admin/client.js';
import { followVerify, resyncAndWait, resyncLine, resyncSucceeded } from './pair-progress.js';
import type { ClusterConfig } from '../cluster/config.js';
import { reportRank, type PairStatus } from '../controller/status.js';
import { UsageError } from './errors.js';
import { registerPairEditCommands } from './pair-edit.js';
import { adminEndpoint, loadConfigOrUsage, parseTimeout } from './status.js';

export const DEFAULT_PAIR_TIMEOUT_MS = 10_000;
/** A swap waits for the mirror to catch up, with writes held. */
const SWAP_TIMEOUT_MS = 70_000;

interface PairOptions {
  config: string;
  timeout: string;
  wait?: boolean;
  json?: boolean;
}

const COMMANDS: { command: PairCommand; description: string }[] = [
  { command: 'split', description: 'stop mirroring: the mirrors keep a point-in-time image and become writable; changes are tracked (PAIR -> PSUS)' },
  { command: 'resync', description: 'copy what changed since the split back to the mirrors and resume mirroring (PSUS/PSUE -> COPY -> PAIR)' },
  { command: 'verify', description: 'compare master and mirrors cluster by cluster by checksum; mark differences Invalid and report them' },
  { command: 'swap', description: 'planned role swap of a pair across storage systems: the mirror becomes master once it has every write' },
  { command: 'takeover', description: "promote the mirror when the master's storage system is gone; the old master becomes a mirror when it returns" },
];

export function registerPairCommand(program: Command): void {
  const pair = program
    .command('pair')
    .description('create, delete, split, resync, verify, swap or take over a mirrored pair')
    // Without this, a missing or mistyped subcommand ends in commander's help text and exit code 1.
    .argument('[command]')
    .allowExcessArguments()
    .usage('create|delete|split|resync|verify|swap|takeover <name> -c <file>')
    .action((sub: string | undefined) => {
      const expected = ['create', 'delete', ...COMMANDS.map((c) => c.command)].join(', ');
      throw new UsageError(sub === undefined ? `pair: missing command (${expected})` : `pair: unknown command "${sub}" (expected ${expected})`);
    });
  registerPairEditCommands(pair);
  for (const { command, description } of COMMANDS) {
    const sub = pair
      .command(`${command} <name>`)
      .description(description)
      .allowExcessArguments(false)
      .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
      .option('--timeout <ms>', 'how long to wait for the storage system', String(command === 'swap' ? SWAP_TIMEOUT_MS : DEFAULT_PAIR_TIMEOUT_MS))
      .option('--json', "print the pair's status as JSON (no progress bar)");
    if (command === 'resync') sub.option('--wait', 'wait until the mirrors are in sync (a progress bar on a terminal)');
    sub.action(async (name: string, opts: PairOptions) => {
      const timeoutMs = parseTimeout(opts.timeout);
      const config = await loadConfigOrUsage(opts.config);
      const target = await pickTarget(config, opts.config, name, command, timeoutMs);
      const json = opts.json === true;
      let status: PairStatus;
      let line = '';
      let failed = false;
      if (command === 'resync' && opts.wait) {
        const r = await resyncAndWait(target, name, timeoutMs, json);
        status = r.status;
        line = resyncLine(r);
        failed = !resyncSucceeded(r);
      } else {
        status = await pairCommand(target, name, command, timeoutMs);
        if (command === 'verify') {
          status = await followVerify(target, name, status, timeoutMs, json);
          line = verifyLine(status);
          failed = status.verify?.error !== undefined || (status.verify?.differences ?? 0) > 0;
        }
      }
      process.stdout.write(json ? `${JSON.stringify(status, null, 2)}\n` : `${status.name}: ${status.state}${line}\n`);
      if (failed) process.exitCode = 1;
    });
  }
}

async function pickTarget(config: ClusterConfig, path: string, name: string, command: PairCommand, timeoutMs: number): Promise<AdminEndpoint> {
  const pair = config.pairs.find((p) => p.name === name);
  if (pair === undefined) {
    const known = config.pairs.map((p) => p.name);
    throw new UsageError(`unknown pair "${name}" (${path} has ${known.length === 0 ? 'no pairs' : known.join(', ')})`);
  }
  const ids = [...new Set([pair.master.ss, ...pair.mirrors.map((m) => m.ss)])];
  const endpoint = (id: number) => {
    const ss = config.storageSystems.find((s) => s.id === id);
    // loadConfig checks this; a second look costs nothing and keeps the message clear.
    if (ss === undefined) throw new UsageError(`pair ${name}: storage system ${id} is not in ${path}`);
    return adminEndpoint(config, ss);
  };
  // A pair inside one storage system: that one runs every command.
  if (ids.length === 1) return endpoint(ids[0]!);

  const views = await Promise.all(
    ids.map(async (id) => {
      try {
        const report = await getStatus(endpoint(id), Math.min(timeoutMs, 3000));
        return { id, p: report.pairs.find((p) => p.name === name) };
      } catch {
        return { id, p: undefined };
      }
    }),
  );
  const answered = views.filter((v): v is { id: number; p: PairStatus } => v.p !== undefined);
  if (command === 'takeover') {
    const mirror = answered.find((v) => v.p.role === 'mirror');
    if (!mirror) throw new AdminReplyError(`takeover ${name}: no storage system holding a mirror of ${name} answered`, 409);
    return endpoint(mirror.id);
  }
  const best = answered.sort((a, b) => reportRank(b.p, b.id === pair.master.ss) - reportRank(a.p, a.id === pair.master.ss))[0];
  if (!best || best.p.role === 'mirror') {
    // No master answered: send it to the configured master, whose error says why.
    return endpoint(best?.p.master.ss ?? pair.master.ss);
  }
  return endpoint(best.id);
}

function verifyLine(p: PairStatus): string {
  const v = p.verify;
  if (!v) return '';
  if (v.error) return `; verify failed: ${v.error}`;
  if (v.differences === 0) return `; verified ${v.checked} clusters: the mirrors match the master`;
  const shown = v.differing.slice(0, 20).join(', ');
  const more = v.differences > 20 ? ', ...' : '';
  return `; verified ${v.checked} clusters: ${v.differences} differ and are marked Invalid (clusters ${shown}${more})`;
}
