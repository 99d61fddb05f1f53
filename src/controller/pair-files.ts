// Small records a storage system keeps per pair in dataDir/pairs/, written by atomic replace
// with fsync: a crash leaves the old record or the new one, never a torn file. Each carries the
// version of its format and is checked with zod when read: a damaged or foreign record stops the
// start with one line (FormatError), never a silent reset of the pair's state or generation.
//
//   NAME.state.json       {"version": 1, "state": "PSUS" | "ACTIVE"}             the user's split survives a restart
//   NAME.generation.json  {"version": 1, "epoch", "master", "initialCopy"?}     pairs across storage systems
//
// Files from before the version field ({"state"}, {"epoch", "master"}) are read as version 1.
import fs from 'node:fs';
import * as z from 'zod';
import { FormatError } from '../util/format.js';
import { atomicWrite } from '../util/atomic-write.js';
import type { PairState } from './status.js';

// Re-exported for the callers that knew it here.
export { atomicWrite };

const VERSION = 1;

const StateRecord = z.strictObject({ version: z.literal(VERSION).optional(), state: z.enum(['PSUS', 'ACTIVE']) });
const GenerationRecord = z.strictObject({
  version: z.literal(VERSION).optional(),
  epoch: z.number().int().positive(),
  master: z.number().int().positive(),
  initialCopy: z.boolean().optional(),
});

/** The persisted generation record of a pair on one storage system (remote pairs). */
export interface Generation {
  epoch: number;
  /** Storage system whose copy is the master in this epoch. */
  master: number;
  /** A new pair whose mirror may hold anything: the first session copies everything. */
  initialCopy?: boolean;
}

function readRecord<T>(file: string, what: string, schema: z.ZodType<T>): T | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new FormatError(file, `cannot read the ${what}: ${(e as Error).message}`, { cause: e });
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw new FormatError(file, `the ${what} is not JSON (damaged?); move it away only if you know the pair's state, then restart`);
  }
  if (typeof json === 'object' && json !== null && typeof (json as { version?: unknown }).version === 'number' && (json as { version: number }).version > VERSION) {
    throw new FormatError(file, `is a ${what} of format version ${(json as { version: number }).version}, newer than this blockmirror reads (${VERSION}); run a newer blockmirror`);
  }
  const r = schema.safeParse(json);
  if (!r.success) throw new FormatError(file, `is not a valid ${what} (${r.error.issues.map((i) => `${i.path.join('.') || 'record'}: ${i.message}`).join('; ')}); move it away only if you know the pair's state, then restart`);
  return r.data;
}

/** The persisted user state: PSUS if the pair was split, else nothing (it mirrors). */
export function readPairState(file: string | undefined): 'PSUS' | undefined {
  if (!file) return undefined;
  return readRecord(file, 'pair state record', StateRecord)?.state === 'PSUS' ? 'PSUS' : undefined;
}

export function savePairState(file: string | undefined, state: PairState): void {
  if (file) atomicWrite(file, JSON.stringify({ version: VERSION, state: state === 'PSUS' ? 'PSUS' : 'ACTIVE' }));
}

export function readGeneration(file: string | undefined): Generation | undefined {
  if (!file) return undefined;
  const g = readRecord(file, 'generation record', GenerationRecord);
  return g ? { epoch: g.epoch, master: g.master, ...(g.initialCopy ? { initialCopy: true } : {}) } : undefined;
}

export function saveGeneration(file: string | undefined, gen: Generation): void {
  if (file) atomicWrite(file, JSON.stringify({ version: VERSION, ...gen }));
}
