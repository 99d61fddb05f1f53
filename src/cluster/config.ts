// The cluster configuration: the YAML that `blockmirror up -c FILE` reads.
//
// Three passes, each with one job:
//   1. YAML text -> plain data        (syntax errors carry line:col)
//   2. plain data -> typed config     (zod: strict mappings, leaf values, defaults, paths resolved)
//   3. typed config -> cross-checks   (duplicates, pair references, sizes, clashing addresses)
// A broken file is refused with one ConfigError whose message names the file and the key path of
// every problem, earliest in the file first:
//   config.yaml: pairs[0].mirrors[0]: volume 9 does not exist in storage system 1
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { LineCounter, isMap, isPair, isScalar, isSeq, parseDocument, type Node } from 'yaml';
import * as z from 'zod';
import type { PairMode, VolRef } from '../controller/status.js';
import { formatSize, parseSize } from '../util/size.js';

export interface HostPort {
  host: string;
  /** 0 means "any free port" (tests). */
  port: number;
}

/** iSCSI per storage system (docs/iscsi.md): one target per storage system, each volume a LUN. */
export interface IscsiConfig {
  listen: HostPort;
  /** Default iqn.2026-12.org.blockmirror:ssN. */
  target: string;
  /** Absolute; USER:SECRET, optionally a second line for mutual CHAP. */
  chapFile?: string;
  /** IQN patterns and CIDRs. */
  allow?: string[];
}

export interface VolumeConfig {
  id: number;
  size: number;
  /** A target of its own for this volume (LUN 0) instead of the storage system's target. */
  iscsiTarget?: string;
}

export interface StorageSystemConfig {
  id: number;
  nbd: HostPort;
  /** Absolute. */
  nbdSocket?: string;
  admin: HostPort;
  /**
   * The replication control channel (docs/replication.md): where the other storage systems
   * reach this one. Required when a pair spans this storage system and another.
   */
  peer?: HostPort;
  /** Absolute, resolved against the YAML file's directory; absent means volumes live in memory. */
  dataDir?: string;
  cache?: { size: number };
  volumes: VolumeConfig[];
  iscsi?: IscsiConfig;
}

export interface PairConfig {
  name: string;
  mode: PairMode;
  master: VolRef;
  mirrors: VolRef[];
  /** Sync daemon limit in bytes per second. */
  syncRate?: number;
  /** What a sync pair does when a mirror cannot be written: never (suspend, keep writing) or data (refuse writes). */
  fence: FenceLevel;
  /** Resync by itself when an unreachable mirror's storage system is back (default true). */
  autoResync: boolean;
}

export type FenceLevel = 'never' | 'data';

export interface ClusterConfig {
  /** The file name used in messages, as given to loadConfig/parseConfig. */
  source: string;
  clusterSize: number;
  /** How long a silent peer storage system is given before it counts as gone, in ms. */
  peerTimeout: number;
  storageSystems: StorageSystemConfig[];
  pairs: PairConfig[];
  /** The cluster file system (docs/cfs.md); absent when the YAML has no `cfs:` section. */
  cfs?: CfsConfig;
}

export interface CfsConfig {
  /** Where the CFS server listens for its clients. */
  listen: HostPort;
  /** Absolute. Absent only when every storage system of its pairs is in memory: metadata then lives in memory too. */
  dataDir?: string;
  /** Allocation unit of file data on the master volumes. */
  blockSize: number;
  /** The pairs that hold files, in configuration order (default: all pairs). */
  pairs: string[];
  /** The storage system whose `up` process runs the CFS server (default: the lowest id). */
  ss: number;
  /** Whether the master is one of the copies opens are spread over (default true). */
  readFromMaster: boolean;
}

export interface ConfigProblem {
  /** Key path, e.g. "storageSystems[0].volumes[1].size"; "" for the whole file. */
  path: string;
  message: string;
  /** 1-based position of the offending key or value, when the YAML has it. */
  line?: number;
  col?: number;
}

export class ConfigError extends Error {
  override readonly name = 'ConfigError';
  readonly code = 'ECONFIG';
  constructor(
    readonly source: string,
    readonly problems: ConfigProblem[],
    options?: { cause?: unknown },
  ) {
    super(formatProblems(source, problems), options);
  }
}

export const DEFAULT_CLUSTER_SIZE = 64 * 1024;
export const DEFAULT_PEER_TIMEOUT_MS = 5000;
const MIN_PEER_TIMEOUT_MS = 100;
const MAX_PEER_TIMEOUT_MS = 10 * 60 * 1000;
const MIN_CLUSTER_SIZE = 4 * 1024;
const MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
const SECTOR = 512;
/** sun_path is 108 bytes on Linux, including the terminating NUL. */
const MAX_SOCKET_PATH = 107;
/** Past this many, the message says "and N more": the first few are what the reader acts on. */
const MAX_REPORTED = 10;

export function loadConfig(file: string): ClusterConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new ConfigError(file, [{ path: '', message: `cannot read the file: ${err.message.replace(/, \w+ '.*'$/, '')}` }], { cause: e });
  }
  return parseConfig(text, file, path.dirname(path.resolve(file)));
}

/** `source` names the file in messages; relative dataDir and nbdSocket are resolved against `baseDir`. */
export function parseConfig(text: string, source: string, baseDir: string): ClusterConfig {
  const lineCounter = new LineCounter();
  const doc = parseDocument(text, { lineCounter, prettyErrors: false });
  if (doc.errors.length > 0) {
    const first = doc.errors[0]!;
    const { line, col } = lineCounter.linePos(first.pos[0]);
    const more = doc.errors.length > 1 ? ` (and ${doc.errors.length - 1} more YAML errors)` : '';
    throw new ConfigError(source, [{ path: '', message: `YAML syntax error: ${first.message}${more}`, line, col }]);
  }
  let data: unknown;
  try {
    data = doc.toJS({ maxAliasCount: 100 });
  } catch (e) {
    // Unresolved aliases and alias bombs surface here rather than in doc.errors.
    throw new ConfigError(source, [{ path: '', message: `YAML error: ${(e as Error).message}` }], { cause: e });
  }
  if (!isPlainObject(data)) {
    const got = data === null || data === undefined ? 'an empty document' : show(data);
    throw new ConfigError(source, [{ path: '', message: `the top level must be a mapping with storageSystems and pairs, got ${got}`, line: 1, col: 1 }]);
  }

  const problems: RawProblem[] = [];
  const parsed = ClusterSchema.safeParse(data);
  let config: ClusterConfig | undefined;
  if (parsed.success) {
    config = build(parsed.data, source, baseDir, problems);
    if (parsed.data.cfs !== undefined) config.cfs = buildCfs(parsed.data.cfs, config, baseDir);
    crossCheck(config, problems);
    checkCfs(config, problems);
  } else {
    problems.push(...withoutEchoes(parsed.error.issues.flatMap((issue) => fromIssue(issue, data))));
  }
  if (problems.length > 0 || config === undefined) {
    throw new ConfigError(source, locate(problems, doc.contents, lineCounter));
  }
  return config;
}

// ---------------------------------------------------------------------------------------------
// Pass 2: shape. Leaf values are parsed by plain functions that throw a message; zod carries the
// structure, the strictness and the key paths.

type Segment = string | number;
interface RawProblem {
  path: Segment[];
  message: string;
  /** For an unknown key: the known key it is probably a typo of. */
  meant?: Segment[];
}

const MISSING = 'missing required key';

class LeafError extends Error {}

function leaf<T>(parse: (input: unknown) => T) {
  return z.unknown().transform((input, ctx) => {
    if (input === undefined) {
      ctx.issues.push({ code: 'custom', message: MISSING, input });
      return z.NEVER;
    }
    try {
      return parse(input);
    } catch (e) {
      if (!(e instanceof LeafError)) throw e;
      ctx.issues.push({ code: 'custom', message: e.message, input });
      return z.NEVER;
    }
  });
}

function fail(message: string): never {
  throw new LeafError(message);
}

function mapping<S extends z.ZodRawShape>(shape: S) {
  return z.strictObject(shape, { error: (iss) => (iss.input === undefined ? MISSING : `expected a mapping, got ${show(iss.input)}`) });
}

function list<T extends z.ZodType>(item: T) {
  return z.array(item, { error: (iss) => (iss.input === undefined ? MISSING : `expected a list, got ${show(iss.input)}`) });
}

const id = leaf((v) => (Number.isSafeInteger(v) && (v as number) > 0 ? (v as number) : fail(`expected a positive integer, got ${show(v)}`)));

function readSize(v: unknown, expected: string): number {
  if (typeof v !== 'number' && typeof v !== 'string') fail(`expected ${expected}, got ${show(v)}`);
  try {
    return parseSize(v);
  } catch (e) {
    fail((e as Error).message);
  }
}

function size(check: (bytes: number, input: string | number) => string | undefined) {
  return leaf((v) => {
    const bytes = readSize(v, 'a size such as 512, 64KiB, 1GiB');
    const problem = check(bytes, v as string | number);
    return problem === undefined ? bytes : fail(problem);
  });
}

const volumeSize = size((n, v) => {
  if (n === 0) return 'a volume size must be greater than 0';
  if (n % SECTOR !== 0) return `volume size ${JSON.stringify(v)} is not a multiple of ${SECTOR} bytes`;
  return undefined;
});

const clusterSize = size((n, v) =>
  n >= MIN_CLUSTER_SIZE && n <= MAX_CLUSTER_SIZE && (n & (n - 1)) === 0
    ? undefined
    : `clusterSize must be a power of two from ${formatSize(MIN_CLUSTER_SIZE)} to ${formatSize(MAX_CLUSTER_SIZE)}, got ${JSON.stringify(v)}`,
);

const cacheSize = size((n) => (n > 0 ? undefined : 'a cache size must be greater than 0 (leave out cache for none)'));

/** Bytes per second; "100MiB/s" reads as well as "100MiB". */
const syncRate = leaf((v) => {
  const bytes = readSize(typeof v === 'string' ? v.replace(/\/s\s*$/, '') : v, 'a rate in bytes per second such as 100MiB');
  return bytes > 0 ? bytes : fail('syncRate must be greater than 0 (leave it out for no limit)');
});

const hostPort = leaf((v): HostPort => {
  const expected = '(expected HOST:PORT or [IPv6]:PORT, e.g. 127.0.0.1:10809)';
  if (typeof v !== 'string') fail(`expected an address HOST:PORT, got ${show(v)} ${expected}`);
  const m = /^(?:\[([^\]]*)\]|([^:[\]]+)):(\d{1,5})$/.exec(v);
  if (!m) {
    const hint = /^[^[].*:.*:/.test(v) ? ' (put an IPv6 address in brackets, e.g. [::1]:10809)' : ` ${expected}`;
    fail(`invalid address ${JSON.stringify(v)}${hint}`);
  }
  const host = m[1] ?? m[2]!;
  if (m[1] !== undefined && !net.isIPv6(host)) fail(`invalid IPv6 address ${JSON.stringify(host)} in ${JSON.stringify(v)}`);
  if (m[2] !== undefined && !/^[A-Za-z0-9.-]+$/.test(host)) fail(`invalid host ${JSON.stringify(host)} in ${JSON.stringify(v)} ${expected}`);
  const port = Number(m[3]);
  if (port > 65535) fail(`invalid port ${port} in ${JSON.stringify(v)} (expected 1..65535, or 0 for any free port)`);
  return { host, port };
});

/** Milliseconds: 5000, "5s", "500ms". */
const peerTimeout = leaf((v) => {
  const m = typeof v === 'number' ? [String(v), String(v), 'ms'] : typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(v) : null;
  if (!m) fail(`expected a duration such as 5s or 500ms, got ${show(v)}`);
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1);
  if (!Number.isFinite(ms) || ms < MIN_PEER_TIMEOUT_MS || ms > MAX_PEER_TIMEOUT_MS) {
    fail(`peerTimeout must be from ${MIN_PEER_TIMEOUT_MS}ms to ${MAX_PEER_TIMEOUT_MS / 1000}s, got ${show(v)}`);
  }
  return Math.round(ms);
});

const fence = leaf((v): FenceLevel => (v === 'never' || v === 'data' ? v : fail(`expected never or data, got ${show(v)}`)));

const bool = leaf((v) => (typeof v === 'boolean' ? v : fail(`expected true or false, got ${show(v)}`)));

const filePath = leaf((v) => (typeof v === 'string' && v.length > 0 ? v : fail(`expected a path, got ${show(v)}`)));

const mode = leaf((v): PairMode => (v === 'sync' || v === 'async' ? v : fail(`expected sync or async, got ${show(v)}`)));

// Pair names appear in admin API URLs (/api/pairs/NAME/split), so keep them URL-safe.
const pairName = leaf((v) =>
  typeof v === 'string' && /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(v)
    ? v
    : fail(`expected a pair name (letters, digits, ".", "_" and "-", at most 64), got ${show(v)}`),
);

const VolRefSchema = mapping({ ss: id, vol: id });
// iSCSI names (RFC 3720 3.2.6): iqn.YYYY-MM.reversed.domain[:anything] or eui.16HEX.
const iscsiName = leaf((v) =>
  typeof v === 'string' && /^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[a-z0-9.:_-]+)?|eui\.[0-9a-f]{16})$/i.test(v) && v.length <= 223
    ? v.toLowerCase()
    : fail(`expected an iSCSI name like iqn.2026-12.org.example:disk1, got ${show(v)}`),
);
// "HOST:PORT", or "HOST" alone for the iSCSI port 3260.
const iscsiAddress = leaf((v): HostPort => {
  if (typeof v !== 'string') fail(`expected an address HOST:PORT (port 3260 if omitted), got ${show(v)}`);
  const m = /^(?:\[([^\]]*)\]|([A-Za-z0-9.-]+))(?::(\d{1,5}))?$/.exec(v);
  if (!m || (m[1] !== undefined && !net.isIPv6(m[1]))) fail(`invalid iSCSI address ${JSON.stringify(v)} (expected HOST:PORT, e.g. 127.0.0.1:3260)`);
  const port = m![3] === undefined ? 3260 : Number(m![3]);
  if (port > 65535) fail(`invalid port ${port} in ${JSON.stringify(v)}`);
  return { host: m![1] ?? m![2]!, port };
});
const allowEntry = leaf((v) =>
  typeof v === 'string' && v.length > 0 && v.length <= 255 ? v : fail(`expected an IQN pattern or a CIDR, got ${show(v)}`),
);
const VolumeSchema = mapping({ id, size: volumeSize, iscsiTarget: iscsiName.optional() });
const CacheSchema = mapping({ size: cacheSize });
const StorageSystemSchema = mapping({
  id,
  nbd: hostPort,
  nbdSocket: filePath.optional(),
  admin: hostPort,
  peer: hostPort.optional(),
  dataDir: filePath.optional(),
  cache: CacheSchema.optional(),
  volumes: list(VolumeSchema),
  iscsi: iscsiAddress.optional(),
  iscsiTarget: iscsiName.optional(),
  iscsiChapFile: filePath.optional(),
  iscsiAllow: list(allowEntry).optional(),
});
const PairSchema = mapping({
  name: pairName,
  mode,
  master: VolRefSchema,
  mirrors: list(VolRefSchema).min(1, { error: 'a pair needs at least one mirror' }),
  syncRate: syncRate.optional(),
  fence: fence.optional(),
  autoResync: bool.optional(),
});
// The `cfs:` section (docs/cfs.md). Cross-checks are in checkCfs().
const DEFAULT_CFS_BLOCK_SIZE = 64 * 1024;
const cfsBlockSize = size((n, v) =>
  n >= MIN_CLUSTER_SIZE && n <= MAX_CLUSTER_SIZE && (n & (n - 1)) === 0
    ? undefined
    : `blockSize must be a power of two from ${formatSize(MIN_CLUSTER_SIZE)} to ${formatSize(MAX_CLUSTER_SIZE)}, got ${JSON.stringify(v)}`,
);
const cfsFlag = leaf((v) => (typeof v === 'boolean' ? v : fail(`expected true or false, got ${show(v)}`)));
const CfsSchema = mapping({
  listen: hostPort,
  dataDir: filePath.optional(),
  blockSize: cfsBlockSize.optional(),
  pairs: list(pairName).min(1, { error: 'list at least one pair, or leave pairs out for all of them' }).optional(),
  ss: id.optional(),
  readFromMaster: cfsFlag.optional(),
});
const ClusterSchema = mapping({
  clusterSize: clusterSize.optional(),
  peerTimeout: peerTimeout.optional(),
  storageSystems: list(StorageSystemSchema).min(1, { error: 'at least one storage system is required' }),
  pairs: list(PairSchema).optional(),
  cfs: CfsSchema.optional(),
});

/** Which keys a mapping takes, by its path with indexes dropped: for "did you mean". */
const KEYS_AT = new Map<string, readonly string[]>([
  ['', Object.keys(ClusterSchema.shape)],
  ['storageSystems[]', Object.keys(StorageSystemSchema.shape)],
  ['storageSystems[].volumes[]', Object.keys(VolumeSchema.shape)],
  ['storageSystems[].cache', Object.keys(CacheSchema.shape)],
  ['pairs[]', Object.keys(PairSchema.shape)],
  ['pairs[].master', Object.keys(VolRefSchema.shape)],
  ['pairs[].mirrors[]', Object.keys(VolRefSchema.shape)],
  ['cfs', Object.keys(CfsSchema.shape)],
]);

function fromIssue(issue: z.core.$ZodIssue, data: unknown): RawProblem[] {
  const at = issue.path.filter((s): s is Segment => typeof s !== 'symbol');
  if (issue.code !== 'unrecognized_keys') return [{ path: at, message: issue.message }];
  const known = KEYS_AT.get(at.map((s) => (typeof s === 'number' ? '[]' : `.${s}`)).join('').replace(/^\./, '')) ?? [];
  const present = valueAt(data, at);
  return issue.keys.map((key) => {
    const guess = closest(key, known.filter((k) => !(isPlainObject(present) && k in present)));
    return guess
      ? { path: [...at, key], message: `unknown key (did you mean "${guess}"?)`, meant: [...at, guess] }
      : { path: [...at, key], message: `unknown key (expected one of: ${known.join(', ')})` };
  });
}

/** A typo of a required key is one mistake, not two: drop the "missing" that echoes "did you mean". */
function withoutEchoes(problems: RawProblem[]): RawProblem[] {
  const meant = new Set(problems.flatMap((p) => (p.meant ? [formatPath(p.meant)] : [])));
  return problems.filter((p) => !(p.message === MISSING && meant.has(formatPath(p.path))));
}

// ---------------------------------------------------------------------------------------------
// Pass 2b: defaults and absolute paths.

type Parsed = z.output<typeof ClusterSchema>;

function build(p: Parsed, source: string, baseDir: string, problems: RawProblem[]): ClusterConfig {
  const storageSystems = p.storageSystems.map((ss, i): StorageSystemConfig => {
    const out: StorageSystemConfig = { id: ss.id, nbd: ss.nbd, admin: ss.admin, volumes: ss.volumes };
    if (ss.nbdSocket !== undefined) {
      out.nbdSocket = path.resolve(baseDir, ss.nbdSocket);
      const bytes = Buffer.byteLength(out.nbdSocket);
      if (bytes > MAX_SOCKET_PATH) {
        problems.push({ path: ['storageSystems', i, 'nbdSocket'], message: `socket path ${out.nbdSocket} is ${bytes} bytes, but unix sockets allow at most ${MAX_SOCKET_PATH}` });
      }
    }
    if (ss.peer !== undefined) {
      out.peer = ss.peer;
      if (ss.peer.port === 0) problems.push({ path: ['storageSystems', i, 'peer'], message: 'the peer port cannot be 0: the other storage systems must know where to reach this one' });
    }
    if (ss.dataDir !== undefined) out.dataDir = path.resolve(baseDir, ss.dataDir);
    if (ss.iscsi !== undefined) {
      out.iscsi = { listen: ss.iscsi, target: ss.iscsiTarget ?? `iqn.2026-12.org.blockmirror:ss${ss.id}` };
      if (ss.iscsiChapFile !== undefined) out.iscsi.chapFile = path.resolve(baseDir, ss.iscsiChapFile);
      if (ss.iscsiAllow !== undefined) out.iscsi.allow = ss.iscsiAllow;
    } else if (ss.iscsiTarget !== undefined || ss.iscsiChapFile !== undefined || ss.iscsiAllow !== undefined) {
      problems.push({ path: ['storageSystems', i, 'iscsi'], message: 'iscsiTarget, iscsiChapFile and iscsiAllow need iscsi: HOST:PORT on the same storage system' });
    }
    if (ss.cache !== undefined) out.cache = { size: ss.cache.size };
    return out;
  });
  const pairs = (p.pairs ?? []).map((pr, j): PairConfig => {
    if (pr.fence === 'data' && pr.mode === 'async') {
      problems.push({ path: ['pairs', j, 'fence'], message: 'fence: data applies to sync pairs (an async pair never waits for its mirrors)' });
    }
    const out: PairConfig = { name: pr.name, mode: pr.mode, master: pr.master, mirrors: pr.mirrors, fence: pr.fence ?? 'never', autoResync: pr.autoResync ?? true };
    if (pr.syncRate !== undefined) out.syncRate = pr.syncRate;
    return out;
  });
  return { source, clusterSize: p.clusterSize ?? DEFAULT_CLUSTER_SIZE, peerTimeout: p.peerTimeout ?? DEFAULT_PEER_TIMEOUT_MS, storageSystems, pairs };
}

// ---------------------------------------------------------------------------------------------
// Pass 3: the checks that need the whole file.

function crossCheck(cfg: ClusterConfig, problems: RawProblem[]): void {
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });

  const ssById = new Map<number, { ss: StorageSystemConfig; index: number }>();
  cfg.storageSystems.forEach((ss, i) => {
    const first = ssById.get(ss.id);
    if (first) report(['storageSystems', i, 'id'], `duplicate storage system id ${ss.id} (also storageSystems[${first.index}].id)`);
    else ssById.set(ss.id, { ss, index: i });
    const seen = new Map<number, number>();
    ss.volumes.forEach((vol, j) => {
      const k = seen.get(vol.id);
      if (k !== undefined) report(['storageSystems', i, 'volumes', j, 'id'], `duplicate volume id ${vol.id} in storage system ${ss.id} (also volumes[${k}])`);
      else seen.set(vol.id, j);
    });
  });

  checkEndpoints(cfg, report);

  // Volume -> where it was first used, to refuse a volume in two pairs or twice in one.
  const used = new Map<string, { pair: number; at: string }>();
  const needsPeer = new Set<number>();
  const names = new Map<string, number>();
  cfg.pairs.forEach((pair, i) => {
    const other = names.get(pair.name);
    if (other !== undefined) report(['pairs', i, 'name'], `duplicate pair name "${pair.name}" (also pairs[${other}].name)`);
    else names.set(pair.name, i);

    const refs: { ref: VolRef; at: Segment[] }[] = [
      { ref: pair.master, at: ['pairs', i, 'master'] },
      ...pair.mirrors.map((ref, j) => ({ ref, at: ['pairs', i, 'mirrors', j] })),
    ];
    let masterSize: number | undefined;
    for (const { ref, at } of refs) {
      const owner = ssById.get(ref.ss)?.ss;
      const vol = owner?.volumes.find((v) => v.id === ref.vol);
      if (!owner) {
        report(at, `storage system ${ref.ss} does not exist`);
        continue;
      }
      if (!vol) {
        report(at, `volume ${ref.vol} does not exist in storage system ${ref.ss}`);
        continue;
      }
      const key = `${ref.ss}/${ref.vol}`;
      const prior = used.get(key);
      if (prior) {
        const where = prior.pair === i ? 'in this pair' : `in pair "${cfg.pairs[prior.pair]!.name}"`;
        report(at, `volume ${ref.vol} of storage system ${ref.ss} is already used ${where} (${prior.at})`);
        continue;
      }
      used.set(key, { pair: i, at: formatPath(at) });
      if (ref.ss !== pair.master.ss && ssById.has(pair.master.ss)) {
        for (const end of [pair.master.ss, ref.ss]) {
          const s = ssById.get(end);
          if (s && s.ss.peer === undefined && !needsPeer.has(end)) {
            needsPeer.add(end);
            report(['storageSystems', s.index, 'peer'], `missing required key: pair "${pair.name}" spans storage systems ${pair.master.ss} and ${ref.ss}, which reach each other at their peer address (e.g. peer: 127.0.0.1:7001)`);
          }
        }
      }
      if (at[2] === 'master') masterSize = vol.size;
      else if (masterSize !== undefined && vol.size !== masterSize) {
        report(at, `volume ${ref.vol} of storage system ${ref.ss} is ${formatSize(vol.size)} but its master is ${formatSize(masterSize)} (a mirror must be the same size)`);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The `cfs:` section: defaults, then the checks against the rest of the file.

function buildCfs(c: NonNullable<Parsed['cfs']>, cfg: ClusterConfig, baseDir: string): CfsConfig {
  const out: CfsConfig = {
    listen: c.listen,
    blockSize: c.blockSize ?? DEFAULT_CFS_BLOCK_SIZE,
    pairs: c.pairs ?? cfg.pairs.map((p) => p.name),
    ss: c.ss ?? Math.min(...cfg.storageSystems.map((s) => s.id)),
    readFromMaster: c.readFromMaster ?? true,
  };
  if (c.dataDir !== undefined) out.dataDir = path.resolve(baseDir, c.dataDir);
  return out;
}

function checkCfs(cfg: ClusterConfig, problems: RawProblem[]): void {
  const cfs = cfg.cfs;
  if (cfs === undefined) return;
  const report = (at: Segment[], message: string) => problems.push({ path: at, message });
  const known = cfg.pairs.map((p) => p.name);
  if (cfs.pairs.length === 0) report(['cfs'], 'the file system needs at least one pair to keep files on, and pairs: has none');
  const seen = new Map<string, number>();
  cfs.pairs.forEach((name, i) => {
    const first = seen.get(name);
    if (first !== undefined) return report(['cfs', 'pairs', i], `pair "${name}" is listed twice (also cfs.pairs[${first}])`);
    seen.set(name, i);
    const pair = cfg.pairs.find((p) => p.name === name);
    if (!pair) return report(['cfs', 'pairs', i], `pair "${name}" does not exist (${known.length === 0 ? 'pairs: is empty' : `pairs: ${known.join(', ')}`})`);
    const master = cfg.storageSystems.find((s) => s.id === pair.master.ss)?.volumes.find((v) => v.id === pair.master.vol);
    if (master && master.size < cfs.blockSize) {
      report(['cfs', 'pairs', i], `the master of pair "${name}" (${formatSize(master.size)}) is smaller than one block (cfs.blockSize ${formatSize(cfs.blockSize)})`);
    }
  });
  if (!cfg.storageSystems.some((s) => s.id === cfs.ss)) report(['cfs', 'ss'], `storage system ${cfs.ss} does not exist`);

  // Metadata must be as durable as the data it describes.
  const onDisk = cfg.storageSystems.findIndex((s) => s.dataDir !== undefined && cfg.pairs.some((p) => cfs.pairs.includes(p.name) && [p.master, ...p.mirrors].some((r) => r.ss === s.id)));
  if (cfs.dataDir === undefined && onDisk >= 0) {
    report(['cfs', 'dataDir'], `${MISSING}: the volumes of the file system's pairs are on disk (storageSystems[${onDisk}].dataDir), so its metadata must be too`);
  }
  const sameDir = cfg.storageSystems.findIndex((s) => s.dataDir !== undefined && s.dataDir === cfs.dataDir);
  if (sameDir >= 0) report(['cfs', 'dataDir'], `data directory ${cfs.dataDir} is already used by storageSystems[${sameDir}].dataDir`);

  if (cfs.listen.port !== 0) {
    for (const [i, ss] of cfg.storageSystems.entries()) {
      for (const [key, hp] of Object.entries(ss) as [string, unknown][]) {
        if (!isHostPort(hp) || hp.port !== cfs.listen.port || !hostsOverlap(canonicalHost(hp.host), canonicalHost(cfs.listen.host))) continue;
        report(['cfs', 'listen'], `port ${hp.port} on ${cfs.listen.host} is already used by storageSystems[${i}].${key} (${formatHostPort(hp)})`);
      }
    }
  }
}

function isHostPort(v: unknown): v is HostPort {
  return isPlainObject(v) && typeof v.host === 'string' && typeof v.port === 'number' && Object.keys(v).length === 2;
}

/** Two listeners clash on one port when their hosts overlap; a wildcard host overlaps every host. */
function checkEndpoints(cfg: ClusterConfig, report: (at: Segment[], message: string) => void): void {
  const tcp: { at: Segment[]; hp: HostPort; canon: string }[] = [];
  const sockets = new Map<string, string>();
  const dataDirs = new Map<string, string>();
  cfg.storageSystems.forEach((ss, i) => {
    for (const key of ['nbd', 'admin', 'peer'] as const) {
      const hp = ss[key];
      if (hp === undefined) continue;
      const at: Segment[] = ['storageSystems', i, key];
      // Port 0 asks the kernel for a free port: it never clashes.
      const clash = hp.port === 0 ? undefined : tcp.find((t) => t.hp.port === hp.port && hostsOverlap(t.canon, canonicalHost(hp.host)));
      if (clash) report(at, `port ${hp.port} on ${hp.host} is already used by ${formatPath(clash.at)} (${formatHostPort(clash.hp)})`);
      else tcp.push({ at, hp, canon: canonicalHost(hp.host) });
    }
    if (ss.nbdSocket !== undefined) {
      const first = sockets.get(ss.nbdSocket);
      if (first) report(['storageSystems', i, 'nbdSocket'], `socket ${ss.nbdSocket} is already used by ${first}`);
      else sockets.set(ss.nbdSocket, `storageSystems[${i}].nbdSocket`);
    }
    if (ss.dataDir !== undefined) {
      const first = dataDirs.get(ss.dataDir);
      if (first) report(['storageSystems', i, 'dataDir'], `data directory ${ss.dataDir} is already used by ${first}`);
      else dataDirs.set(ss.dataDir, `storageSystems[${i}].dataDir`);
    }
  });
}

const WILDCARD_HOSTS = new Set(['0.0.0.0', '::']);
const LOOPBACK_HOSTS = new Set(['127.0.0.1', '::1']);

function canonicalHost(host: string): string {
  const h = host.toLowerCase();
  // The URL parser canonicalises IPv6 spellings: 0:0::0 -> ::, 0:0:0:0:0:0:0:1 -> ::1.
  return net.isIPv6(h) ? new URL(`http://[${h}]/`).hostname.slice(1, -1) : h;
}

function hostsOverlap(a: string, b: string): boolean {
  if (a === b || WILDCARD_HOSTS.has(a) || WILDCARD_HOSTS.has(b)) return true;
  return (a === 'localhost' && LOOPBACK_HOSTS.has(b)) || (b === 'localhost' && LOOPBACK_HOSTS.has(a));
}

// ---------------------------------------------------------------------------------------------
// Messages.

function formatProblems(source: string, problems: ConfigProblem[]): string {
  const shown = problems.slice(0, MAX_REPORTED).map((p) => (p.path === '' ? p.message : `${p.path}: ${p.message}`));
  if (problems.length > MAX_REPORTED) shown.push(`and ${problems.length - MAX_REPORTED} more problems`);
  // Only a problem without a key path (a syntax error) gets line:col in the text: a key path already
  // says where, and stays true when lines move. The file:line:col: form is what editors make clickable.
  const first = problems[0];
  const where = first?.path === '' && first.line !== undefined ? `${source}:${first.line}:${first.col}` : source;
  return `${where}: ${shown.join('; ')}`;
}

function formatHostPort(hp: HostPort): string {
  return hp.host.includes(':') ? `[${hp.host}]:${hp.port}` : `${hp.host}:${hp.port}`;
}

function formatPath(at: Segment[]): string {
  let out = '';
  for (const s of at) {
    if (typeof s === 'number') out += `[${s}]`;
    else if (/^[A-Za-z_][A-Za-z0-9_]*$/.test(s)) out += out === '' ? s : `.${s}`;
    else out += `[${JSON.stringify(s)}]`;
  }
  return out;
}

/** Attaches line:col and sorts into file order, so the first problem is the first one a reader meets. */
function locate(raw: RawProblem[], root: Node | null, lc: LineCounter): ConfigProblem[] {
  const located = raw.map((p, order) => {
    const offset = offsetOf(root, p.path);
    const pos = offset === undefined ? undefined : lc.linePos(offset);
    return { problem: { path: formatPath(p.path), message: p.message, ...(pos ? { line: pos.line, col: pos.col } : {}) }, offset: offset ?? Infinity, order };
  });
  located.sort((a, b) => a.offset - b.offset || a.order - b.order);
  return located.map((l) => l.problem);
}

/** The offset of the key (for a mapping entry) or item at `at`, or of its nearest existing parent. */
function offsetOf(root: Node | null, at: Segment[]): number | undefined {
  let node: unknown = root;
  let offset = (root as Node | null)?.range?.[0];
  for (const s of at) {
    if (isMap(node)) {
      const pair = node.items.find((it) => isPair(it) && isScalar(it.key) && String(it.key.value) === String(s));
      if (!pair) break;
      offset = (pair.key as Node).range?.[0] ?? offset;
      node = pair.value;
    } else if (isSeq(node) && typeof s === 'number') {
      const item = node.items[s];
      if (!item) break;
      offset = (item as Node).range?.[0] ?? offset;
      node = item;
    } else break;
  }
  return offset;
}

function valueAt(data: unknown, at: Segment[]): unknown {
  let v = data;
  for (const s of at) v = v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[s] : undefined;
  return v;
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v) && !ArrayBuffer.isView(v);
}

function show(v: unknown): string {
  if (v === undefined) return 'nothing';
  if (v === null) return 'an empty value';
  if (Array.isArray(v)) return 'a list';
  if (isPlainObject(v)) return 'a mapping';
  if (typeof v === 'string') return JSON.stringify(v);
  return String(v);
}

/** The known key within edit distance 2 of a mistyped one, for "did you mean". */
function closest(key: string, known: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = 3;
  for (const k of known) {
    const d = editDistance(key.toLowerCase(), k.toLowerCase());
    if (d < bestDistance) [best, bestDistance] = [k, d];
  }
  return best;
}

function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const row = [i];
    for (let j = 1; j <= b.length; j++) {
      row[j] = Math.min(prev[j]! + 1, row[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = row;
  }
  return prev[b.length]!;
}
