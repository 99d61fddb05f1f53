// The sync ETA, computed in the controller from the sync daemon's measured copy rate: the meter
// on a fake clock, the ETA's rules, and a real pair copying under a syncRate while host writes
// keep coming (the case where the dashboard used to show "ETA —").
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pino } from 'pino';
import { describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FileBitmapStore } from '../src/controller/bitmap-store.js';
import { CopyRateMeter, WINDOW_MS, syncEta } from '../src/controller/copy-rate.js';
import { Pair } from '../src/controller/pair.js';
import { SyncDaemon } from '../src/controller/sync-daemon.js';
import { eta, type ClusterStatus } from '../src/cli/status.js';
import { CLI, freePort, run, startUp } from './helpers/servers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function fakeClock() {
  let t = 1_000_000;
  return { now: () => t, advance: (ms: number) => (t += ms) };
}

describe('CopyRateMeter', () => {
  it('measures a steady copy as its bytes per second', () => {
    const clock = fakeClock();
    const meter = new CopyRateMeter(clock.now);
    // 64 KiB every 10 ms = 6.25 MiB/s, for longer than the window.
    for (let i = 0; i < 2000; i++) {
      meter.record(64 * KiB);
      clock.advance(10);
    }
    expect(meter.rate() / (6.25 * MiB)).toBeCloseTo(1, 1);
  });

  it('averages bursts: a copy limited to 1 MiB/s that copies each second at once reads 1 MiB/s', () => {
    const clock = fakeClock();
    const meter = new CopyRateMeter(clock.now);
    for (let s = 0; s < 30; s++) {
      for (let i = 0; i < 16; i++) meter.record(64 * KiB);
      clock.advance(1000);
    }
    expect(meter.rate() / MiB).toBeCloseTo(1, 1);
  });

  it('falls to 0 once nothing was copied for a whole window', () => {
    const clock = fakeClock();
    const meter = new CopyRateMeter(clock.now);
    meter.record(MiB);
    clock.advance(100);
    expect(meter.rate()).toBeGreaterThan(0);
    clock.advance(WINDOW_MS);
    expect(meter.rate()).toBe(0);
    expect(new CopyRateMeter(clock.now).rate()).toBe(0);
  });

  it('does not read one copy an instant ago as an enormous rate', () => {
    const clock = fakeClock();
    const meter = new CopyRateMeter(clock.now);
    meter.record(64 * KiB);
    clock.advance(1);
    expect(meter.rate()).toBe(256 * KiB); // 64 KiB over the 250 ms minimum span
  });
});

describe('the ETA in status', () => {
  it('reads as seconds, minutes or hours, and "-" when in sync or unknown', () => {
    expect([eta(0), eta(null), eta(undefined), eta(42), eta(187), eta(7500)]).toEqual(['-', '-', '-', '42s', '3m07s', '2h05m']);
  });
});

describe('syncEta', () => {
  it('is 0 in sync, null while suspended or unmeasured, else the Invalid bytes over the rate, rounded up', () => {
    expect(syncEta('PAIR', 0, 0)).toBe(0);
    expect(syncEta('PSUS', 0, 0)).toBe(0);
    expect(syncEta('PSUS', MiB, MiB)).toBeNull();
    expect(syncEta('PSUE', MiB, MiB)).toBeNull();
    expect(syncEta('COPY', MiB, 0)).toBeNull();
    expect(syncEta('COPY', 10 * MiB, 3 * MiB)).toBe(4);
    expect(syncEta('PAIR', MiB, MiB)).toBe(1);
  });
});

describe('a pair copying under a syncRate', () => {
  it('reports the copy rate and an ETA while host writes keep marking clusters Invalid, then 0 in sync', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-eta-'));
    const CLUSTER = 4 * KiB;
    const SIZE = 2 * MiB;
    const { store, loaded } = await FileBitmapStore.open(path.join(dir, 'p.bitmap'), { clusterSize: CLUSTER, clusters: SIZE / CLUSTER, mirrors: 1 });
    const daemon = new SyncDaemon({ log: pino({ level: 'silent' }) });
    const pair = new Pair({
      name: 'p',
      mode: 'async',
      clusterSize: CLUSTER,
      master: { ref: { ss: 1, vol: 1 }, device: new MemoryDevice(SIZE) },
      mirrors: [{ ref: { ss: 1, vol: 2 }, device: new MemoryDevice(SIZE) }],
      store,
      loaded,
      identical: false,
      syncRate: MiB,
      log: pino({ level: 'silent' }),
      onInvalid: () => daemon.wake(),
    });
    daemon.add(pair);
    try {
      let writes = 0;
      const host = pair.masterDevice();
      // Host writes while copying: the Invalid count rises as well as falls.
      while (pair.mirrors[0]!.copiedBytes < 256 * KiB) {
        await host.write((writes++ * 7 * CLUSTER) % SIZE, Buffer.alloc(CLUSTER, writes & 0xff));
        await new Promise((r) => setTimeout(r, 5));
      }
      const m = pair.status().mirrors[0]!;
      expect(pair.state).toBe('COPY');
      expect(m.invalidClusters).toBeGreaterThan(0);
      expect(m.copyRate).toBeGreaterThan(0);
      expect(m.etaSeconds).toBeGreaterThanOrEqual(1);

      await expect.poll(() => pair.state, { timeout: 20_000, interval: 50 }).toBe('PAIR');
      expect(pair.status().mirrors[0]).toMatchObject({ invalidClusters: 0, etaSeconds: 0 });

      await pair.split();
      await host.write(0, Buffer.alloc(CLUSTER, 0x55));
      expect(pair.status().mirrors[0]).toMatchObject({ invalidClusters: 1, etaSeconds: null }); // nothing is copied until a resync
      await pair.resync();
      await expect.poll(() => pair.state, { timeout: 20_000, interval: 50 }).toBe('PAIR');
      expect(pair.status().mirrors[0]).toMatchObject({ invalidClusters: 0, etaSeconds: 0 });
    } finally {
      await daemon.stop();
      await pair.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('status --json', () => {
  it('carries each mirror\'s copy rate and ETA from the storage system', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-eta-up-'));
    const [nbd, admin] = await Promise.all([freePort(), freePort()]);
    const file = path.join(dir, 'c.yaml');
    fs.writeFileSync(
      file,
      `storageSystems:
  - { id: 1, nbd: "127.0.0.1:${nbd}", admin: "127.0.0.1:${admin}", volumes: [ { id: 1, size: 64MiB }, { id: 2, size: 64MiB } ] }
pairs:
  - { name: p, mode: async, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ], syncRate: 1MiB }
`,
    );
    const up = await startUp(file, [nbd, admin]);
    try {
      // 32 MiB for the sync daemon to copy at 1 MiB/s: still copying after the slowest status calls of a loaded machine.
      const w = await run('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${nbd}/vol1`, '-c', 'write -P 0xab 0 32M']);
      expect(w.code).toBe(0);
      const mirror = async () => {
        const r = await run(process.execPath, [CLI, 'status', '-c', file, '--json']);
        expect(r.code).toBe(0);
        return (JSON.parse(r.stdout) as ClusterStatus).pairs[0]!.mirrors[0]!;
      };
      await expect.poll(async () => (await mirror()).copyRate, { timeout: 60_000, interval: 200 }).toBeGreaterThan(0);
      const m = await mirror();
      expect(m.invalidClusters).toBeGreaterThan(0);
      expect(m.etaSeconds).toBeGreaterThanOrEqual(1);
      // The table shows it too, in its own column.
      const text = (await run(process.execPath, [CLI, 'status', '-c', file])).stdout;
      expect(text).toMatch(/ +COPIED +ETA\n +p +async +COPY +1:1 +1:2 +\d+ +[\d.]+% +[\d.]+[KMG]?i?B +(\d+s|\d+m\d\ds)\n/);
    } finally {
      await up.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
