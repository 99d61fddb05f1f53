// The cluster tables as they live in etcd (docs/cluster.md), under one prefix:
//
//   key                          value (JSON)                                           written by
//   P/ss/ID                      {id, nbd, admin, peer?, pid, startedAt}   leased       that SS (`up`)
//   P/lv/NAME                    {name, master: {ss, vol}, epoch, mode, size}           seed; failover txn
//   P/mirrors/NAME               {mirrors: [{ss, vol, mode, state}]}                    seed; the master's SS
//   P/pairs/NAME                 {state, epoch, master, role, at, mirrors: [...]}       the master's SS
//   P/history/NAME/EPOCH         {name, at, epoch, from, to, reason}                          failover txn
//
// A logical volume (Zambeel's logical volume table) is a pair: hosts and gateways name it, and
// its row says which (storage system, volume) is its master now, in which epoch. The volume
// mirrors table lists the other copies. Every value is checked with zod when read: a corrupt
// key is logged and skipped, never trusted and never a crash.
import * as z from 'zod';

const VolRef = z.strictObject({ ss: z.number().int().positive(), vol: z.number().int().positive() });

export const SsRecord = z.strictObject({
  id: z.number().int().positive(),
  nbd: z.string(),
  admin: z.string(),
  peer: z.string().optional(),
  pid: z.number().int(),
  startedAt: z.string(),
});
export type SsRecord = z.infer<typeof SsRecord>;

export const LvRecord = z.strictObject({
  name: z.string(),
  master: VolRef,
  epoch: z.number().int().positive(),
  mode: z.enum(['sync', 'async']),
  size: z.number().int().positive(),
});
export type LvRecord = z.infer<typeof LvRecord>;

export const MirrorsRecord = z.strictObject({
  mirrors: z.array(z.strictObject({ ss: z.number().int().positive(), vol: z.number().int().positive(), mode: z.enum(['sync', 'async']), state: z.string() })),
});
export type MirrorsRecord = z.infer<typeof MirrorsRecord>;

export const PairRecord = z.strictObject({
  state: z.string(),
  epoch: z.number().int().nonnegative(),
  master: VolRef,
  at: z.string(),
  mirrors: z.array(z.strictObject({ ss: z.number().int(), vol: z.number().int(), invalidClusters: z.number().int().nonnegative(), connected: z.boolean().optional() })),
});
export type PairRecord = z.infer<typeof PairRecord>;

export const HistoryRecord = z.strictObject({
  name: z.string(),
  at: z.string(),
  epoch: z.number().int().positive(),
  from: VolRef,
  to: VolRef,
  reason: z.string(),
});
export type HistoryRecord = z.infer<typeof HistoryRecord>;

/** Everything under the prefix, parsed; `corrupt` lists the keys that were not. */
export interface Tables {
  storageSystems: Map<number, SsRecord>;
  logicalVolumes: Map<string, LvRecord & { revision: string }>;
  mirrors: Map<string, MirrorsRecord>;
  pairs: Map<string, PairRecord>;
  history: HistoryRecord[];
  corrupt: { key: string; problem: string }[];
}

export function emptyTables(): Tables {
  return { storageSystems: new Map(), logicalVolumes: new Map(), mirrors: new Map(), pairs: new Map(), history: [], corrupt: [] };
}

export class Keys {
  constructor(readonly prefix: string) {}
  ss(id: number): string {
    return `${this.prefix}/ss/${id}`;
  }
  lv(name: string): string {
    return `${this.prefix}/lv/${name}`;
  }
  mirrors(name: string): string {
    return `${this.prefix}/mirrors/${name}`;
  }
  pair(name: string): string {
    return `${this.prefix}/pairs/${name}`;
  }
  history(name: string, epoch: number): string {
    return `${this.prefix}/history/${name}/${String(epoch).padStart(10, '0')}`;
  }
}

/**
 * Put one key's value into the tables. Returns false (and records why in `corrupt`) for a key
 * that is not one of ours or whose value does not parse.
 */
export function apply(tables: Tables, keys: Keys, key: string, value: string | null, revision = '0'): boolean {
  const rest = key.startsWith(`${keys.prefix}/`) ? key.slice(keys.prefix.length + 1) : undefined;
  const [table, name, sub] = rest?.split('/') ?? [];
  const bad = (problem: string) => {
    tables.corrupt.push({ key, problem });
    return false;
  };
  if (!table || !name) return bad('not a key of the cluster tables');
  if (value === null) {
    if (table === 'ss') tables.storageSystems.delete(Number(name));
    else if (table === 'lv') tables.logicalVolumes.delete(name);
    else if (table === 'mirrors') tables.mirrors.delete(name);
    else if (table === 'pairs') tables.pairs.delete(name);
    return true;
  }
  let json: unknown;
  try {
    json = JSON.parse(value);
  } catch {
    return bad('the value is not JSON');
  }
  const parse = <T>(schema: z.ZodType<T>): T | undefined => {
    const r = schema.safeParse(json);
    if (!r.success) {
      bad(r.error.issues.map((i) => `${i.path.join('.') || 'value'}: ${i.message}`).join('; '));
      return undefined;
    }
    return r.data;
  };
  switch (table) {
    case 'ss': {
      const r = parse(SsRecord);
      if (!r) return false;
      if (String(r.id) !== name) return bad(`the record names storage system ${r.id}`);
      tables.storageSystems.set(r.id, r);
      return true;
    }
    case 'lv': {
      const r = parse(LvRecord);
      if (!r) return false;
      if (r.name !== name) return bad(`the record names logical volume ${r.name}`);
      tables.logicalVolumes.set(name, { ...r, revision });
      return true;
    }
    case 'mirrors': {
      const r = parse(MirrorsRecord);
      if (!r) return false;
      tables.mirrors.set(name, r);
      return true;
    }
    case 'pairs': {
      const r = parse(PairRecord);
      if (!r) return false;
      tables.pairs.set(name, r);
      return true;
    }
    case 'history': {
      if (!sub) return bad('a history key needs an epoch');
      const r = parse(HistoryRecord);
      if (!r) return false;
      tables.history.push(r);
      return true;
    }
    default:
      return bad(`unknown table "${table}"`);
  }
}
