// ALUA and device identity of a logical unit for multipath across a pair (src/iscsi/wiring.ts
// pairPath, src/iscsi/scsi/lu.ts): standby refuses media writes with the sense multipath fails
// over on, a write caught by a swap is retried rather than failed, and a pair's members are one device.
import { describe, expect, it } from 'vitest';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FilterDevice } from '../src/blockdev/filter.js';
import { BlockDeviceError } from '../src/blockdev/types.js';
import { LogicalUnit } from '../src/iscsi/scsi/lu.js';
import { AluaState, type AluaStateValue, type LogicalUnitOptions } from '../src/iscsi/scsi/types.js';
import { pairPath, type PairMembership } from '../src/iscsi/wiring.js';

const nexus = { initiatorPort: 'iqn.x:a,i,0x000000000001', relativeTargetPort: 1 };
const cdb = (b: number[]) => Buffer.from([...b, ...Array(16 - b.length).fill(0)]);
const WRITE = cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
const READ = cdb([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
const VPD83 = cdb([0x12, 0x01, 0x83, 0x01, 0x00, 0]);
const RTPG = cdb([0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0]);

/** A device whose role the test flips, and which can refuse writes as a retired master does. */
class Volume extends FilterDevice {
  ro = false;
  retired = false;
  override get readOnly() {
    return this.ro;
  }
  override async write(offset: number, data: Buffer, fua?: boolean): Promise<void> {
    if (this.retired || this.ro) throw new BlockDeviceError('EPERM', 'no longer the master');
    return super.write(offset, data, fua);
  }
}

/** An LU past its power-on unit attention. */
async function unit(device: Volume, more: Partial<LogicalUnitOptions> = {}): Promise<LogicalUnit> {
  const u = new LogicalUnit({ lun: 1, device, serial: 'ss1-vol1', targetName: 'iqn.2026-12.t:ss1', luns: () => [1], ...more });
  u.nexusJoined(nexus.initiatorPort);
  expect(await outcome(u, cdb([0]))).toEqual([2, 0x6, 0x2900]);
  return u;
}

/** [status, sense key, ASC/ASCQ] or [status]. */
async function outcome(u: LogicalUnit, c: Buffer, dataOut?: Buffer): Promise<number[]> {
  const r = await u.execute({ cdb: c, nexus, ...(dataOut ? { dataOut } : {}) });
  return r.sense ? [r.status, r.sense[2]! & 0xf, r.sense.readUInt16BE(12)] : [r.status];
}

/** VPD 0x83: the NAA (hex), the target port group and the relative target port. */
async function identity(u: LogicalUnit): Promise<{ naa: string; portGroup: number; relativePort: number }> {
  const d = (await u.execute({ cdb: VPD83, nexus })).dataIn!;
  const out = { naa: '', portGroup: -1, relativePort: -1 };
  for (let at = 4; at + 4 <= d.length; at += 4 + d[at + 3]!) {
    const id = d.subarray(at + 4, at + 4 + d[at + 3]!);
    const type = d[at + 1]! & 0x0f;
    if (type === 3) out.naa = id.toString('hex');
    if (type === 5) out.portGroup = id.readUInt16BE(2);
    if (type === 4) out.relativePort = id.readUInt16BE(2);
  }
  return out;
}

describe('ALUA of a logical unit', () => {
  it('refuses media writes of a standby LU with NOT READY 04/0B (a path error for multipath) and still serves its reads', async () => {
    const dev = new Volume(new MemoryDevice(1 << 20));
    dev.ro = true;
    const u = await unit(dev, { alua: () => AluaState.STANDBY });
    expect(await outcome(u, WRITE, Buffer.alloc(512))).toEqual([2, 0x2, 0x040b]);
    expect(await outcome(u, cdb([0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]), Buffer.alloc(24))).toEqual([2, 0x2, 0x040b]); // UNMAP
    expect(await outcome(u, READ)).toEqual([0]);
    expect(await outcome(u, cdb([0]))).toEqual([0]);
  });

  it('leaves WP clear in MODE SENSE for a read-only standby LU (Linux would make the path a read-only disk) and sets it for a read-only active/optimized one', async () => {
    const wp = async (state: AluaStateValue) => {
      const dev = new Volume(new MemoryDevice(1 << 20));
      dev.ro = true;
      const u = await unit(dev, { alua: () => state });
      const six = (await u.execute({ cdb: cdb([0x1a, 0x08, 0x3f, 0, 255, 0]), nexus })).dataIn!;
      const ten = (await u.execute({ cdb: cdb([0x5a, 0x08, 0x3f, 0, 0, 0, 0, 1, 0, 0]), nexus })).dataIn!;
      return [six[2]! & 0x80, ten[3]! & 0x80];
    };
    expect(await wp(AluaState.STANDBY)).toEqual([0, 0]);
    expect(await wp(AluaState.ACTIVE_OPTIMIZED)).toEqual([0x80, 0x80]);
  });

  it('keeps DATA PROTECT for a read-only LU that is active/optimized (not a pair\'s mirror)', async () => {
    const dev = new Volume(new MemoryDevice(1 << 20));
    dev.ro = true;
    const u = await unit(dev, { alua: () => AluaState.ACTIVE_OPTIMIZED });
    expect(await outcome(u, WRITE, Buffer.alloc(512))).toEqual([2, 0x7, 0x2700]);
  });

  it('answers a write refused while the device still says writable (a swap under way) with 02/04/0A, and once the role changed with 2A/06, then 04/0B', async () => {
    const dev = new Volume(new MemoryDevice(1 << 20));
    let state: AluaStateValue = AluaState.ACTIVE_OPTIMIZED;
    const u = await unit(dev, { alua: () => state });
    expect(await outcome(u, WRITE, Buffer.alloc(512))).toEqual([0]);
    dev.retired = true; // the old pair refuses; the new role is not in place yet
    expect(await outcome(u, WRITE, Buffer.alloc(512))).toEqual([2, 0x2, 0x040a]);
    // The role change lands while a write waits: that write reports it, the next one the standby state.
    const held = u.execute({ cdb: WRITE, dataOut: Buffer.alloc(512), nexus });
    dev.ro = true;
    state = AluaState.STANDBY;
    const r = await held;
    expect([r.status, r.sense![2]! & 0xf, r.sense!.readUInt16BE(12)]).toEqual([2, 0x6, 0x2a06]);
    expect(await outcome(u, WRITE, Buffer.alloc(512))).toEqual([2, 0x2, 0x040b]);
  });

  it('gives LUs with one device identity one NAA whatever their target and serial, with each target\'s own port group in VPD 0x83 and REPORT TARGET PORT GROUPS', async () => {
    const one = await unit(new Volume(new MemoryDevice(1 << 20)), { deviceId: () => 'pair/px', portGroup: 1 });
    const two = await unit(new Volume(new MemoryDevice(1 << 20)), { deviceId: () => 'pair/px', portGroup: 2, targetName: 'iqn.2026-12.t:ss2', serial: 'ss2-vol1', alua: () => AluaState.STANDBY });
    const other = await unit(new Volume(new MemoryDevice(1 << 20)), { portGroup: 1 });
    const [a, b, c] = [await identity(one), await identity(two), await identity(other)];
    expect(a.naa).toMatch(/^6[0-9a-f]{31}$/);
    expect(b.naa).toBe(a.naa);
    expect(c.naa).not.toBe(a.naa);
    expect([a.portGroup, a.relativePort, b.portGroup, b.relativePort]).toEqual([1, 1, 2, 2]);
    const rtpg = (await two.execute({ cdb: RTPG, nexus })).dataIn!;
    expect([rtpg.readUInt16BE(4 + 2), rtpg[4]! & 0x0f, rtpg.readUInt16BE(4 + 10)]).toEqual([2, AluaState.STANDBY, 2]);
  });

  it('raises 3F/03 INQUIRY DATA HAS CHANGED when the device identity changes (a split mirror becomes a device of its own)', async () => {
    let id: string | undefined = 'pair/px';
    const u = await unit(new Volume(new MemoryDevice(1 << 20)), { deviceId: () => id });
    const before = (await identity(u)).naa;
    id = undefined;
    expect(await outcome(u, cdb([0]))).toEqual([2, 0x6, 0x3f03]);
    expect(await outcome(u, cdb([0]))).toEqual([0]);
    expect((await identity(u)).naa).not.toBe(before);
  });
});

describe('pairPath: ALUA state and identity of a volume by its pair', () => {
  const cases: Array<[string, PairMembership, boolean, AluaStateValue, string | undefined]> = [
    ['not in a pair', undefined, false, AluaState.ACTIVE_OPTIMIZED, undefined],
    ['not in a pair, read-only (an S-VOL RO member)', undefined, true, AluaState.ACTIVE_OPTIMIZED, undefined],
    ['the master of a pair across storage systems', { pair: 'px', role: 'master', acrossSystems: true }, false, AluaState.ACTIVE_OPTIMIZED, 'pair/px'],
    ['its mirror', { pair: 'px', role: 'mirror', acrossSystems: true }, true, AluaState.STANDBY, 'pair/px'],
    ['its mirror, split (takes host writes)', { pair: 'px', role: 'mirror', acrossSystems: true }, false, AluaState.ACTIVE_OPTIMIZED, undefined],
    ['the mirror of a pair inside one storage system', { pair: 'p1', role: 'mirror', acrossSystems: false }, true, AluaState.STANDBY, undefined],
  ];
  for (const [what, member, readOnly, alua, id] of cases) {
    it(`gives ${what} ALUA state ${alua} and ${id ? `the identity ${id}` : 'its own identity'}`, () => {
      const dev = new Volume(new MemoryDevice(4096));
      dev.ro = readOnly;
      const p = pairPath(dev, () => member);
      expect([p.alua(), p.deviceId()]).toEqual([alua, id]);
    });
  }
});
