// Reclaiming a dead peer's part of a slot.
//
// gc reads the process ID table, waits the timeout, reads it again: a half that is in use and
// whose heartbeat (and token) stood still all that time belongs to a dead process. Only then does
// gc write that process's blocks (its half and its table: pointer table for a sender,
// acknowledgement table for a receiver), so single-writer ownership still holds: the owner is gone.
// A slot is free again once both halves are.
import { AckFlag, Command, PtrFlag, Role, freeAck, freePid, freePtr, type AckTable, type PidEntry, type PtrTable } from './layout.js';
import { sleep } from './session.js';
import type { XferVolume } from './volume.js';

export interface Reclaimed {
  slot: number;
  side: 'sender' | 'receiver';
  /** Process ID of the dead side. */
  id: number;
  /** Segments it held (written and not acknowledged), for a sender. */
  segments: number;
}

export async function gc(vol: XferVolume, timeoutMs: number, signal?: AbortSignal): Promise<Reclaimed[]> {
  const before = await vol.readPidTable();
  await sleep(timeoutMs, signal);
  const after = await vol.readPidTable();
  const out: Reclaimed[] = [];
  const still = (a: PidEntry, b: PidEntry) => a.command.code !== Command.NONE && a.token === b.token && a.heartbeat === b.heartbeat;
  for (let slot = 0; slot < after.length; slot++) {
    const { req, rsp } = after[slot];
    if (still(req, before[slot].req)) {
      const { inUse } = await slotUsage(vol, slot, req.token);
      await vol.writePtr(freePtr(slot));
      await vol.writePid({ ...freePid(slot, Role.REQUESTOR), heartbeat: req.heartbeat + 1 });
      out.push({ slot, side: 'sender', id: req.requestor, segments: inUse });
    }
    if (still(rsp, before[slot].rsp)) {
      await vol.writeAck(freeAck(slot));
      await vol.writePid({ ...freePid(slot, Role.REQUESTEE), heartbeat: rsp.heartbeat + 1 });
      out.push({ slot, side: 'receiver', id: rsp.requestee, segments: 0 });
    }
  }
  return out;
}

/** Pointer entries written under `token` and not yet acknowledged under it. */
export async function slotUsage(vol: XferVolume, slot: number, token: number): Promise<{ ptr: PtrTable; ack: AckTable; inUse: number }> {
  const [ptr, ack] = await Promise.all([vol.readPtr(slot), vol.readAck(slot)]);
  let inUse = 0;
  if (ptr.token === token && token !== 0) {
    for (let i = 0; i < vol.mcb.entries; i++) {
      const e = ptr.entries[i];
      const a = ack.entries[i];
      if (e.flag === PtrFlag.WRITTEN && !(ack.token === token && a.flag === AckFlag.READ && a.seq === e.seq)) inUse++;
    }
  }
  return { ptr, ack, inUse };
}
