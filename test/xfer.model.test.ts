// The transfer's promise as a property (fast-check): whatever the message sizes (0 bytes, 1 byte,
// more than the whole pool), however many connections run at once (up to the table's size),
// whichever path fails and whichever sender or receiver is killed mid-transfer and resumed from
// the on-disk tables, every message arrives exactly once, in order and intact, and every segment
// and slot is free at the end. A killed process is a volume handle whose every I/O fails from
// the Nth on: like kill -9, it writes nothing more, not even its cleanup.
import { randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import fc from 'fast-check';
import { XferVolume } from '../src/xfer/volume.js';
import { openPath, type XferPath } from '../src/xfer/paths.js';
import { resumeSend, send } from '../src/xfer/sender.js';
import { recv } from '../src/xfer/receiver.js';
import { describe as describeVolume } from '../src/xfer/inspect.js';
import { gc } from '../src/xfer/gc.js';
import { HookedPath, formattedFiles } from './helpers/xfer.js';

const OPTS = { pollMs: 2, heartbeatMs: 20, timeoutMs: 10_000, retries: 50 };

interface Plan {
  size: number;
  /** Fail one of the sender's two paths after this many of its I/Os. */
  pathFailsAt: number | null;
  killSenderAt: number | null;
  killReceiverAt: number | null;
}

/** Two paths to the volume; one may fail for good, and all die together at `killAt`. */
async function host(file: string, pathFailsAt: number | null, killAt: number | null): Promise<XferVolume> {
  let ops = 0;
  let armed = false; // from the first I/O after opening
  const tick = (which: number) => {
    if (!armed) return;
    ops++;
    if (killAt !== null && ops > killAt) throw new Error('killed');
    if (which === 0 && pathFailsAt !== null && ops > pathFailsAt) throw new Error('path cut');
  };
  const wrap = (p: XferPath, which: number) => new HookedPath(p, { read: () => void tick(which), write: () => tick(which) });
  const vol = await XferVolume.fromPaths([wrap(await openPath(file), 0), wrap(await openPath(file), 1)], { rejoinMs: 60_000 });
  armed = true;
  return vol;
}

async function runConnection(file: string, plan: Plan, from: number, to: number, data: Buffer): Promise<Buffer> {
  let out = Buffer.alloc(0);
  const deliver = async (d: Buffer) => void (out = Buffer.concat([out, d]));
  const opened: XferVolume[] = [];
  const vol = async (failAt: number | null, killAt: number | null) => {
    const v = await host(file, failAt, killAt);
    opened.push(v);
    return v;
  };
  try {
    const sender = (async () => {
      try {
        return await send(await vol(plan.pathFailsAt, plan.killSenderAt), from, to, Readable.from([data]), OPTS);
      } catch (e) {
        if (plan.killSenderAt === null) throw e;
        // Killed after it was accepted: resume. Killed before: nothing on disk names it, start again.
        return await resumeSend(await vol(null, null), from, to, (offset) => Readable.from([data.subarray(offset)]), OPTS).catch(async (re: Error) => {
          if (!/no connection from/.test(re.message)) throw re;
          return send(await vol(null, null), from, to, Readable.from([data]), OPTS);
        });
      }
    })();
    const receiver = (async () => {
      try {
        return await recv(await vol(null, plan.killReceiverAt), to, deliver, { ...OPTS, from });
      } catch (e) {
        if (plan.killReceiverAt === null) throw e;
        const resume = async (acked: number) => void (out = out.subarray(0, acked));
        return await recv(await vol(null, null), to, deliver, { ...OPTS, from, resume }).catch(async (re: Error) => {
          if (!/no accepted connection/.test(re.message)) throw re;
          out = Buffer.alloc(0);
          return recv(await vol(null, null), to, deliver, { ...OPTS, from });
        });
      }
    })();
    await Promise.all([sender, receiver]);
    return out;
  } finally {
    await Promise.all(opened.map((v) => v.close()));
  }
}

describe('xfer model', () => {
  it('delivers every message exactly once, in order and intact, through path failures, kills and resumes, and frees everything', async () => {
    const pool = 24 * 8192;
    const plan = fc.record<Plan>({
      size: fc.oneof(fc.constantFrom(0, 1, 8128, pool + 1), fc.integer({ min: 0, max: 2 * pool })),
      pathFailsAt: fc.option(fc.integer({ min: 1, max: 200 })),
      killSenderAt: fc.option(fc.integer({ min: 1, max: 200 }), { freq: 2 }),
      killReceiverAt: fc.option(fc.integer({ min: 1, max: 200 }), { freq: 2 }),
    });
    await fc.assert(
      fc.asyncProperty(fc.array(plan, { minLength: 1, maxLength: 3 }), async (plans) => {
        const files = await formattedFiles({ segSize: 8192, segments: 24, maxConn: 3 });
        const msgs = plans.map((p) => randomBytes(p.size));
        const outs = await Promise.all(plans.map((p, i) => runConnection(files[0]!, p, 10 + i, 20 + i, msgs[i]!)));
        outs.forEach((o, i) => expect(o.equals(msgs[i]!), `message ${i}: ${o.length} of ${msgs[i]!.length} bytes`).toBe(true));
        // A sender killed while it claimed a slot left a claim that only gc frees.
        const check = await XferVolume.open(files);
        await gc(check, 150);
        const r = await describeVolume(check);
        await check.close();
        expect(r.connections.map((c) => [c.state, c.segmentsInUse])).toEqual([['free', 0], ['free', 0], ['free', 0]]);
      }),
      { numRuns: 15, endOnFailure: true },
    );
  });
});
