// A network fuzzer for every parser a client or a peer can reach: mutated and generated inputs
// sent to a live `blockmirror up`, each on its own connection, with oracles checked as it runs:
//   - the process is alive, and its resident memory stays under a bound;
//   - every connection is closed or answered by the server within a deadline (no hang);
//   - a well-behaved client on another volume keeps reading back what it wrote (others unaffected).
// Inputs come from a seeded xorshift generator, so a finding is replayed from (target, seed, index).
import net from 'node:net';

export class Rng {
  constructor(private s: number) {
    if (this.s === 0) this.s = 0x9e3779b9;
  }
  next(): number {
    let x = this.s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.s = x >>> 0;
    return this.s;
  }
  below(n: number): number {
    return this.next() % n;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = this.next() & 0xff;
    return b;
  }
}

const INTERESTING_U32 = [0, 1, 2, 0x7f, 0x80, 0xff, 0x100, 0x1000, 0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff];
const INTERESTING_U8 = [0, 1, 0x7f, 0x80, 0xff, 0x0a, 0x22, 0x7b, 0x7d];

/** One to four mutations of a seed (or of two seeds spliced), or now and then fresh random bytes. */
export function mutate(seeds: Buffer[], rng: Rng): Buffer {
  if (rng.below(16) === 0) return rng.bytes(rng.below(600));
  let b = Buffer.from(seeds[rng.below(seeds.length)]!);
  const rounds = 1 + rng.below(4);
  for (let r = 0; r < rounds; r++) {
    const at = b.length === 0 ? 0 : rng.below(b.length);
    switch (rng.below(9)) {
      case 0: // flip a bit
        if (b.length) b[at] = b[at]! ^ (1 << rng.below(8));
        break;
      case 1: // an interesting byte
        if (b.length) b[at] = INTERESTING_U8[rng.below(INTERESTING_U8.length)]!;
        break;
      case 2: // an interesting 32-bit field, where lengths and counts live
        if (b.length >= 4) b.writeUInt32BE(INTERESTING_U32[rng.below(INTERESTING_U32.length)]!, rng.below(b.length - 3));
        break;
      case 3: // insert random bytes
        b = Buffer.concat([b.subarray(0, at), rng.bytes(1 + rng.below(64)), b.subarray(at)]);
        break;
      case 4: // delete a range
        b = Buffer.concat([b.subarray(0, at), b.subarray(Math.min(b.length, at + 1 + rng.below(32)))]);
        break;
      case 5: // duplicate a range
        b = Buffer.concat([b.subarray(0, at), b.subarray(at, at + 1 + rng.below(64)), b.subarray(at)]);
        break;
      case 6: // truncate
        b = b.subarray(0, at);
        break;
      case 7: { // splice with another seed
        const o = seeds[rng.below(seeds.length)]!;
        b = Buffer.concat([b.subarray(0, at), o.subarray(o.length ? rng.below(o.length) : 0)]);
        break;
      }
      default: // random bytes at the end
        b = Buffer.concat([b, rng.bytes(rng.below(128))]);
    }
  }
  return b;
}

export type Outcome = 'closed' | 'hung' | 'refused';

/**
 * Send `bytes` on a fresh connection, half-close, and wait for the server to close: a server that
 * neither closes nor answers within `deadlineMs` after our FIN counts as a hang.
 */
export function sendInput(port: number, bytes: Buffer, deadlineMs = 5000, onData?: (chunk: Buffer) => void): Promise<Outcome> {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port });
    if (onData) s.on('data', onData);
    let done = false;
    const finish = (o: Outcome) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      s.destroy();
      resolve(o);
    };
    const t = setTimeout(() => finish('hung'), deadlineMs);
    s.on('error', (e: NodeJS.ErrnoException) => finish(e.code === 'ECONNREFUSED' ? 'refused' : 'closed'));
    s.on('close', () => finish('closed'));
    s.resume();
    s.on('connect', () => s.end(bytes));
  });
}

export interface Target {
  name: string;
  seeds: Buffer[];
  /** One input; resolves with what happened (the default sends bytes on a fresh TCP connection). */
  send(input: Buffer): Promise<Outcome | 'answered' | 'server-error'>;
}

export interface Report {
  target: string;
  inputs: number;
  hangs: number;
  serverErrors: number;
  ms: number;
  maxRssMiB: number;
}

/** Run `n` inputs against a target, `parallel` at a time, calling `check` every `every` inputs. */
export async function fuzz(target: Target, n: number, seed: number, opts: { parallel: number; every: number; check: () => Promise<number> }): Promise<Report> {
  const rng = new Rng(seed);
  const t0 = performance.now();
  let hangs = 0;
  let serverErrors = 0;
  let maxRss = 0;
  let sent = 0;
  while (sent < n) {
    const batch = Math.min(opts.every, n - sent);
    let next = 0;
    const worker = async () => {
      while (next < batch) {
        next++;
        const o = await target.send(mutate(target.seeds, rng));
        if (o === 'hung') hangs++;
        if (o === 'server-error') serverErrors++;
        if (o === 'refused') throw new Error(`${target.name}: the server refused connections after ${sent + next} inputs (seed ${seed})`);
      }
    };
    await Promise.all(Array.from({ length: opts.parallel }, worker));
    sent += batch;
    maxRss = Math.max(maxRss, await opts.check());
  }
  return { target: target.name, inputs: n, hangs, serverErrors, ms: Math.round(performance.now() - t0), maxRssMiB: Math.round(maxRss / 1048576) };
}
