// The sync daemon's pace under host load (src/controller/sync-daemon.ts): one cluster per gap
// while hosts write, however often writes wake it, then full speed once they stop. Simulated time
// (fake timers, performance.now included), so the count of copies per span of simulated time is
// exact and nothing here depends on the machine's speed.
import { afterEach, describe, expect, it, vi } from 'vitest';
import pino from 'pino';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { MemoryBitmapStore } from '../src/controller/bitmap-store.js';
import { Pair } from '../src/controller/pair.js';
import { SyncDaemon } from '../src/controller/sync-daemon.js';

const CLUSTER = 64 * 1024;
const CLUSTERS = 64;
const SIZE = CLUSTER * CLUSTERS;
const log = pino({ level: 'silent' });

afterEach(() => {
  vi.useRealTimers();
});

function rig() {
  const master = new MemoryDevice(SIZE);
  const mirror = new MemoryDevice(SIZE);
  const daemon = new SyncDaemon({ log });
  const pair = new Pair({
    name: 'p', mode: 'async', clusterSize: CLUSTER,
    master: { ref: { ss: 1, vol: 1 }, device: master },
    mirrors: [{ ref: { ss: 1, vol: 2 }, device: mirror }],
    store: new MemoryBitmapStore(CLUSTERS, 1),
    loaded: null, identical: true, log, cleanDelayMs: 3_600_000,
    onInvalid: () => daemon.wake(),
    onHostWrite: () => daemon.noteHostIo(),
  });
  daemon.add(pair);
  const copies = vi.spyOn(mirror, 'write');
  return { master, mirror, daemon, pair, host: pair.masterDevice(), copies };
}

describe('the sync daemon under host load', () => {
  it('copies one cluster per 20 ms while hosts write, however often their writes wake it, then the rest at full speed once they stop', async () => {
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'setImmediate', 'clearImmediate', 'performance'] });
    const { master, mirror, daemon, pair, host, copies } = rig();
    // A steady load: a write every millisecond for 200 ms, each to a cluster the last copy may have
    // just made Valid, so each makes one Invalid and wakes the daemon.
    for (let t = 0; t < 200; t++) {
      await host.write((t % CLUSTERS) * CLUSTER + 512, Buffer.alloc(4096, (t % 250) + 1));
      await vi.advanceTimersByTimeAsync(1);
    }
    // 200 ms at one copy per 20 ms (from the end of one to the start of the next): at most 11.
    // Without the gap kept on wake-ups, the daemon copied at almost every write.
    expect(copies.mock.calls.length).toBeGreaterThanOrEqual(5); // the guaranteed minimum rate
    expect(copies.mock.calls.length).toBeLessThanOrEqual(11);
    expect(pair.state).toBe('COPY');
    // The load stops: the daemon catches up at full speed, in runs of several clusters.
    await vi.advanceTimersByTimeAsync(500);
    expect(pair.state).toBe('PAIR');
    vi.useRealTimers();
    await daemon.idle();
    const a = Buffer.alloc(SIZE);
    const b = Buffer.alloc(SIZE);
    await master.read(0, a);
    await mirror.read(0, b);
    expect(b.equals(a)).toBe(true);
    await daemon.stop();
    await pair.close();
  });
});
