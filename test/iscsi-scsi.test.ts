import { describe, expect, it } from 'vitest';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { MemoryDevice } from '../src/blockdev/memory.js';
import { FilterDevice } from '../src/blockdev/filter.js';
import { AtomicDevice } from '../src/blockdev/atomic.js';
import { BlockDeviceError, type Extent } from '../src/blockdev/types.js';
import { LogicalUnit } from '../src/iscsi/scsi/lu.js';
import { AluaState, type AluaStateValue } from '../src/iscsi/scsi/types.js';

const nexus = (n: string) => ({ initiatorPort: `iqn.x:${n},i,0x000000000001`, relativeTargetPort: 1 });
const cdb = (b: number[]) => Buffer.from([...b, ...Array(16 - b.length).fill(0)]);
const senseOf = (r: { sense?: Buffer }) => (r.sense ? [r.sense[2]! & 0xf, r.sense[12], r.sense[13]] : undefined);

/** An LU whose nexuses a and b logged in and took their power-on unit attention (TEST UNIT READY), as real initiators do. */
function lu(device = new MemoryDevice(1 << 20) as FilterDevice | MemoryDevice, more: Partial<ConstructorParameters<typeof LogicalUnit>[0]> = {}) {
  const u = new LogicalUnit({ lun: 0, device, serial: 's', targetName: 'iqn.2026-12.t:t', luns: () => [0], atomic: new AtomicDevice(device), ...more });
  for (const n of ['a', 'b']) {
    u.nexusJoined(nexus(n).initiatorPort);
    if (u.unitAttentions.check(nexus(n).initiatorPort, 0x00).kind !== 'report') throw new Error('a new nexus had no power-on unit attention');
  }
  return u;
}

class ReadOnly extends FilterDevice {
  override get readOnly() {
    return true;
  }
}
class Failing extends FilterDevice {
  override async read(): Promise<void> {
    throw new BlockDeviceError('EIO', 'disk on fire');
  }
}
class AllData extends FilterDevice {
  override async extents(_o: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 0 }];
  }
}

describe('SCSI logical unit', () => {
  it('answers a write to a read-only device (a mirror) with DATA PROTECT / WRITE PROTECTED and sets WP in MODE SENSE', async () => {
    const u = lu(new ReadOnly(new MemoryDevice(1 << 20)));
    const w = await u.execute({ cdb: cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), dataOut: Buffer.alloc(512), nexus: nexus('a') });
    expect(senseOf(w)).toEqual([0x7, 0x27, 0x00]);
    const ms = await u.execute({ cdb: cdb([0x1a, 0, 0x3f, 0, 255, 0]), nexus: nexus('a') });
    expect(ms.dataIn![2]! & 0x80).toBe(0x80);
  });

  it('answers EIO from the volume stack with MEDIUM ERROR 11/00 on read', async () => {
    const r = await lu(new Failing(new MemoryDevice(1 << 20))).execute({ cdb: cdb([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), nexus: nexus('a') });
    expect(senseOf(r)).toEqual([0x3, 0x11, 0x00]);
  });

  it('reports ALUA standby or active/optimized from the callback, as it changes (after a unit attention saying so)', async () => {
    let state: AluaStateValue = AluaState.STANDBY;
    const u = lu(undefined, { alua: () => state });
    const rtpg = () => u.execute({ cdb: cdb([0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0]), nexus: nexus('a') });
    expect((await rtpg()).dataIn![4]! & 0x0f).toBe(AluaState.STANDBY);
    state = AluaState.ACTIVE_OPTIMIZED;
    expect(senseOf(await rtpg())).toEqual([0x6, 0x2a, 0x06]);
    expect((await rtpg()).dataIn![4]! & 0x0f).toBe(AluaState.ACTIVE_OPTIMIZED);
  });

  it('never reports a block deallocated when the device reports data (an Invalid cluster of a mirror)', async () => {
    const gls = cdb([0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64]);
    const holes = await lu().execute({ cdb: gls, nexus: nexus('a') });
    expect(holes.dataIn![8 + 12]).toBe(1); // an empty memory device: deallocated
    const data = await lu(new AllData(new MemoryDevice(1 << 20))).execute({ cdb: gls, nexus: nexus('a') });
    expect(data.dataIn![8 + 12]).toBe(0);
  });

  it('keeps persistent reservations in its file across a restart and fences other initiators', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bm-pr-'));
    const prFile = path.join(dir, 'pr.json');
    try {
      const dev = new MemoryDevice(1 << 20);
      const out = (sa: number, type: number, key: bigint, sark: bigint) => {
        const p = Buffer.alloc(24);
        p.writeBigUInt64BE(key, 0);
        p.writeBigUInt64BE(sark, 8);
        return { cdb: cdb([0x5f, sa, type, 0, 0, 0, 0, 0, 24, 0]), dataOut: p };
      };
      const first = lu(dev, { prFile });
      expect((await first.execute({ ...out(0, 0, 0n, 0xabn), nexus: nexus('a') })).status).toBe(0);
      expect((await first.execute({ ...out(1, 1, 0xabn, 0n), nexus: nexus('a') })).status).toBe(0); // RESERVE, Write Exclusive
      const again = lu(dev, { prFile });
      const keys = await again.execute({ cdb: cdb([0x5e, 0, 0, 0, 0, 0, 0, 0, 255, 0]), nexus: nexus('b') });
      expect(keys.dataIn!.readBigUInt64BE(8)).toBe(0xabn);
      const w = await again.execute({ cdb: cdb([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), dataOut: Buffer.alloc(512), nexus: nexus('b') });
      expect(w.status).toBe(0x18); // RESERVATION CONFLICT
      const r = await again.execute({ cdb: cdb([0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0]), nexus: nexus('b') });
      expect(r.status).toBe(0); // Write Exclusive lets others read
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
