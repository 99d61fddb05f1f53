// Which mirrors a pair across storage systems has, changed at run time (`blockmirror apply`):
// the steps each storage system of the pair takes (reconfigure.ts runs them). Each storage
// system plans only its own part; the order across them comes from the phases (one process)
// and from the order `apply` visits the processes (cli/apply.ts):
//
//   this storage system      the change                   step (phase)                    undo
//   holds the new mirror     a mirror is added            join: our part starts as a      leave
//                                                         mirror, waiting for the master
//   the master               mirrors added or removed     reshape: a removed mirror is    reshape back
//                                                         split off, a new one attached
//                                                         (all Invalid: COPY, then PAIR)
//   holds a removed mirror   the mirror is removed        leave: a simplex volume         join
//   holds another mirror     the others changed           the copies it knows             -
//
// So a mirror side exists before its master replicates to it, and the master has stopped
// before a mirror side goes. What still needs a restart is refused, with what to do.
import { formatSize } from '../util/size.js';
import { mirrorKey } from './local-pair.js';
import type { Step } from './reconfigure.js';
import type { RemotePairSpec } from './remote/context.js';
import { RemotePair } from './remote/remote-pair.js';
import type { StorageSystem, StorageSystemSpec } from './storage-system.js';

/** Steps of all the storage systems of one process run sorted by phase, stably (cluster/reconfigure.ts); a step without one is `local`. */
export const PHASE = { local: 0, join: 1, reshape: 2, leave: 3, removeVolume: 4, last: 5 } as const;

const ref = (r: { ss: number; vol: number }) => `${r.ss}:${r.vol}`;
const RESTART = 'restart the storage systems of the pair with the new YAML';

/** The membership steps of `ss` from its spec `cur` to `next`; `refuse` throws ReconfigureRefused. */
export function planRemoteMembership(ss: StorageSystem, cur: StorageSystemSpec, next: StorageSystemSpec, refuse: (why: string) => never): Step[] {
  const self = cur.id;
  const curRemote = new Map((cur.remotePairs ?? []).map((p) => [p.name, p]));
  const nextRemote = new Map((next.remotePairs ?? []).map((p) => [p.name, p]));
  const steps: Step[] = [];
  for (const name of new Set([...curRemote.keys(), ...nextRemote.keys()])) {
    const [a, b] = [curRemote.get(name), nextRemote.get(name)];
    if (a && b) {
      if (fixedLayout(a) !== fixedLayout(b)) refuse(`pair ${name} spans storage systems: its mode, master and autoResync cannot change at run time; ${RESTART}`);
      if (mirrorsOf(a) === mirrorsOf(b)) continue;
      if (a.master.ss === self) steps.push(reshape(ss, a, b, next, refuse));
      else steps.push({ line: '', apply: async () => ss.peers.setCopies(name, b), undo: async () => ss.peers.setCopies(name, a) });
    } else if (b) {
      if (b.master.ss === self) {
        const local = cur.pairs.some((p) => p.name === name);
        refuse(`pair ${name} ${local ? 'is inside this storage system: giving it a mirror in another storage system' : 'spans storage systems: creating it'} at run time is not supported; ${RESTART}`);
      }
      steps.push(join(ss, b, next, refuse));
    } else if (a) {
      if (a.master.ss === self) {
        const local = next.pairs.some((p) => p.name === name);
        refuse(`pair ${name} spans storage systems: ${local ? 'making it a pair inside this storage system' : 'deleting it'} at run time is not supported; ${RESTART}`);
      }
      steps.push(leave(ss, a));
    }
  }
  return steps;
}

function reshape(ss: StorageSystem, a: RemotePairSpec, b: RemotePairSpec, next: StorageSystemSpec, refuse: (why: string) => never): Step {
  const self = a.master.ss;
  const rp = ss.pairs.get(a.name);
  if (!(rp instanceof RemotePair) || rp.role !== 'master') {
    refuse(`pair ${a.name}: storage system ${self} is its master in the YAML, but holds a mirror now (swap or takeover): its mirrors change only on the current master; swap back first`);
  }
  const was = new Set(a.mirrors.map(mirrorKey));
  const now = new Set(b.mirrors.map(mirrorKey));
  const added = b.mirrors.filter((m) => !was.has(mirrorKey(m)));
  const removed = a.mirrors.filter((m) => !now.has(mirrorKey(m)));
  for (const m of [...added, ...removed]) {
    if (m.ss === self) refuse(`pair ${a.name}: a mirror in its master's storage system (${ref(m)}) cannot be added to or removed from a pair across storage systems at run time; ${RESTART}`);
  }
  if (added.length > 0 && rp.status().state === 'PSUS') refuse(`pair ${a.name} is split (PSUS): resync it before adding a mirror`);
  for (const m of added) {
    if (ss.peers.peerUp(m.ss) === false) refuse(`pair ${a.name}: storage system ${m.ss} is not connected over the peer channel: start it (blockmirror up -c FILE --only ${m.ss}), then apply`);
  }
  let linked: number[] = [];
  const what = [
    ...added.map((m) => `add mirror ${ref(m)} (full copy${a.syncRate !== undefined || b.syncRate !== undefined ? ` at ${fmtRate(b.syncRate)}` : ''}, then PAIR)`),
    ...removed.map((m) => `remove mirror ${ref(m)} (replication to it stops; it becomes a simplex volume)`),
  ];
  return {
    line: `ss${self}: ${a.name}: ${what.join(', ')}`,
    phase: PHASE.reshape,
    apply: async () => {
      linked = await ss.peers.linkPeers(next, true);
      await forgetOnFailure(ss, linked, () => ss.peers.reshape(a.name, b, a));
    },
    undo: async () => {
      await ss.peers.reshape(a.name, a, b);
      await ss.peers.unlink(linked);
    },
  };
}

function join(ss: StorageSystem, b: RemotePairSpec, next: StorageSystemSpec, refuse: (why: string) => never): Step {
  const mine = [b.master, ...b.mirrors].find((r) => r.ss === ss.spec.id)!;
  const inPair = [...ss.pairs.values()].find((p) => p.volumes.includes(mine.vol));
  if (inPair) refuse(`volume ${mine.vol} is in pair ${inPair.name}: it cannot also become a mirror of ${b.name}; remove it from ${inPair.name} first`);
  const hosts = ss.spec.volumes.some((v) => v.id === mine.vol) ? ss.hostsOn(mine.vol) : 0;
  if (hosts > 0) refuse(`volume ${mine.vol} is in use (${hosts} host connection${hosts > 1 ? 's' : ''}): it would become a mirror of ${b.name}, read-only to hosts; detach them first`);
  let linked: number[] = [];
  return {
    line: `ss${mine.ss}: ${b.name}: vol${mine.vol} joins as a mirror of ${ref(b.master)} (copied in full from the master, then PAIR)`,
    phase: PHASE.join,
    apply: async () => {
      linked = await ss.peers.linkPeers(next, false);
      await forgetOnFailure(ss, linked, () => ss.peers.join(b));
    },
    undo: async () => {
      await ss.peers.leave(b.name);
      await ss.peers.unlink(linked);
    },
  };
}

function leave(ss: StorageSystem, a: RemotePairSpec): Step {
  const mine = [a.master, ...a.mirrors].find((r) => r.ss === ss.spec.id)!;
  return {
    line: `ss${mine.ss}: ${a.name}: vol${mine.vol} leaves the pair (it becomes a simplex volume with its data)`,
    phase: PHASE.leave,
    apply: () => ss.peers.leave(a.name),
    undo: () => ss.peers.join(a),
  };
}

/** A step that failed leaves no link it made behind: a down storage system is not redialled until a restart. */
async function forgetOnFailure(ss: StorageSystem, linked: number[], step: () => Promise<void>): Promise<void> {
  try {
    await step();
  } catch (e) {
    await ss.peers.unlink(linked);
    throw e;
  }
}

const fmtRate = (r: number | undefined) => (r === undefined ? 'unlimited' : `${formatSize(r)}/s`);

/** What only a restart changes: mode, master, autoResync. */
function fixedLayout(p: RemotePairSpec): string {
  return JSON.stringify([p.mode, p.master, p.autoResync ?? null]);
}

function mirrorsOf(p: RemotePairSpec): string {
  return JSON.stringify(p.mirrors);
}
