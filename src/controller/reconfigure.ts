// Live reconfiguration of one storage system (`blockmirror apply`, SIGHUP to `up`): the
// difference between the spec it runs and a new spec, as a list of steps, each with its undo.
//
// Every check runs before the first step, so a refused change applies nothing. Then the steps
// run in this order, and a step that fails undoes those before it, last first (all or nothing):
//
//   order  step                                   undo                      commit
//   1      peerTimeout, cache policy              the old value             -
//   2      a pair's sync rate and fence level     the old values            -
//   3      add a volume                           remove it                 -
//   4      resize a volume (grow, or empty)       resize it back            -
//   5      delete a pair (volumes -> simplex)     recreate it, same bits    -
//   6      change a pair (mirrors, master, mode)  the old pair, its bits    -
//   7      create a pair (full copy)              delete it                 -
//   8      remove a volume (unexported, open)     export it again           close it
//   last   run the new spec                       the old spec              close links to storage
//                                                                           systems no pair shares now
//
// and, for pairs across storage systems (remote-membership.ts), in phases across all the storage
// systems of the process: a mirror joins, then its master adds it (or drops one), then a removed
// mirror leaves; volumes are removed after that.
//
// Refused, with one line and nothing applied:
//   - shrinking a volume that holds data; resizing or removing a volume hosts are attached to;
//   - changing a pair's master while hosts use its volumes; making a volume in use a mirror;
//   - what cannot change without a restart: listeners, dataDir, TLS, the cache size, iSCSI,
//     S-VOL groups, and the mode, master and autoResync of pairs across storage systems.
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { formatSize } from '../util/size.js';
import { DEFAULT_BYPASS } from './cache/blocks.js';
import { mirrorKey } from './local-pair.js';
import type { PairSpec } from './pair.js';
import type { RemotePairSpec } from './remote/context.js';
import type { StorageSystem, StorageSystemSpec, VolumeEntry } from './storage-system.js';
import type { VolumeStack } from './volume-stack.js';
import { PHASE, planRemoteMembership } from './remote-membership.js';

/** A change that is not safe now, or not possible without a restart. Nothing was applied. */
export class ReconfigureRefused extends Error {
  override readonly name = 'ReconfigureRefused';
  readonly code = 'EREFUSED';
}

/** A step failed while applying; the steps before it were undone. */
export class ReconfigureFailed extends Error {
  override readonly name = 'ReconfigureFailed';
  readonly code = 'ERECONF';
}

export interface Step {
  /** What the plan prints, e.g. "ss1: pair1: add mirror 1:11 (full copy, then PAIR)". */
  line: string;
  apply(): Promise<void>;
  undo(): Promise<void>;
  /** Once every step of every storage system succeeded: what may not be undone (closing a removed volume). */
  commit?(): Promise<void>;
  /** When it runs among the steps of every storage system of the process (PHASE); default PHASE.local. */
  phase?: number;
}

const fmtRate = (r: number | undefined) => (r === undefined ? 'unlimited' : `${formatSize(r)}/s`);
const ref = (r: { ss: number; vol: number }) => `${r.ss}:${r.vol}`;

/** The steps that take `ss` from what it runs to `next`; throws ReconfigureRefused. */
export async function planChanges(ss: StorageSystem, next: StorageSystemSpec): Promise<Step[]> {
  const cur = ss.spec;
  const at = `ss${cur.id}`;
  const refuse = (why: string): never => {
    throw new ReconfigureRefused(`storage system ${cur.id}: ${why}`);
  };
  fixedFields(cur, next, refuse);

  const steps: Step[] = [];
  // 1. Settings of the storage system.
  if ((next.peerTimeout ?? 5000) !== (cur.peerTimeout ?? 5000)) {
    const [was, now] = [cur.peerTimeout ?? 5000, next.peerTimeout ?? 5000];
    steps.push({ line: `${at}: peerTimeout ${was} ms -> ${now} ms`, apply: async () => ss.setPeerTimeout(now), undo: async () => ss.setPeerTimeout(was) });
  }
  const [wasPolicy, nowPolicy] = [cur.cache?.policy ?? 'write-back', next.cache?.policy ?? 'write-back'];
  if (cur.cache && wasPolicy !== nowPolicy) {
    steps.push({ line: `${at}: cache policy ${wasPolicy} -> ${nowPolicy}`, apply: () => ss.setCachePolicy(nowPolicy), undo: () => ss.setCachePolicy(wasPolicy) });
  }
  const [wasBypass, nowBypass] = [cur.cache?.bypass ?? DEFAULT_BYPASS, next.cache?.bypass ?? DEFAULT_BYPASS];
  if (cur.cache && next.cache && wasBypass !== nowBypass) {
    const show = (n: number): string => (n > 0 ? formatSize(n) : 'none');
    steps.push({ line: `${at}: cache bypass ${show(wasBypass)} -> ${show(nowBypass)}`, apply: async () => ss.setCacheBypass(nowBypass), undo: async () => ss.setCacheBypass(wasBypass) });
  }

  // Pairs across storage systems: their rate and fence, and which mirrors they have (remote-membership.ts).
  const curRemote = new Map((cur.remotePairs ?? []).map((p) => [p.name, p]));
  const nextRemote = new Map((next.remotePairs ?? []).map((p) => [p.name, p]));
  const membership = planRemoteMembership(ss, cur, next, refuse);
  // Local pairs, by name.
  const curLocal = new Map(cur.pairs.map((p) => [p.name, p]));
  const nextLocal = new Map(next.pairs.map((p) => [p.name, p]));
  const settings = [...curRemote.keys()].filter((n) => nextRemote.has(n)).map((n) => [curRemote.get(n)!, nextRemote.get(n)!] as const);
  const deleted: PairSpec[] = [];
  const changed: [PairSpec, PairSpec][] = [];
  const created: PairSpec[] = [];
  for (const [name, a] of curLocal) {
    const b = nextLocal.get(name);
    if (!b) deleted.push(a);
    else if (layout(a) !== layout(b)) changed.push([a, b]);
    else settings.push([a as RemotePairSpec, b as RemotePairSpec]);
  }
  for (const [name, b] of nextLocal) if (!curLocal.has(name)) created.push(b);

  // 2. Sync rate and fence level.
  for (const [a, b] of settings) {
    const [fa, fb] = [a.fence ?? 'never', b.fence ?? 'never'];
    if (a.syncRate === b.syncRate && fa === fb) continue;
    const what = [a.syncRate !== b.syncRate ? `syncRate ${fmtRate(a.syncRate)} -> ${fmtRate(b.syncRate)}` : '', fa !== fb ? `fence ${fa} -> ${fb}` : ''].filter(Boolean).join(', ');
    const pair = ss.pairs.get(a.name)!;
    steps.push({
      line: `${at}: ${a.name}: ${what}`,
      apply: async () => pair.configure({ syncRate: b.syncRate, fence: fb }),
      undo: async () => pair.configure({ syncRate: a.syncRate, fence: fa }),
    });
  }

  // Volumes, by id.
  const curVols = new Map(cur.volumes.map((v) => [v.id, v]));
  const nextVols = new Map(next.volumes.map((v) => [v.id, v]));
  const pairedNow = new Map(cur.pairs.flatMap((p) => [p.master, ...p.mirrors].map((r) => [r.vol, p.name] as const)));
  for (const p of cur.remotePairs ?? []) for (const r of [p.master, ...p.mirrors]) if (r.ss === cur.id) pairedNow.set(r.vol, p.name);
  const added: VolumeEntry[] = [];
  const removed: number[] = [];
  const resized: [VolumeEntry, VolumeEntry][] = [];
  for (const [id, b] of nextVols) {
    const a = curVols.get(id);
    if (!a) added.push(b);
    else {
      const fixed = (v: VolumeEntry) => JSON.stringify([v.allow ?? null, v.iscsiTarget ?? null, v.iscsiChap ?? null, v.iscsiChapFile ?? null, v.iscsiAllow ?? null]);
      if (fixed(a) !== fixed(b)) refuse(`volume ${id}: its allow list and iSCSI target (with its CHAP and iscsiAllow) cannot change at run time; restart the storage system`);
      if (a.size !== b.size) resized.push([a, b]);
    }
  }
  for (const id of curVols.keys()) if (!nextVols.has(id)) removed.push(id);
  if ((added.length || removed.length) && cur.iscsi) refuse('volumes cannot be added or removed at run time while the storage system is an iSCSI target (its LUNs are fixed); restart it');
  for (const id of removed) {
    const hosts = ss.hostsOn(id);
    if (hosts > 0) refuse(`volume ${id} is in use (${hosts} host connection${hosts > 1 ? 's' : ''}): detach the hosts before removing it`);
  }
  for (const [a, b] of resized) {
    if (pairedNow.has(a.id)) refuse(`volume ${a.id} is in pair ${pairedNow.get(a.id)}: a paired volume cannot be resized at run time`);
    if (b.size < a.size && (await holdsData(ss, a.id))) refuse(`volume ${a.id} holds data: shrinking it from ${formatSize(a.size)} to ${formatSize(b.size)} would lose data; copy it to a new volume instead`);
    const hosts = ss.hostsOn(a.id);
    if (hosts > 0) refuse(`volume ${a.id} is in use (${hosts} host connection${hosts > 1 ? 's' : ''}): hosts see a volume's size when they attach; detach them before resizing it`);
  }

  for (const [a, b] of changed) {
    if (a.master.vol === b.master.vol) continue;
    const hosts = [a.master.vol, ...a.mirrors.map((m) => m.vol), b.master.vol].reduce((n, v) => n + (curVols.has(v) ? ss.hostsOn(v) : 0), 0);
    if (hosts > 0) refuse(`pair ${a.name} is in use (${hosts} host connection${hosts > 1 ? 's' : ''}): its master cannot change from ${ref(a.master)} to ${ref(b.master)} while hosts use it; detach them, or use pair swap`);
  }
  // Which volumes become a mirror they were not: hosts must not be writing to them.
  const mirrorsBefore = new Set(cur.pairs.flatMap((p) => p.mirrors.map((m) => m.vol)));
  for (const b of [...changed.map(([, b]) => b), ...created]) {
    for (const m of b.mirrors) {
      const hosts = curVols.has(m.vol) && !mirrorsBefore.has(m.vol) ? ss.hostsOn(m.vol) : 0;
      if (hosts > 0) refuse(`volume ${m.vol} is in use (${hosts} host connection${hosts > 1 ? 's' : ''}): it would become a mirror of ${b.name}, read-only to hosts; detach them first`);
    }
  }

  // 3. Add volumes.
  for (const v of added) {
    steps.push({
      line: `${at}: add volume ${v.id} (${formatSize(v.size)})`,
      apply: () => ss.addVolume(v),
      undo: () => ss.closeDetached(ss.detachVolume(v.id)),
    });
  }
  // 4. Resize volumes.
  for (const [a, b] of resized) {
    steps.push({ line: `${at}: resize volume ${a.id}: ${formatSize(a.size)} -> ${formatSize(b.size)}`, apply: () => resize(ss, a, b), undo: () => resize(ss, b, a) });
  }
  // 5. Delete pairs: their volumes become simplex, with their data.
  for (const a of deleted) {
    let bits: Map<string, Uint8Array> | undefined;
    steps.push({
      line: `${at}: delete pair ${a.name} (${ref(a.master)} and ${a.mirrors.map(ref).join(', ')} become simplex volumes)`,
      apply: async () => void (bits = await ss.replaceLocalPair(a.name, null)),
      undo: async () => void (await ss.replaceLocalPair(null, a, bits)),
    });
  }
  // 6. Change pairs, each after every other changed pair whose old layout holds a volume it takes:
  // a volume leaves its old pair (which makes it simplex) before it joins its new one.
  for (const [a, b] of orderChanges(changed, refuse)) {
    const newMaster = a.master.vol !== b.master.vol;
    let bits: Map<string, Uint8Array> | undefined;
    steps.push({
      line: `${at}: ${a.name}: ${describeChange(a, b)}`,
      // A new master: every mirror copies it whole (no bits carried over).
      apply: async () => void (bits = await ss.replaceLocalPair(a.name, b, newMaster ? new Map() : undefined)),
      undo: async () => void (await ss.replaceLocalPair(b.name, a, bits)),
    });
  }
  // 7. Create pairs: the mirrors copy the master whole, then the pair is in PAIR.
  for (const b of created) {
    steps.push({
      line: `${at}: create pair ${b.name} (${b.mode}, master ${ref(b.master)}, mirror${b.mirrors.length > 1 ? 's' : ''} ${b.mirrors.map(ref).join(', ')}: full copy, then PAIR)`,
      apply: async () => void (await ss.replaceLocalPair(null, b, new Map())),
      undo: async () => void (await ss.replaceLocalPair(b.name, null)),
    });
  }
  // Mirrors of pairs across storage systems join, change, leave (phases: every storage system's
  // joins run before any master adds the mirror, and masters stop before a mirror leaves).
  steps.push(...membership);
  // 8. Remove volumes: unexported now, closed only once everything applied.
  for (const id of removed) {
    let detached: VolumeStack | undefined;
    steps.push({
      line: `${at}: remove volume ${id}${cur.dataDir ? ` (its file stays in ${cur.dataDir})` : ' (in memory: its data is dropped)'}`,
      phase: PHASE.removeVolume,
      apply: async () => void (detached = ss.detachVolume(id)),
      undo: async () => ss.reattachVolume(detached!),
      commit: () => ss.closeDetached(detached!),
    });
  }
  if (steps.length > 0) {
    // Last: the storage system runs `next` from now on (the next plan starts from it).
    steps.push({
      line: '',
      phase: PHASE.last,
      apply: async () => void (ss.spec = next),
      undo: async () => void (ss.spec = cur),
      // A storage system that no longer shares a pair with this one is not dialled any more.
      commit: () => ss.peers.unlinkUnshared(next),
    });
  }
  return steps;
}

/** Apply steps in order; on a failure undo those applied, last first, and throw ReconfigureFailed. Then commit. */
export async function runSteps(steps: Step[], log: Logger): Promise<void> {
  const done: Step[] = [];
  for (const step of steps) {
    try {
      await step.apply();
      done.push(step);
      if (step.line) log.info({ change: step.line }, `applied: ${step.line}`);
    } catch (e) {
      const undone: string[] = [];
      for (const d of done.reverse()) {
        try {
          await d.undo();
          if (d.line) undone.push(d.line);
        } catch (u) {
          log.error({ change: d.line, err: (u as Error).message }, `could not undo: ${d.line}`);
        }
      }
      const n = undone.length;
      log.warn({ failed: step.line, undone }, `reconfiguration failed at "${step.line}"; undid ${n} change(s)`);
      throw new ReconfigureFailed(`${step.line}: ${(e as Error).message}; nothing applied (undid the ${n} change${n === 1 ? '' : 's'} before it)`, { cause: e });
    }
  }
  for (const step of steps) await step.commit?.();
}

/**
 * The changed pairs in an order where a volume that moves from one pair to another is let go by its
 * old pair first. Each change replaces its pair whole, and the old pair's volumes that the new one
 * leaves become simplex then: a pair changed after another that took one of them would undo that
 * (the volume would come back simplex, and its new pair's mirrors would no longer get its writes).
 * Two pairs that exchange volumes have no such order: refused, with how to apply it in two steps.
 */
export function orderChanges(changed: readonly (readonly [PairSpec, PairSpec])[], refuse: (why: string) => never): [PairSpec, PairSpec][] {
  const vols = (p: PairSpec) => [p.master, ...p.mirrors].map(ref);
  const out: [PairSpec, PairSpec][] = [];
  const left = [...changed] as [PairSpec, PairSpec][];
  while (left.length > 0) {
    // Ready: takes no volume that another change still to run holds in its old layout.
    const i = left.findIndex(([, b]) => {
      const takes = new Set(vols(b));
      return !left.some(([a2]) => a2.name !== b.name && vols(a2).some((v) => takes.has(v)));
    });
    if (i < 0) {
      const names = left.map(([a]) => a.name).join(', ');
      refuse(`pairs ${names} would exchange volumes in one change, and each pair is replaced whole: apply it in two steps (first release the volumes, then pair them again)`);
    }
    out.push(left.splice(i, 1)[0]!);
  }
  return out;
}

/** What a pair is made of, beyond its rate and fence: a difference means a new pair object. */
function layout(p: PairSpec & { autoResync?: boolean }): string {
  return JSON.stringify([p.mode, p.master, p.mirrors, p.autoResync ?? null]);
}

function describeChange(a: PairSpec, b: PairSpec): string {
  const out: string[] = [];
  if (a.master.vol !== b.master.vol) out.push(`master ${ref(a.master)} -> ${ref(b.master)} (every mirror copies it whole)`);
  if (a.mode !== b.mode) out.push(`mode ${a.mode} -> ${b.mode}`);
  const was = new Set(a.mirrors.map(mirrorKey));
  const now = new Set(b.mirrors.map(mirrorKey));
  for (const m of b.mirrors) if (!was.has(mirrorKey(m)) && m.vol !== a.master.vol) out.push(`add mirror ${ref(m)} (full copy, then PAIR)`);
  for (const m of a.mirrors) if (!now.has(mirrorKey(m)) && m.vol !== b.master.vol) out.push(`remove mirror ${ref(m)} (it becomes a simplex volume)`);
  if (a.syncRate !== b.syncRate) out.push(`syncRate ${fmtRate(a.syncRate)} -> ${fmtRate(b.syncRate)}`);
  if ((a.fence ?? 'never') !== (b.fence ?? 'never')) out.push(`fence ${a.fence ?? 'never'} -> ${b.fence ?? 'never'}`);
  return out.join(', ');
}

/** Fields only a restart changes: the same value, or a refusal naming the first that differs. */
function fixedFields(cur: StorageSystemSpec, next: StorageSystemSpec, refuse: (why: string) => never): void {
  const fields: [string, (s: StorageSystemSpec) => unknown][] = [
    ['the NBD address (nbd)', (s) => s.nbd],
    ['nbdSocket', (s) => s.nbdSocket],
    ['the admin address', (s) => s.admin],
    ['dataDir', (s) => s.dataDir],
    ['the cache size', (s) => s.cache?.size],
    ['NBD TLS (tls)', (s) => s.tls],
    ['the allow list', (s) => s.allow],
    ['the peer address', (s) => s.peer],
    ['the peer TLS (security.ca)', (s) => s.peerTls],
    ['the clusterSize', (s) => s.clusterSize],
    ['iSCSI', (s) => s.iscsi],
    ['svolGroups', (s) => s.svolGroups],
    ['faults (use blockmirror fault set/clear at run time)', (s) => s.faults ?? []],
  ];
  for (const [name, get] of fields) {
    if (JSON.stringify(get(cur) ?? null) !== JSON.stringify(get(next) ?? null)) refuse(`${name} cannot change at run time; restart the storage system (blockmirror up) to change it`);
  }
}

/** Does the volume hold anything but zeroes (an allocated extent)? Extents may describe less than asked: ask on from where they stop. */
async function holdsData(ss: StorageSystem, vol: number): Promise<boolean> {
  const dev = ss.volumeDevice(vol)!;
  for (let at = 0; at < dev.size; ) {
    for (const e of await dev.extents(at, dev.size - at)) {
      if ((e.flags & 2) === 0) return true;
      at += e.length;
    }
  }
  return false;
}

/** Resize a volume that is in no pair and has no hosts: a file is truncated or extended; a memory volume is copied. */
async function resize(ss: StorageSystem, from: VolumeEntry, to: VolumeEntry): Promise<void> {
  const old = ss.detachVolume(from.id);
  if (ss.spec.dataDir) {
    await ss.closeDetached(old);
    if (to.size < from.size) fs.truncateSync(path.join(ss.spec.dataDir, `vol${from.id}.img`), to.size);
    await ss.addVolume(to);
    return;
  }
  await ss.addVolume(to);
  const dst = ss.volumeDevice(to.id)!;
  const end = Math.min(from.size, to.size);
  const chunk = Buffer.alloc(1024 * 1024);
  // Extents may describe only part of what was asked: ask again from where they stop.
  for (let at = 0; at < end; ) {
    for (const e of await old.device.extents(at, end - at)) {
      const start = at;
      at = Math.min(end, at + e.length);
      if (e.flags & 2) continue;
      for (let o = start; o < at; o += chunk.length) {
        const buf = chunk.subarray(0, Math.min(chunk.length, at - o));
        await old.device.read(o, buf);
        await dst.write(o, buf);
      }
    }
  }
  await ss.closeDetached(old);
}
