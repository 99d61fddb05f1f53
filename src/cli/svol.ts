// `blockmirror svol init|split|resync|restore|attr|query GROUP ... -c FILE`: S-VOL group
// commands (docs/svol.md), sent to the storage system that holds the group.
//
//   svol init    GROUP                  full copy from the P-VOL, members paired
//   svol split   GROUP                  every member split at one instant (new generation)
//   svol resync  GROUP [--member ID]    copy only what changed since the split, pair again
//   svol restore GROUP ID               run the member's recovery by hand
//   svol attr    GROUP ID RO|RW|spare   change an attribute
//   svol verify  GROUP [--wait]         find data errors; restore the members that have them
//   svol query   GROUP [--json]         members, map, states, generation, access, increments
//
// A member is named by its logical ID (the N of its export volN), or a pool volume by its id.
import type { Command } from 'commander';
import { svolCommand, svolQuery, type AdminEndpoint, type SvolCommandName } from '../admin/client.js';
import type { ClusterConfig } from '../cluster/config.js';
import type { SvolGroupStatus } from '../controller/svol/status.js';
import { UsageError } from './errors.js';
import { progressBar } from './progress.js';
import { adminEndpoint, loadConfigOrUsage, parseTimeout } from './status.js';

interface Options {
  config: string;
  timeout: string;
  member?: string;
  json?: boolean;
  wait?: boolean;
}

export function registerSvolCommand(program: Command): void {
  const svol = program
    .command('svol')
    .description('S-VOL groups: a P-VOL with RO, RW and spare secondary volumes (docs/svol.md)')
    .argument('[command]')
    .allowExcessArguments()
    .usage('init|split|resync|restore|attr|verify|query <group> ... -c <file>')
    .action((sub: string | undefined) => {
      const expected = 'init, split, resync, restore, attr, verify, query';
      throw new UsageError(sub === undefined ? `svol: missing command (${expected})` : `svol: unknown command "${sub}" (expected ${expected})`);
    });
  const common = (c: Command) =>
    c
      .requiredOption('-c, --config <file>', 'cluster configuration (YAML)')
      .option('--timeout <ms>', 'how long to wait for the storage system', '30000')
      .option('--json', 'print the status as JSON (no progress bar)')
      .allowExcessArguments(false);

  common(svol.command('init <group>').description('full copy from the P-VOL to every member; members paired'))
    .option('--wait', 'wait until every member holds a full copy')
    .action(async (group: string, opts: Options) => void (await send(group, 'init', opts, {})));
  common(svol.command('split <group>').description('split every member at one instant: point-in-time images; RW members log their writes'))
    .action(async (group: string, opts: Options) => void (await send(group, 'split', opts, {})));
  common(svol.command('resync <group>').description('rejoin the P-VOL, copying only the clusters changed on either side since the split'))
    .option('--member <id>', 'resync only this member (its logical ID)')
    .option('--wait', 'wait until the copy is done')
    .action(async (group: string, opts: Options) => void (await send(group, 'resync', opts, opts.member !== undefined ? { member: memberArg(opts.member) } : {})));
  common(svol.command('restore <group> <member>').description('run the recovery of a member by hand: rebuild it from an RO sibling of its split generation'))
    .option('--wait', 'wait until the restore is done (a progress bar on a terminal)')
    .action(async (group: string, member: string, opts: Options) => void (await send(group, 'restore', opts, { member: memberArg(member) })));
  common(svol.command('attr <group> <member> <attr>').description('set the attribute of a member: RO, RW, or spare (a replaced volume back in the pool)'))
    .action(async (group: string, member: string, attr: string, opts: Options) => {
      if (attr !== 'RO' && attr !== 'RW' && attr !== 'spare') throw new UsageError(`svol attr: unknown attribute "${attr}" (expected RO, RW or spare)`);
      await send(group, 'attr', opts, { member: memberArg(member), attr });
    });
  common(svol.command('verify <group>').description('compare each member with the P-VOL where neither side changed since the split; restore members with data errors from an RO sibling'))
    .option('--wait', 'wait until the restores it started are done')
    .action(async (group: string, opts: Options) => {
      const s = await send(group, 'verify', opts, {});
      if (s.verify?.members.some((m) => m.differing > 0)) process.exitCode = 1;
    });
  common(svol.command('query <group>').description('members, attributes, states, logical->physical map, split generation, access frequency, increments, restore progress'))
    .action(async (group: string, opts: Options) => {
      const { ep, timeoutMs } = await target(group, opts);
      const s = await svolQuery(ep, group, timeoutMs);
      process.stdout.write(opts.json ? JSON.stringify(s, null, 2) + '\n' : formatGroup(s));
    });
}

function memberArg(text: string): string {
  if (!/^(vol)?\d+$/.test(text)) throw new UsageError(`invalid member "${text}" (expected a logical ID such as 3 or vol3)`);
  return text;
}

async function target(group: string, opts: Options): Promise<{ ep: AdminEndpoint; timeoutMs: number }> {
  const timeoutMs = parseTimeout(opts.timeout);
  const config = await loadConfigOrUsage(opts.config);
  return { ep: endpointOf(config, opts.config, group), timeoutMs };
}

function endpointOf(config: ClusterConfig, file: string, group: string): AdminEndpoint {
  const ss = config.storageSystems.find((s) => s.svolGroups?.some((g) => g.name === group));
  if (!ss) {
    const known = config.storageSystems.flatMap((s) => s.svolGroups?.map((g) => g.name) ?? []);
    throw new UsageError(`unknown S-VOL group "${group}" (${file} has ${known.length ? known.join(', ') : 'no svolGroups'})`);
  }
  return adminEndpoint(config, ss);
}

async function send(group: string, command: SvolCommandName, opts: Options, body: { member?: string; attr?: string }): Promise<SvolGroupStatus> {
  const { ep, timeoutMs } = await target(group, opts);
  let s = await svolCommand(ep, group, command, body, timeoutMs);
  if (opts.wait) s = await follow(ep, group, s, timeoutMs, opts.json === true);
  process.stdout.write(opts.json ? JSON.stringify(s, null, 2) + '\n' : formatGroup(s));
  return s;
}

/**
 * Poll until no copy and no restore runs; a progress bar on a terminal (progress.ts). The work is
 * what the storage system reports left: clusters of the restore not copied yet, plus the changed
 * clusters of members still being copied, plus RW members' clusters not destaged yet.
 */
async function follow(ep: AdminEndpoint, group: string, first: SvolGroupStatus, timeoutMs: number, json: boolean): Promise<SvolGroupStatus> {
  let s = first;
  const left = (g: SvolGroupStatus) => (g.restore ? g.restore.totalClusters - g.restore.copiedClusters : 0) + g.members.reduce((n, m) => n + (m.state === 'paired' ? (m.changedClusters ?? 0) : 0) + (m.destagePending ?? 0), 0);
  let total = Math.max(1, left(s));
  const bar = await progressBar({ label: group, total, format: '{value}/{total} clusters | ETA {eta_formatted}', json });
  try {
    while (left(s) > 0 || s.members.some((m) => m.state === 'restoring')) {
      await new Promise((r) => setTimeout(r, 200));
      s = await svolQuery(ep, group, timeoutMs);
      // A restore that starts after the first poll (a member failed meanwhile) adds work.
      total = Math.max(total, left(s));
      bar?.update(total - left(s), total);
    }
    bar?.update(total - left(s), total);
  } finally {
    bar?.stop();
  }
  return s;
}

/** The query table: one line per member, then the restore in progress. */
export function formatGroup(s: SvolGroupStatus): string {
  const head = `${s.name}: ${s.state}, P-VOL ${s.pvol}, split generation ${s.generation}${s.splitTime ? ` at ${s.splitTime}` : ''}\n`;
  const rows = [['LOGICAL', 'VOLUME', 'ATTR', 'STATE', 'GEN', 'READS', 'WRITES', 'CHANGED', 'INCREMENTS', 'ERROR']];
  for (const m of s.members) {
    rows.push([
      m.logicalId !== undefined ? `vol${m.logicalId}` : '-',
      String(m.vol),
      m.attr,
      m.state,
      m.generation !== undefined ? String(m.generation) : '-',
      String(m.reads),
      String(m.writes),
      m.changedClusters !== undefined ? String(m.changedClusters) : '-',
      m.increments ? `vol${m.increments.vol} ${m.increments.clusters} clusters, ${m.increments.bytes}/${m.increments.capacity} bytes${m.destagePending ? `, ${m.destagePending} to destage` : ''}` : '-',
      m.error ?? '',
    ]);
  }
  const widths = rows[0]!.map((_, k) => Math.max(...rows.map((r) => r[k]!.length)));
  const table = rows.map((r) => r.map((c, k) => c.padEnd(widths[k]!)).join('  ').trimEnd()).join('\n') + '\n';
  const checks = `reads ${s.spreadReads ? 'spread over RO siblings of a generation' : 'from each member\'s own volume'}; ioTimeout ${s.ioTimeoutMs ? `${s.ioTimeoutMs} ms` : 'off'}; ${s.checksumMismatches} checksum mismatches, ${s.ioTimeouts} timeouts since start\n`;
  const r = s.restore;
  const restore = r
    ? `restore: vol${r.logicalId} onto volume ${r.target} from volume ${r.donor} (replacing ${r.failed}): ${r.copiedClusters}/${r.totalClusters} clusters (${Math.floor((100 * r.copiedClusters) / Math.max(1, r.totalClusters))}%; a restart resumes at ${r.checkpointClusters}), ${r.reason}\n`
    : '';
  const v = s.verify;
  const verify = v
    ? `verify at ${v.time}: ${v.checkedClusters} clusters checked; ${v.members.every((m) => m.differing === 0) ? 'no data errors' : v.members.filter((m) => m.differing > 0).map((m) => `vol${m.logicalId}: ${m.differing} clusters differ (first ${m.first.slice(0, 5).join(', ')})`).join('; ')}\n`
    : '';
  return head + table + checks + restore + verify;
}
