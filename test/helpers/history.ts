// A Jepsen-style checker for histories of block writes and reads (test/cluster-history.test.ts).
// Each block is a register; every write puts a value no other write uses. An operation has the
// time it was invoked and the time it completed (one monotonic clock for all clients), and either
// succeeded or failed; a failed or unfinished write may or may not have landed.
//
//   anomaly        what it means                                              the rule it breaks
//   lost write     the final value predates an acknowledged write             final = last acked write, or one
//                  (w2 invoked after w completed, w2 acknowledged)             not followed by an acked write
//   stale read     a read returned a value an acknowledged write had           a read sees a write not yet
//                  replaced before the read began                             superseded when it started
//   future read    a read returned a value written only after it completed   causality
//   phantom value  a value no write of this block ever carried               integrity
//   torn block     the block's words were not all one value                   writes are atomic per block

export interface Op {
  kind: 'write' | 'read';
  client: number;
  block: number;
  value: number;
  /** Invocation and completion, in microseconds of one monotonic clock. */
  inv: number;
  end: number;
  ok: boolean;
  /** A read whose block held more than one value. */
  torn?: boolean;
  /** What the client library said when the operation failed. */
  error?: string;
}

export interface Anomaly {
  kind: 'lost write' | 'stale read' | 'future read' | 'phantom value' | 'torn block';
  block: number;
  detail: string;
}

interface Write {
  value: number;
  inv: number;
  /** Infinity when not acknowledged: it may land at any time. */
  end: number;
  acked: boolean;
}

/** Parse one client's output: `w|r BLOCK VALUE INV END ok|torn|err ...`, one line per completed operation. */
export function parseOps(client: number, text: string): Op[] {
  const ops: Op[] = [];
  for (const line of text.split('\n')) {
    const f = line.trim().split(' ');
    if (f.length < 6 || (f[0] !== 'w' && f[0] !== 'r')) continue;
    const op: Op = { kind: f[0] === 'w' ? 'write' : 'read', client, block: Number(f[1]), value: Number(f[2]), inv: Number(f[3]), end: Number(f[4]), ok: f[5] !== 'err' };
    if (f[5] === 'torn') op.torn = true;
    if (f[5] === 'err') op.error = f.slice(6).join(' ');
    ops.push(op);
  }
  return ops;
}

/** The final value of a block whose words differ. */
export const TORN = -1;

/**
 * Check every read of `ops` and the final value of each block (`final`, read after every client
 * stopped; TORN for a torn block). Returns the anomalies; none for a correct register per block.
 */
export function checkHistory(ops: Op[], final: Map<number, number>): Anomaly[] {
  const writes = new Map<number, Map<number, Write>>();
  const blockWrites = (b: number) => {
    let m = writes.get(b);
    if (!m) {
      m = new Map([[0, { value: 0, inv: -Infinity, end: -Infinity, acked: true }]]);
      writes.set(b, m);
    }
    return m;
  };
  for (const op of ops) {
    if (op.kind !== 'write') continue;
    blockWrites(op.block).set(op.value, { value: op.value, inv: op.inv, end: op.ok ? op.end : Infinity, acked: op.ok });
  }
  // Per block, acknowledged writes by invocation: "was w superseded before time t" is then a scan.
  const acked = new Map<number, Write[]>();
  for (const [b, m] of writes) acked.set(b, [...m.values()].filter((w) => w.acked && w.value !== 0).sort((x, y) => x.inv - y.inv));
  const supersededBefore = (b: number, w: Write, t: number): Write | undefined => acked.get(b)?.find((w2) => w2.inv > w.end && w2.end < t);

  const anomalies: Anomaly[] = [];
  const seen = (b: number, value: number, inv: number, end: number, what: string) => {
    const w = blockWrites(b).get(value);
    if (!w) return anomalies.push({ kind: 'phantom value', block: b, detail: `${what} returned ${value}, which no write of block ${b} carried` });
    if (w.inv > end) return anomalies.push({ kind: 'future read', block: b, detail: `${what} returned ${value}, written only after it completed` });
    const later = supersededBefore(b, w, inv);
    if (later) {
      const kind = inv === Infinity ? 'lost write' : 'stale read';
      anomalies.push({ kind, block: b, detail: `${what} returned ${value}, but the acknowledged write of ${later.value} began after it completed${inv === Infinity ? '' : ' and ended before the read began'}` });
    }
    return 0;
  };
  for (const op of ops) {
    if (op.kind !== 'read' || !op.ok) continue;
    if (op.torn) {
      anomalies.push({ kind: 'torn block', block: op.block, detail: `a read by client ${op.client} found more than one value in block ${op.block}` });
      continue;
    }
    seen(op.block, op.value, op.inv, op.end, `a read by client ${op.client}`);
  }
  for (const [b, value] of final) {
    if (value === TORN) anomalies.push({ kind: 'torn block', block: b, detail: `the final read found more than one value in block ${b}` });
    else seen(b, value, Infinity, Infinity, 'the final read');
  }
  return anomalies;
}
