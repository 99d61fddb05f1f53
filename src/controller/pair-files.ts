// Small records a storage system keeps per pair in dataDir/pairs/, written by
// atomic replace with fsync: a crash leaves the old record or the new one,
// never a torn file.
//   NAME.state.json       {"state": "PSUS" | "ACTIVE"}   the user's split survives a restart
//   NAME.generation.json  {"epoch", "master"}            pairs across storage systems (remote-pair.ts)
import fs from 'node:fs';
import type { PairState } from './status.js';

export function atomicWrite(file: string, text: string): void {
  const tmp = `${file}.tmp`;
  const fd = fs.openSync(tmp, 'w');
  try {
    fs.writeSync(fd, text + '\n');
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmp, file);
}

/** The persisted user state: PSUS if the pair was split, else nothing (it mirrors). */
export function readPairState(file: string | undefined): 'PSUS' | undefined {
  if (!file || !fs.existsSync(file)) return undefined;
  return (JSON.parse(fs.readFileSync(file, 'utf8')) as { state?: string }).state === 'PSUS' ? 'PSUS' : undefined;
}

export function savePairState(file: string | undefined, state: PairState): void {
  if (file) atomicWrite(file, JSON.stringify({ state: state === 'PSUS' ? 'PSUS' : 'ACTIVE' }));
}
