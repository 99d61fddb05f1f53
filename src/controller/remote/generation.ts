// Lease and epochs of a pair across storage systems (DRBD's generation identifiers, reduced to
// what two copies need). Each side persists {epoch, master} (pair-files.ts); swap and takeover
// start a new epoch. When a master opens a session, the other side compares:
//
//   this side is   the attach's epoch vs ours   outcome
//   master         older                        tell the caller to step down (demote, our epoch)
//   master         equal                        split brain: both master the same epoch; refuse
//   master         newer                        we step down and follow the caller
//   mirror         older                        tell the caller to step down (demote, our master)
//   mirror         newer, or another master     follow the caller in its epoch
//   mirror         equal, same master           a new session of the same generation
//
// The lease half is the link's: a mirror trusts what it was told only while it heard its master
// within half the peer timeout (PeerLink.heardRecently), so it calls itself stale before the
// master stops waiting for it.
import type { Generation } from '../pair-files.js';

export type AttachVerdict = 'refuse-older' | 'split-brain' | 'step-down' | 'follow' | 'same';

export function judgeAttach(ours: Generation, self: number, from: number, epoch: number): AttachVerdict {
  const master = ours.master === self;
  if (ours.epoch > epoch) return 'refuse-older';
  if (master) return ours.epoch === epoch ? 'split-brain' : 'step-down';
  if (epoch > ours.epoch || ours.master !== from) return 'follow';
  return 'same';
}
