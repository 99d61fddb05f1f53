// Host I/O counters of one volume: a thin BlockDevice wrapper at the top of
// the stack, so they count what hosts asked for, not what mirroring did.
import { FilterDevice } from '../blockdev/filter.js';
import { payloadLength, type Payload, type WriteTarget } from '../blockdev/types.js';

/** The front ends hosts reach a volume through: the `protocol` label of the I/O metrics. */
export type Protocol = 'nbd' | 'iscsi';
export const PROTOCOLS: readonly Protocol[] = ['nbd', 'iscsi'];

export interface IoCounters {
  readBytes: number;
  writeBytes: number;
  readOps: number;
  writeOps: number;
}

/**
 * Upper bounds of the latency buckets, in seconds: 1-2.5-5 steps from 10 µs
 * to 10 s, the le values of a Prometheus histogram. A last bucket holds what
 * is slower than 10 s.
 */
export const LATENCY_BOUNDS: readonly number[] = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];
const BOUNDS_MS = LATENCY_BOUNDS.map((s) => s * 1000);

/**
 * Fixed-bucket latency counts, cheap enough for every request: a few
 * comparisons and two additions. Readers (the /metrics endpoint) add the
 * counts up into cumulative buckets themselves.
 */
export class LatencyHistogram {
  /** counts[i]: requests that took at most LATENCY_BOUNDS[i] (and more than the bound before); the last: more than 10 s. */
  readonly counts = new Float64Array(LATENCY_BOUNDS.length + 1);
  /** Total time, seconds. */
  sum = 0;

  observe(ms: number): void {
    let i = 0;
    while (i < BOUNDS_MS.length && ms > BOUNDS_MS[i]!) i++;
    this.counts[i]!++;
    this.sum += ms / 1000;
  }
}

export class CountingDevice extends FilterDevice {
  readonly counters: IoCounters = { readBytes: 0, writeBytes: 0, readOps: 0, writeOps: 0 };
  /** Time from a request reaching the volume to its completion: the controller's service time, NBD framing excluded. */
  readonly latency = { read: new LatencyHistogram(), write: new LatencyHistogram() };

  override async read(offset: number, dest: Buffer): Promise<void> {
    const t0 = performance.now();
    await this.next.read(offset, dest);
    this.latency.read.observe(performance.now() - t0);
    this.counters.readOps++;
    this.counters.readBytes += dest.length;
  }

  override async write(offset: number, data: Payload, fua?: boolean): Promise<void> {
    const t0 = performance.now();
    await this.next.write(offset, data, fua);
    this.latency.write.observe(performance.now() - t0);
    this.counters.writeOps++;
    this.counters.writeBytes += payloadLength(data);
  }

  /** The target below, counted and timed at commit, as write() would be called then. */
  writeTarget(offset: number, length: number, from: number): WriteTarget | null {
    const below = this.next.writeTarget?.(offset, length, from);
    if (!below) return null;
    return {
      pieces: below.pieces,
      commit: async (head: Payload, fua?: boolean): Promise<void> => {
        const t0 = performance.now();
        await below.commit(head, fua);
        this.latency.write.observe(performance.now() - t0);
        this.counters.writeOps++;
        this.counters.writeBytes += length;
      },
      abort: () => below.abort(),
    };
  }
}

/** A volume's host I/O, one CountingDevice per front end (volume-stack.ts builds them). */
export type HostIo = Record<Protocol, CountingDevice>;

/** What hosts asked of a volume over every protocol together (status, `blockmirror status`). */
export function totalCounters(io: HostIo): IoCounters {
  const t: IoCounters = { readBytes: 0, writeBytes: 0, readOps: 0, writeOps: 0 };
  for (const p of PROTOCOLS) {
    const c = io[p].counters;
    t.readBytes += c.readBytes;
    t.writeBytes += c.writeBytes;
    t.readOps += c.readOps;
    t.writeOps += c.writeOps;
  }
  return t;
}
