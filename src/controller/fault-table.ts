// Faults as operators and tests name them: a target and a kind, from the YAML's `faults:`,
// the admin API (POST /api/faults) and the CLI (`blockmirror fault set …`). One schema checks
// all three, so each refuses the same mistakes with the same words.
//
//   target      kinds                                  options
//   SS:VOL      error delay offline corrupt torn       op, range, probability, ms, jitter, mode
//   link:A-B    delay drop reset                       ms, jitter
import * as z from 'zod';
import { FAULT_OPS, VOLUME_FAULT_KINDS, describeFault, type ByteRange, type VolumeFault } from '../blockdev/fault.js';
import { parseSize } from '../util/size.js';

export const LINK_FAULT_KINDS = ['delay', 'drop', 'reset'] as const;
export type LinkFaultKind = (typeof LINK_FAULT_KINDS)[number];

/** A fault on the link between two storage systems, as one end applies it. */
export interface LinkFault {
  kind: LinkFaultKind;
  ms?: number;
  jitter?: number;
}

export type FaultTarget = { type: 'volume'; ss: number; vol: number } | { type: 'link'; a: number; b: number };

export class FaultSpecError extends Error {
  override readonly name = 'FaultSpecError';
}

const TARGET_HELP = 'a target is SS:VOL (e.g. 1:8) or link:A-B (e.g. link:1-2)';

export function parseFaultTarget(text: string): FaultTarget {
  const vol = /^(\d+):(\d+)$/.exec(text);
  if (vol) return { type: 'volume', ss: Number(vol[1]), vol: Number(vol[2]) };
  const link = /^link:(\d+)-(\d+)$/.exec(text);
  if (link) {
    const a = Number(link[1]);
    const b = Number(link[2]);
    if (a === b) throw new FaultSpecError(`fault target ${JSON.stringify(text)}: a link joins two different storage systems`);
    return { type: 'link', a: Math.min(a, b), b: Math.max(a, b) };
  }
  throw new FaultSpecError(`fault target ${JSON.stringify(text)} is not valid: ${TARGET_HELP}`);
}

export function formatFaultTarget(t: FaultTarget): string {
  return t.type === 'volume' ? `${t.ss}:${t.vol}` : `link:${t.a}-${t.b}`;
}

/** "START:LEN" with sizes, e.g. "1MiB:64KiB" or "0:4096": the bytes a volume fault hits. */
export function parseByteRange(text: string): ByteRange {
  const m = /^\s*([^:]+):([^:]+)\s*$/.exec(text);
  if (!m) throw new FaultSpecError(`range ${JSON.stringify(text)}: expected START:LEN, e.g. 1MiB:64KiB`);
  let start: number;
  let length: number;
  try {
    start = parseSize(m[1]!.trim());
    length = parseSize(m[2]!.trim());
  } catch (e) {
    throw new FaultSpecError(`range ${JSON.stringify(text)}: ${(e as Error).message}`);
  }
  if (length <= 0) throw new FaultSpecError(`range ${JSON.stringify(text)}: the length must be greater than 0`);
  return { start, length };
}

/** A fault request as the wire and the YAML carry it (range in bytes). */
export const FaultRequestSchema = z.strictObject({
  target: z.string(),
  kind: z.enum([...VOLUME_FAULT_KINDS, 'drop', 'reset'], {
    error: (iss) => `${JSON.stringify(iss.input)} is not a fault kind (volumes: ${VOLUME_FAULT_KINDS.join(', ')}; links: ${LINK_FAULT_KINDS.join(', ')})`,
  }),
  op: z.union([z.enum(FAULT_OPS), z.array(z.enum(FAULT_OPS)).min(1)], { error: 'expected read, write or flush, or a list of them' }).optional(),
  range: z.strictObject({ start: z.number().int().min(0), length: z.number().int().min(1) }).optional(),
  probability: z.number().gt(0).max(1).optional(),
  ms: z.number().int().min(0).max(600_000).optional(),
  jitter: z.number().int().min(0).max(600_000).optional(),
  mode: z.enum(['hang', 'fail'], { error: 'expected hang or fail' }).optional(),
});
export type FaultRequest = z.infer<typeof FaultRequestSchema>;

export type ResolvedFault = { target: FaultTarget; volume: VolumeFault } | { target: FaultTarget & { type: 'link' }; link: LinkFault };

/** Check a request's combination of target, kind and options; one clear line when it is wrong. */
export function resolveFault(req: FaultRequest): ResolvedFault {
  const target = parseFaultTarget(req.target);
  const where = `fault ${req.kind} on ${req.target}`;
  if (target.type === 'link') {
    if (!(LINK_FAULT_KINDS as readonly string[]).includes(req.kind)) throw new FaultSpecError(`${where}: a link takes ${LINK_FAULT_KINDS.join(', ')}`);
    for (const k of ['op', 'range', 'probability', 'mode'] as const) if (req[k] !== undefined) throw new FaultSpecError(`${where}: --${k} applies to volumes, not links`);
    if (req.kind === 'delay' && req.ms === undefined) throw new FaultSpecError(`${where}: give the delay with --ms N`);
    return { target, link: { kind: req.kind as LinkFaultKind, ...(req.ms !== undefined ? { ms: req.ms } : {}), ...(req.jitter !== undefined ? { jitter: req.jitter } : {}) } };
  }
  if (!(VOLUME_FAULT_KINDS as readonly string[]).includes(req.kind)) throw new FaultSpecError(`${where}: a volume takes ${VOLUME_FAULT_KINDS.join(', ')}`);
  if (req.kind === 'delay' && req.ms === undefined) throw new FaultSpecError(`${where}: give the delay with --ms N`);
  if (req.kind !== 'delay' && (req.ms !== undefined || req.jitter !== undefined)) throw new FaultSpecError(`${where}: --ms and --jitter apply to delay only`);
  if (req.kind !== 'offline' && req.mode !== undefined) throw new FaultSpecError(`${where}: --mode applies to offline only`);
  const ops = req.op === undefined ? undefined : Array.isArray(req.op) ? req.op : [req.op];
  if (req.kind === 'corrupt' && ops && !ops.includes('read')) throw new FaultSpecError(`${where}: corrupt changes data read; its op is read`);
  if (req.kind === 'torn' && ops && !ops.includes('write')) throw new FaultSpecError(`${where}: torn cuts writes; its op is write`);
  const volume: VolumeFault = {
    kind: req.kind as VolumeFault['kind'],
    ...(ops ? { ops } : {}),
    ...(req.range ? { range: req.range } : {}),
    ...(req.probability !== undefined ? { probability: req.probability } : {}),
    ...(req.ms !== undefined ? { ms: req.ms } : {}),
    ...(req.jitter !== undefined ? { jitter: req.jitter } : {}),
    ...(req.mode ? { mode: req.mode } : {}),
  };
  return { target, volume };
}

/** An active fault as status, the admin API and the dashboard show it. */
export interface FaultStatus {
  target: string;
  kind: string;
  /** One line: "error, on write, bytes 0+65536". */
  description: string;
}

export function volumeFaultStatus(target: string, f: VolumeFault): FaultStatus {
  return { target, kind: f.kind, description: describeFault(f) };
}

export function linkFaultStatus(target: string, f: LinkFault): FaultStatus {
  const d = f.kind === 'delay' ? `delay, ${f.ms ?? 0} ms${f.jitter ? ` ± ${f.jitter}` : ''}` : f.kind === 'drop' ? 'drop (silent cut)' : 'reset';
  return { target, kind: f.kind, description: d };
}
