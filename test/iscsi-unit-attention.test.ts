// Unit attentions of a logical unit (src/iscsi/scsi/unit-attention.ts): a reset, a role change, a
// capacity change or a mode page change reaches every I_T nexus once, on its next command; a new nexus
// hears of the power on (29/00) first.
import { describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FilterDevice } from '../src/blockdev/filter.js';
import { LogicalUnit } from '../src/iscsi/scsi/lu.js';

const nexus = (n: string) => ({ initiatorPort: `iqn.x:${n},i,0x000000000001`, relativeTargetPort: 1 });
const cdb = (b: number[]) => Buffer.from([...b, ...Array(16 - b.length).fill(0)]);
const TUR = cdb([0x00]);
const INQUIRY = cdb([0x12, 0, 0, 0, 36, 0]);
const REPORT_LUNS = cdb([0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 64]);
const REQUEST_SENSE = cdb([0x03, 0, 0, 0, 18, 0]);
/** [status, sense key, ASC, ASCQ] of a command. */
async function run(u: LogicalUnit, who: string, c: Buffer, dataOut?: Buffer): Promise<number[]> {
  const r = await u.execute({ cdb: c, nexus: nexus(who), ...(dataOut ? { dataOut } : {}) });
  return r.sense ? [r.status, r.sense[2]! & 0xf, r.sense[12]!, r.sense[13]!] : [r.status];
}

/** A device whose role and size the test changes, as a swap or a resize would. */
class Switchable extends FilterDevice {
  ro = false;
  grownBy = 0;
  override get readOnly() {
    return this.ro;
  }
  override get size() {
    return super.size + this.grownBy;
  }
}

function fresh() {
  const dev = new Switchable(new MemoryDevice(1 << 20));
  const u = new LogicalUnit({ lun: 0, device: dev, serial: 's', targetName: 'iqn.2026-12.t:t', luns: () => [0] });
  return { dev, u };
}

/** An LU with nexuses a and b logged in, each past its power-on UA, as a real initiator leaves them. */
async function setup() {
  const { dev, u } = fresh();
  for (const n of ['a', 'b']) {
    u.nexusJoined(nexus(n).initiatorPort);
    expect(await run(u, n, TUR)).toEqual([2, 0x6, 0x29, 0x00]);
  }
  return { dev, u };
}

describe('unit attentions', () => {
  it('gives a nexus that logs in CHECK CONDITION UNIT ATTENTION 29/00 on its first command, once, and GOOD after', async () => {
    const { u } = fresh();
    u.nexusJoined(nexus('a').initiatorPort);
    const read = cdb([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    expect(await run(u, 'a', read)).toEqual([2, 0x6, 0x29, 0x00]);
    expect(await run(u, 'a', read)).toEqual([0]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
  });

  it('lets INQUIRY and REPORT LUNS of a new nexus through with the 29/00 still pending, and REQUEST SENSE returns and clears it', async () => {
    const { u } = fresh();
    for (const n of ['a', 'b']) u.nexusJoined(nexus(n).initiatorPort);
    expect(await run(u, 'a', INQUIRY)).toEqual([0]);
    expect(await run(u, 'a', REPORT_LUNS)).toEqual([0]);
    const rs = await u.execute({ cdb: REQUEST_SENSE, nexus: nexus('a') });
    expect([rs.status, rs.dataIn![2]! & 0xf, rs.dataIn![12], rs.dataIn![13]]).toEqual([0, 0x6, 0x29, 0x00]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
    // Clearing a's does not clear b's: each nexus is told on its own.
    expect(await run(u, 'b', TUR)).toEqual([2, 0x6, 0x29, 0x00]);
  });

  it('gives a nexus whose first command comes without a login (no nexusJoined) the 29/00 as well', async () => {
    const { u } = fresh();
    expect(await run(u, 'z', TUR)).toEqual([2, 0x6, 0x29, 0x00]);
    expect(await run(u, 'z', TUR)).toEqual([0]);
  });

  it('lets a LUN reset before the first command replace the 29/00 with 29/03', async () => {
    const { u } = fresh();
    u.nexusJoined(nexus('a').initiatorPort);
    u.reset();
    expect(await run(u, 'a', TUR)).toEqual([2, 0x6, 0x29, 0x03]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
  });

  it('gives every nexus, the resetting one too, CHECK CONDITION UNIT ATTENTION 29/03 once after a LUN reset', async () => {
    const { u } = await setup();
    expect(await run(u, 'a', TUR)).toEqual([0]);
    u.reset();
    for (const who of ['a', 'b']) {
      expect(await run(u, who, TUR), who).toEqual([2, 0x6, 0x29, 0x03]);
      expect(await run(u, who, TUR), who).toEqual([0]);
    }
  });

  it('lets INQUIRY and REPORT LUNS through without clearing the UA, and REQUEST SENSE returns it and clears it', async () => {
    const { u } = await setup();
    u.reset();
    expect(await run(u, 'a', INQUIRY)).toEqual([0]);
    expect(await run(u, 'a', REPORT_LUNS)).toEqual([0]);
    const rs = await u.execute({ cdb: REQUEST_SENSE, nexus: nexus('a') });
    expect(rs.status).toBe(0);
    expect([rs.dataIn![2]! & 0xf, rs.dataIn![12], rs.dataIn![13]]).toEqual([0x6, 0x29, 0x03]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
    // b still has it: each nexus is told on its own.
    expect(await run(u, 'b', cdb([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]))).toEqual([2, 0x6, 0x29, 0x03]);
  });

  it('raises 2A/06 ASYMMETRIC ACCESS STATE CHANGED on every nexus when the device becomes read-only (a swap) and again when it becomes writable', async () => {
    const { dev, u } = await setup();
    expect(await run(u, 'a', TUR)).toEqual([0]);
    dev.ro = true;
    // The write that meets the change reports the UA, not DATA PROTECT: the initiator retries and then sees the new role.
    expect(await run(u, 'a', cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Buffer.alloc(512))).toEqual([2, 0x6, 0x2a, 0x06]);
    expect(await run(u, 'a', cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Buffer.alloc(512))).toEqual([2, 0x7, 0x27, 0x00]);
    expect(await run(u, 'b', TUR)).toEqual([2, 0x6, 0x2a, 0x06]);
    dev.ro = false;
    for (const who of ['b', 'a']) {
      expect(await run(u, who, TUR), who).toEqual([2, 0x6, 0x2a, 0x06]);
      expect(await run(u, who, cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), Buffer.alloc(512)), who).toEqual([0]);
    }
  });

  it('raises 2A/09 CAPACITY DATA HAS CHANGED when the device size changes, and READ CAPACITY then gives the new size', async () => {
    const { dev, u } = await setup();
    dev.grownBy = 1 << 20;
    expect(await run(u, 'a', cdb([0x25]))).toEqual([2, 0x6, 0x2a, 0x09]);
    const r = await u.execute({ cdb: cdb([0x25]), nexus: nexus('a') });
    expect(r.dataIn!.readUInt32BE(0)).toBe((2 << 20) / 512 - 1);
    expect(await run(u, 'b', TUR)).toEqual([2, 0x6, 0x2a, 0x09]);
  });

  it('raises 2A/01 MODE PARAMETERS CHANGED for the other nexuses when one turns the write cache off, not for itself', async () => {
    const { u } = await setup();
    // MODE SENSE(6) of the caching page, then MODE SELECT(6) of it with WCE cleared.
    const sense = await u.execute({ cdb: cdb([0x1a, 0x08, 0x08, 0, 255, 0]), nexus: nexus('a') });
    const page = Buffer.from(sense.dataIn!.subarray(4));
    page[0]! &= 0x3f;
    page[2]! &= ~0x04;
    const list = Buffer.concat([Buffer.alloc(4), page]);
    expect(await run(u, 'a', cdb([0x15, 0x10, 0, 0, list.length, 0]), list)).toEqual([0]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
    expect(await run(u, 'b', TUR)).toEqual([2, 0x6, 0x2a, 0x01]);
  });

  it('tells a nexus that logs in after a role change only of the power on, and the nexuses already there of the change', async () => {
    const { dev, u } = await setup();
    dev.ro = true;
    u.nexusJoined(nexus('c').initiatorPort);
    expect(await run(u, 'c', TUR)).toEqual([2, 0x6, 0x29, 0x00]);
    expect(await run(u, 'c', TUR)).toEqual([0]);
    expect(await run(u, 'a', TUR)).toEqual([2, 0x6, 0x2a, 0x06]);
  });

  it('lets a reset replace what was queued before it, and forgets the UAs of a nexus that is lost (it comes back as a new nexus)', async () => {
    const { dev, u } = await setup();
    dev.ro = true;
    expect(await run(u, 'a', INQUIRY)).toEqual([0]); // notices the change: 2A/06 queued for both
    u.reset();
    expect(await run(u, 'a', TUR)).toEqual([2, 0x6, 0x29, 0x03]);
    expect(await run(u, 'a', TUR)).toEqual([0]);
    u.nexusLost(nexus('b').initiatorPort);
    expect(await run(u, 'b', TUR)).toEqual([2, 0x6, 0x29, 0x00]);
    expect(await run(u, 'b', TUR)).toEqual([0]);
  });
});
