// The fault layer (src/blockdev/fault.ts) and the rules every way of setting a fault shares
// (src/controller/fault-table.ts): each kind does what its name says, only to the requests it
// matches, and clearing it puts the volume back as it was.
import { afterEach, describe, expect, it, vi } from 'vitest';
import { FaultDevice, FaultSet } from '../src/blockdev/fault.js';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FaultSpecError, parseByteRange, parseFaultTarget, resolveFault } from '../src/controller/fault-table.js';
import { parseConfig } from '../src/cluster/config.js';

const SIZE = 1024 * 1024;

function rig(random?: () => number) {
  const mem = new MemoryDevice(SIZE);
  const faults = new FaultSet(random);
  return { mem, faults, dev: new FaultDevice(mem, faults, 'ss1/vol8') };
}

async function readAll(dev: { read(o: number, b: Buffer): Promise<void> }, offset: number, n: number): Promise<Buffer> {
  const b = Buffer.alloc(n);
  await dev.read(offset, b);
  return b;
}

afterEach(() => {
  vi.useRealTimers();
});

describe('FaultDevice', () => {
  it('fails only the ops and the byte range of an error fault, and forwards everything else untouched', async () => {
    const { dev, faults, mem } = rig();
    faults.set({ kind: 'error', ops: ['write'], range: { start: 65536, length: 65536 } });
    await expect(dev.write(65536 + 512, Buffer.alloc(512, 1))).rejects.toMatchObject({ errno: 'EIO', message: expect.stringContaining('ss1/vol8') });
    await expect(dev.zero(60000, 10000)).rejects.toMatchObject({ errno: 'EIO' });
    await dev.write(0, Buffer.alloc(4096, 2));
    await dev.write(131072, Buffer.alloc(4096, 3));
    await dev.flush();
    expect(await readAll(dev, 65536, 4096)).toEqual(Buffer.alloc(4096));
    expect(await readAll(mem, 0, 4096)).toEqual(Buffer.alloc(4096, 2));
    expect(await readAll(mem, 131072, 4096)).toEqual(Buffer.alloc(4096, 3));
    faults.clear();
    await dev.write(65536, Buffer.alloc(512, 4));
    expect(await readAll(mem, 65536, 512)).toEqual(Buffer.alloc(512, 4));
  });

  it('hits a request with the probability given, by the dice it is handed', async () => {
    const rolls = [0.1, 0.9, 0.49, 0.5];
    const { dev, faults } = rig(() => rolls.shift()!);
    faults.set({ kind: 'error', ops: ['read'], probability: 0.5 });
    const outcomes: string[] = [];
    for (let i = 0; i < 4; i++) outcomes.push(await dev.read(0, Buffer.alloc(512)).then(() => 'ok', (e: { errno: string }) => e.errno));
    expect(outcomes).toEqual(['EIO', 'ok', 'EIO', 'ok']);
  });

  it('holds requests while offline (hang) and lets them finish when cleared; fails them at once in fail mode', async () => {
    const { dev, faults, mem } = rig();
    faults.set({ kind: 'offline' });
    let done = false;
    const w = dev.write(0, Buffer.alloc(512, 7)).then(() => (done = true));
    for (let i = 0; i < 20; i++) await new Promise((r) => setImmediate(r));
    expect(done).toBe(false);
    expect(await readAll(mem, 0, 512)).toEqual(Buffer.alloc(512));
    faults.clear('offline');
    await w;
    expect(await readAll(mem, 0, 512)).toEqual(Buffer.alloc(512, 7));
    faults.set({ kind: 'offline', mode: 'fail' });
    await expect(dev.read(0, Buffer.alloc(512))).rejects.toMatchObject({ errno: 'EIO', message: expect.stringContaining('offline') });
    await expect(dev.extents(0, 4096)).rejects.toMatchObject({ errno: 'EIO' });
  });

  it('adds the delay of a delay fault before the request goes on', async () => {
    vi.useFakeTimers();
    const { dev, faults, mem } = rig();
    faults.set({ kind: 'delay', ms: 200 });
    let done = false;
    const w = dev.write(0, Buffer.alloc(512, 9)).then(() => (done = true));
    await vi.advanceTimersByTimeAsync(199);
    expect(done).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    await w;
    expect(done).toBe(true);
    expect(await readAll(mem, 0, 512)).toEqual(Buffer.alloc(512, 9));
  });

  it('flips one bit per sector read inside a corrupt range, and none outside it or on the medium', async () => {
    const { dev, faults, mem } = rig();
    await mem.write(0, Buffer.alloc(8192, 0x55));
    faults.set({ kind: 'corrupt', range: { start: 4096, length: 2048 } });
    const got = await readAll(dev, 0, 8192);
    const flipped = [...got.keys()].filter((i) => got[i] !== 0x55);
    expect(flipped).toEqual([4096, 4608, 5120, 5632]);
    expect(flipped.every((i) => (got[i]! ^ 0x55) === 1)).toBe(true);
    expect(await readAll(mem, 0, 8192)).toEqual(Buffer.alloc(8192, 0x55));
  });

  it('persists only a sector-aligned prefix of a torn write, and reports the write failed', async () => {
    const { dev, faults, mem } = rig();
    faults.set({ kind: 'torn' });
    await expect(dev.write(0, [Buffer.alloc(1024, 1), Buffer.alloc(1024, 2)])).rejects.toMatchObject({ errno: 'EIO', message: expect.stringContaining('1024 of 2048') });
    expect(await readAll(mem, 0, 2048)).toEqual(Buffer.concat([Buffer.alloc(1024, 1), Buffer.alloc(1024)]));
  });

  it('hands out the memory store\'s write target only while no fault is set, and its commit writes the landed bytes', async () => {
    const { dev, faults, mem } = rig();
    faults.set({ kind: 'delay', ms: 1 });
    expect(dev.writeTarget(0, 65536, 0)).toBeNull();
    faults.clear();
    const t = dev.writeTarget(0, 65536, 512)!;
    expect(t).not.toBeNull();
    expect(mem.reservedBytes).toBeGreaterThan(0);
    for (const p of t.pieces) p.fill(7);
    await t.commit(Buffer.alloc(512, 6));
    expect(await readAll(mem, 0, 65536)).toEqual(Buffer.concat([Buffer.alloc(512, 6), Buffer.alloc(65536 - 512, 7)]));
    expect(mem.reservedBytes).toBe(0);
  });

  it('applies a fault set while a payload lands in a write target: an error fails the commit, leaves the volume as it was and gives the memory back', async () => {
    const { dev, faults, mem } = rig();
    await mem.write(0, Buffer.alloc(65536, 1));
    const t = dev.writeTarget(0, 65536, 0)!;
    for (const p of t.pieces) p.fill(2);
    faults.set({ kind: 'error', ops: ['write'] });
    await expect(t.commit([])).rejects.toMatchObject({ errno: 'EIO', message: expect.stringContaining('ss1/vol8') });
    expect(await readAll(mem, 0, 65536)).toEqual(Buffer.alloc(65536, 1));
    expect(mem.reservedBytes).toBe(0);
  });

  it('applies a torn-write fault set while a payload lands in a write target to the whole payload, the bytes that came with the header first', async () => {
    const { dev, faults, mem } = rig();
    const t = dev.writeTarget(0, 65536, 1024)!;
    for (const p of t.pieces) p.fill(4);
    faults.set({ kind: 'torn' });
    await expect(t.commit(Buffer.alloc(1024, 3))).rejects.toMatchObject({ errno: 'EIO', message: expect.stringContaining('32768 of 65536') });
    const want = Buffer.concat([Buffer.alloc(1024, 3), Buffer.alloc(32768 - 1024, 4), Buffer.alloc(32768)]);
    expect(await readAll(mem, 0, 65536)).toEqual(want);
    expect(mem.reservedBytes).toBe(0);
  });
});

describe('fault requests', () => {
  it('reads volume and link targets, and refuses anything else with what a target looks like', () => {
    expect(parseFaultTarget('1:8')).toEqual({ type: 'volume', ss: 1, vol: 8 });
    expect(parseFaultTarget('link:2-1')).toEqual({ type: 'link', a: 1, b: 2 });
    expect(() => parseFaultTarget('vol8')).toThrow('fault target "vol8" is not valid: a target is SS:VOL (e.g. 1:8) or link:A-B (e.g. link:1-2)');
    expect(() => parseFaultTarget('link:3-3')).toThrow('a link joins two different storage systems');
  });

  it('reads ranges with sizes and refuses an empty one', () => {
    expect(parseByteRange('1MiB:64KiB')).toEqual({ start: 1048576, length: 65536 });
    expect(() => parseByteRange('5:0')).toThrow('range "5:0": the length must be greater than 0');
    expect(() => parseByteRange('12')).toThrow('expected START:LEN');
  });

  it('refuses kinds and options that do not fit the target', () => {
    expect(() => resolveFault({ target: 'link:1-2', kind: 'error' })).toThrow(new FaultSpecError('fault error on link:1-2: a link takes delay, drop, reset'));
    expect(() => resolveFault({ target: '1:8', kind: 'drop' })).toThrow('a volume takes error, delay, offline, corrupt, torn');
    expect(() => resolveFault({ target: '1:8', kind: 'delay' })).toThrow('give the delay with --ms N');
    expect(() => resolveFault({ target: '1:8', kind: 'error', ms: 5 })).toThrow('--ms and --jitter apply to delay only');
    expect(() => resolveFault({ target: 'link:1-2', kind: 'drop', op: 'read' })).toThrow('--op applies to volumes, not links');
    expect(resolveFault({ target: '1:8', kind: 'error', op: 'write', probability: 0.25 })).toEqual({ target: { type: 'volume', ss: 1, vol: 8 }, volume: { kind: 'error', ops: ['write'], probability: 0.25 } });
  });

  it('takes faults from the YAML and refuses a bad one with its key path', () => {
    const base = `
storageSystems:
  - { id: 1, nbd: 127.0.0.1:0, admin: 127.0.0.1:0, peer: 127.0.0.1:7001, volumes: [ { id: 8, size: 1MiB }, { id: 7, size: 1MiB } ] }
  - { id: 2, nbd: 127.0.0.1:0, admin: 127.0.0.1:0, peer: 127.0.0.1:7002, volumes: [ { id: 3, size: 1MiB } ] }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 8 }, mirrors: [ { ss: 2, vol: 3 } ] }
`;
    const cfg = parseConfig(`${base}faults:\n  - { target: "1:7", kind: error, op: write, range: "0:64KiB" }\n  - { target: link:1-2, kind: delay, ms: 20 }\n`, 'c.yaml', '/tmp');
    expect(cfg.faults).toEqual([
      { target: '1:7', kind: 'error', op: 'write', range: { start: 0, length: 65536 } },
      { target: 'link:1-2', kind: 'delay', ms: 20 },
    ]);
    expect(() => parseConfig(`${base}faults:\n  - { target: "1:9", kind: error }\n`, 'c.yaml', '/tmp')).toThrow('c.yaml: faults[0].target: storage system 1 has no volume 9 (fault target 1:9)');
    expect(() => parseConfig(`${base}faults:\n  - { target: "1:8", kind: flood }\n`, 'c.yaml', '/tmp')).toThrow('c.yaml: faults[0]: kind: "flood" is not a fault kind (volumes: error, delay, offline, corrupt, torn; links: delay, drop, reset)');
    expect(() => parseConfig(`${base}faults:\n  - { target: "1:8", kind: error, rnage: "0:1" }\n`, 'c.yaml', '/tmp')).toThrow('faults[0].rnage: unknown key (did you mean "range"?)');
  });
});
