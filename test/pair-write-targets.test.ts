// A pair's master takes WRITE payloads into its own memory (MasterVolume.writeTarget), and a sync
// pair writes its mirrors from those very pages, held until every mirror write has settled.
//
// Differential: each scenario runs twice on fresh rigs, once through write() (the copying path,
// the reference) and once through a write target whose payload lands before the scenario's fault
// appears, and both must leave the same master and mirror bytes, the same bitmap (in memory and in
// the store), the same pair state and the same outcome for the host. Every run ends with each of
// the master's slots in one place: none reserved, held or retired, none free and held.
//
// Then the hold itself: a mirror write that is still waiting when another write replaces the
// master's pages must still write the first payload's bytes.
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { FaultDevice, FaultSet, type VolumeFault } from '../src/blockdev/fault.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { SwitchDevice } from '../src/blockdev/switch.js';
import { GuardDevice } from '../src/blockdev/guard.js';
import type { BlockDevice, WriteTarget } from '../src/blockdev/types.js';
import { MemoryBitmapStore } from '../src/controller/bitmap-store.js';
import { Pair, type FenceLevel } from '../src/controller/pair.js';
import { CountingDevice } from '../src/controller/volume-stats.js';
import { pseudoRandom } from './helpers/clients.js';
import { expectSlotsBack } from './helpers/memory.js';

const PAGE = 4096;
const CLUSTER = 64 * 1024;
const SIZE = 16 * CLUSTER;
const log = pino({ level: 'silent' });

interface Rig {
  pair: Pair;
  store: MemoryBitmapStore;
  mem: MemoryDevice;
  mirrorMems: MemoryDevice[];
  masterFaults: FaultSet;
  mirrorFaults: FaultSet[];
  host: BlockDevice;
}

async function rig(mode: 'sync' | 'async', fence: FenceLevel = 'never', mirrors = 1): Promise<Rig> {
  const base = pseudoRandom(SIZE, 99);
  const mem = new MemoryDevice(SIZE);
  await mem.write(0, base);
  const masterFaults = new FaultSet();
  const mirrorMems = Array.from({ length: mirrors }, () => new MemoryDevice(SIZE));
  for (const m of mirrorMems) await m.write(0, base);
  const mirrorFaults = mirrorMems.map(() => new FaultSet());
  const store = new MemoryBitmapStore(SIZE / CLUSTER, mirrors);
  const pair = new Pair({
    name: 'p',
    mode,
    clusterSize: CLUSTER,
    master: { ref: { ss: 1, vol: 1 }, device: new FaultDevice(mem, masterFaults, 'ss1/vol1') },
    mirrors: mirrorMems.map((m, i) => ({ ref: { ss: 1, vol: 2 + i }, device: new FaultDevice(m, mirrorFaults[i]!, `ss1/vol${2 + i}`) })),
    store,
    loaded: null,
    identical: true,
    fence,
    log,
    cleanDelayMs: 3_600_000,
  });
  return { pair, store, mem, mirrorMems, masterFaults, mirrorFaults, host: pair.masterDevice() };
}

interface Outcome {
  error: string | null;
  master: Buffer;
  mirrors: Buffer[];
  bits: number[][];
  stored: number[][];
  state: string;
}

async function outcome(r: Rig, error: unknown): Promise<Outcome> {
  const master = Buffer.alloc(SIZE);
  await r.mem.read(0, master);
  const mirrors = await Promise.all(
    r.mirrorMems.map(async (m) => {
      const b = Buffer.alloc(SIZE);
      await m.read(0, b);
      return b;
    }),
  );
  return {
    error: error === null ? null : `${(error as { errno?: string }).errno}: ${(error as Error).message}`,
    master,
    mirrors,
    bits: r.pair.mirrors.map((m) => [...m.bitmap.bits]),
    stored: r.pair.mirrors.map((_, i) => [...r.store.image(i)]),
    state: r.pair.state,
  };
}


interface Scenario {
  name: string;
  mode: 'sync' | 'async';
  fence?: FenceLevel;
  mirrors?: number;
  /** Before the payload arrives (the target opens after it). */
  setup?: (r: Rig) => void | Promise<void>;
  /** After the payload has landed, before the commit (the copying path: just before write()). */
  meanwhile?: (r: Rig) => void;
  /** The target path takes no target (the host's request is copied): then only the outcome is compared. */
  noTarget?: boolean;
}

const OFF = CLUSTER + 3 * PAGE + 512; // ragged at both ends: the head and tail pages keep bytes around the write
const LEN = 3 * CLUSTER;
const FROM = 1000; // bytes that came with the header
const err = (f: VolumeFault) => (r: Rig) => r.masterFaults.set(f);

const SCENARIOS: Scenario[] = [
  { name: 'sync, every copy written', mode: 'sync' },
  { name: 'sync with two mirrors', mode: 'sync', mirrors: 2 },
  { name: 'async: the mirror marked Invalid before the master changes', mode: 'async' },
  { name: 'sync, a mirror write fails (fence never: suspended, acknowledged)', mode: 'sync', setup: (r) => r.mirrorFaults[0]!.set({ kind: 'error', ops: ['write'] }) },
  { name: 'sync, a mirror write fails (fence data: refused after the master is written)', mode: 'sync', fence: 'data', setup: (r) => r.mirrorFaults[0]!.set({ kind: 'error', ops: ['write'] }) },
  { name: 'sync, one mirror of two fails', mode: 'sync', mirrors: 2, setup: (r) => r.mirrorFaults[1]!.set({ kind: 'error', ops: ['write'] }) },
  { name: 'sync, a torn mirror write', mode: 'sync', setup: (r) => r.mirrorFaults[0]!.set({ kind: 'torn' }) },
  { name: 'sync, a slow mirror', mode: 'sync', setup: (r) => r.mirrorFaults[0]!.set({ kind: 'delay', ms: 5 }) },
  { name: 'sync, fence data and already suspended: refused before any copy changes', mode: 'sync', fence: 'data', setup: (r) => r.pair.suspend('test') },
  { name: 'split (PSUS): the master alone, tracked', mode: 'sync', setup: (r) => r.pair.split() },
  { name: 'sync, the master fails once the payload is in (error set meanwhile)', mode: 'sync', meanwhile: err({ kind: 'error', ops: ['write'] }) },
  { name: 'sync, the master\'s write torn (set meanwhile)', mode: 'sync', meanwhile: err({ kind: 'torn' }) },
  { name: 'async, the master fails once the payload is in', mode: 'async', meanwhile: err({ kind: 'error', ops: ['write'] }) },
  { name: 'sync, the pair retired meanwhile (a role change)', mode: 'sync', meanwhile: (r) => r.pair.retire() },
  { name: 'sync, a fault set on the master already: no target, the copy path', mode: 'sync', setup: err({ kind: 'delay', ms: 1 }), noTarget: true },
];

async function runCopy(s: Scenario, data: Buffer): Promise<Outcome> {
  const r = await rig(s.mode, s.fence, s.mirrors);
  await s.setup?.(r);
  s.meanwhile?.(r);
  let error: unknown = null;
  await r.host.write(OFF, data).catch((e: unknown) => (error = e));
  return outcome(r, error);
}

async function runTarget(s: Scenario, data: Buffer): Promise<{ out: Outcome; took: boolean; mem: MemoryDevice }> {
  const r = await rig(s.mode, s.fence, s.mirrors);
  await s.setup?.(r);
  const t: WriteTarget | null = r.host.writeTarget!(OFF, LEN, FROM);
  let error: unknown = null;
  if (t) {
    let at = FROM;
    for (const p of t.pieces) at += data.copy(p, 0, at);
    s.meanwhile?.(r);
    await t.commit(data.subarray(0, FROM)).catch((e: unknown) => (error = e));
  } else {
    s.meanwhile?.(r);
    await r.host.write(OFF, data).catch((e: unknown) => (error = e));
  }
  return { out: await outcome(r, error), took: t !== null, mem: r.mem };
}

describe('a pair master\'s write target', () => {
  for (const s of SCENARIOS) {
    it(`leaves the copies, the bitmap and the host's answer as write() does: ${s.name}`, async () => {
      const data = pseudoRandom(LEN, 7);
      const want = await runCopy(s, data);
      const got = await runTarget(s, data);
      expect(got.took).toBe(!s.noTarget);
      expect(got.out.error).toBe(want.error);
      expect(got.out.state).toBe(want.state);
      expect(got.out.bits).toEqual(want.bits);
      expect(got.out.stored).toEqual(want.stored);
      expect(got.out.master.equals(want.master)).toBe(true);
      for (let i = 0; i < want.mirrors.length; i++) expect(got.out.mirrors[i]!.equals(want.mirrors[i]!), `mirror ${i}`).toBe(true);
      expectSlotsBack(got.mem);
    });
  }

  it('gives the target back unused when the write is refused before the master (fence data, suspended), and takes none while the store cannot hold it for a sync mirror', async () => {
    const r = await rig('sync', 'data');
    r.pair.suspend('test');
    const t = r.host.writeTarget!(0, CLUSTER, 0)!;
    expect(r.mem.reservedBytes).toBe(CLUSTER);
    await expect(t.commit([])).rejects.toMatchObject({ errno: 'EIO' });
    expectSlotsBack(r.mem);
    // A layer below that opens targets but cannot hold them: a sync pair refuses the target (the host's write is copied).
    const plain: BlockDevice = Object.assign(Object.create(r.mem) as MemoryDevice, {
      writeTarget: (o: number, l: number, f: number) => {
        const below = r.mem.writeTarget(o, l, f)!;
        return { pieces: below.pieces, commit: below.commit, abort: below.abort };
      },
    });
    const p = new Pair({ name: 'q', mode: 'sync', clusterSize: CLUSTER, master: { ref: { ss: 1, vol: 1 }, device: plain }, mirrors: [{ ref: { ss: 1, vol: 2 }, device: new MemoryDevice(SIZE) }], store: new MemoryBitmapStore(16, 1), loaded: null, identical: true, log });
    expect(p.masterDevice().writeTarget!(0, CLUSTER, 0)).toBeNull();
    expectSlotsBack(r.mem);
  });

  it('async: marks the mirror\'s clusters Invalid, in memory and in the store, before the master\'s pages change', async () => {
    const r = await rig('async');
    const seen: boolean[] = [];
    const real = r.mem.writeTarget.bind(r.mem);
    r.mem.writeTarget = (o: number, l: number, f: number): WriteTarget | null => {
      const t = real(o, l, f)!;
      return {
        pieces: t.pieces,
        commit: (head, fua) => {
          for (let c = Math.floor(OFF / CLUSTER); c <= Math.floor((OFF + LEN - 1) / CLUSTER); c++) {
            seen.push(r.pair.mirrors[0]!.bitmap.isInvalid(c), (r.store.image(0)[c >>> 3]! & (1 << (c & 7))) !== 0);
          }
          return t.commit(head, fua);
        },
        abort: t.abort,
      };
    };
    const t = r.host.writeTarget!(OFF, LEN, 0)!;
    await t.commit([]);
    expect(seen.length).toBe(8); // four clusters, two bits each
    expect(seen.every(Boolean)).toBe(true);
    expectSlotsBack(r.mem);
  });

  it('writes a slow mirror from the payload\'s pages even when a later write replaces them on the master meanwhile', async () => {
    const r = await rig('sync');
    r.mirrorFaults[0]!.set({ kind: 'delay', ms: 30 });
    const data = pseudoRandom(2 * CLUSTER, 3);
    const t = r.host.writeTarget!(0, data.length, 0)!;
    data.copy(t.pieces[0]!);
    const done = t.commit([]);
    // The master has the payload now; the mirror's write waits. Another writer replaces those pages
    // (straight into the store: the pair's range locks are above it, and a trim or a write of the
    // neighbouring bytes of a page would do the same to the pages the mirror is about to read).
    await new Promise((resolve) => setImmediate(resolve));
    expect(r.mem.heldBytes).toBe(data.length);
    await r.mem.write(0, Buffer.alloc(data.length, 0xcd));
    await r.mem.trim(0, CLUSTER);
    await done;
    const mirror = Buffer.alloc(data.length);
    await r.mirrorMems[0]!.read(0, mirror);
    expect(mirror.equals(data)).toBe(true);
    expect(r.pair.state).toBe('PAIR');
    expectSlotsBack(r.mem);
  });

  it('reaches the master\'s store through the host stack (counters, guard, switch), counted as a write', async () => {
    const r = await rig('sync');
    const counting = new CountingDevice(new GuardDevice(new SwitchDevice(r.host), () => null));
    const data = pseudoRandom(CLUSTER, 5);
    const t = counting.writeTarget(0, CLUSTER, 0)!;
    expect(t).not.toBeNull();
    data.copy(t.pieces[0]!);
    await t.commit([]);
    expect(counting.counters).toMatchObject({ writeOps: 1, writeBytes: CLUSTER });
    const back = Buffer.alloc(CLUSTER);
    await r.mirrorMems[0]!.read(0, back);
    expect(back.equals(data)).toBe(true);
    // A closed guard offers no target, and one that closes before the commit refuses it and gives the target back.
    let why: string | null = 'fenced';
    const guarded = new GuardDevice(r.host, () => why);
    expect(guarded.writeTarget(0, CLUSTER, 0)).toBeNull();
    why = null;
    const g = guarded.writeTarget(0, CLUSTER, 0)!;
    why = 'fenced';
    await expect(g.commit([])).rejects.toMatchObject({ errno: 'ESHUTDOWN' });
    expectSlotsBack(r.mem);
  });

  it('sends a target taken before a switch to the new layer below, copied, as write() would go then', async () => {
    const r = await rig('sync');
    const other = new MemoryDevice(SIZE);
    const sw = new SwitchDevice(r.host);
    const t = sw.writeTarget(0, CLUSTER, 0)!;
    t.pieces[0]!.fill(0x42);
    await sw.hold();
    const done = t.commit([]);
    sw.release(other);
    await done;
    const got = Buffer.alloc(CLUSTER);
    await other.read(0, got);
    expect(got.equals(Buffer.alloc(CLUSTER, 0x42))).toBe(true);
    await r.mem.read(0, got);
    expect(got.equals(Buffer.alloc(CLUSTER, 0x42))).toBe(false);
    expectSlotsBack(r.mem);
  });
});
