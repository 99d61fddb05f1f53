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
import { LineCounter, parseDocument } from 'yaml';
import * as z from 'zod';
import { FaultRequestSchema, FaultSpecError, parseByteRange, resolveFault, type FaultRequest } from '../controller/fault-table.js';
import type { PairMode, VolRef } from '../controller/status.js';
import type { VolumeEntry } from '../controller/storage-system.js';
import { formatSize, parseSize } from '../util/size.js';
import { closest, formatPath, formatProblems, isPlainObject, locate, show, valueAt } from './config-problems.js';
import { buildCfs, checkCfs, crossCheck } from './config-checks.js';
import { buildSecurity, checkSecurity } from './config-security.js';
import { allowEntryProblem } from '../util/allow-list.js';
import { checkSvol, type SvolAttr, type SvolGroupConfig } from './config-svol.js';
import { buildIscsi } from './config-iscsi.js';
import type { ChapSecrets } from '../iscsi/chap.js';

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
  /** CHAP secrets given inline (`iscsiChap:`), instead of chapFile. Never logged nor shown in status. */
  chap?: ChapSecrets;
  /** IQN patterns and CIDRs. */
  allow?: string[];
}

/** A volume as the YAML gives it: the controller's VolumeEntry (storage-system.ts documents each key). */
export type VolumeConfig = VolumeEntry;

/** NBD STARTTLS and this storage system's credential (docs/SECURITY.md). Paths are absolute. */
export interface TlsConfig {
  mode: 'off' | 'allow' | 'require';
  cert?: string;
  key?: string;
  pskFile?: string;
  /** NBD clients must show a certificate signed by security.ca, or a PSK. */
  verifyClients: boolean;
}

/** The `security:` section (docs/SECURITY.md). */
export interface SecurityConfig {
  /** Allow listeners on non-loopback addresses without TLS (or CHAP, for iSCSI). */
  insecure: boolean;
  /** The cluster CA: peers' certificates (mutual TLS on the peer channel) and NBD client certificates. Absolute. */
  ca?: string;
  /** Absolute. Default: DATADIR/admin.token, or a per-user runtime directory for in-memory storage systems. */
  adminTokenFile?: string;
  /** Host header values the admin API answers besides its own address and localhost (DNS rebinding). */
  adminHosts: string[];
  /** GET requests need no token. */
  adminReadOpen: boolean;
  /** The admin API serves HTTPS with each storage system's tls.cert; clients check it against `ca`. */
  adminTls: boolean;
  /** What our own NBD clients (gateways, the CFS) present to a storage system that verifies clients. Absolute. */
  client?: { cert: string; key: string };
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
  cache?: CacheConfig;
  volumes: VolumeConfig[];
  iscsi?: IscsiConfig;
  tls?: TlsConfig;
  /** Who may attach its NBD exports (util/allow-list.ts). */
  allow?: string[];
  /** P-VOLs with their groups of S-VOLs (docs/svol.md, config-svol.ts). */
  svolGroups?: SvolGroupConfig[];
}

/** A storage system's cache memory; `policy` and `bypass` may change at run time (`blockmirror apply`). */
export interface CacheConfig {
  size: number;
  policy: CachePolicy;
  /** Writes of at least this many bytes, and sequential streams once they have written this much, go past the cache, straight to the volume; 0: none (cache/memory.ts, rule 5). */
  bypass: number;
}

export type CachePolicy = 'write-back' | 'write-through';

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
  /**
   * With etcd: promote a mirror by itself when the master's storage system loses its lease.
   * true (default): sync pairs only; allowDataLoss: async pairs too; false: never.
   */
  autoFailover: boolean | 'allowDataLoss';
}

/** The cluster metadata store (docs/cluster.md). Absent: the YAML alone says everything. */
export interface EtcdConfig {
  endpoints: string[];
  /** Key prefix of every table, e.g. /blockmirror. */
  prefix: string;
  /** Lease of each storage system's registration, ms (default 2000). */
  leaseTtl: number;
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
  /** Faults injected from the start (docs/faults.md), checked by fault-table.ts's rules. */
  faults: FaultRequest[];
  etcd?: EtcdConfig;
  security: SecurityConfig;
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
  /** Absolute. Clients must present the token in this file (docs/SECURITY.md). */
  tokenFile?: string;
  /** TLS with the certificate of storage system `ss` (its tls.cert/tls.key); clients check it against security.ca. */
  tls: boolean;
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
/** Writes this large go past the cache memory by default: controller/cache/blocks.ts's DEFAULT_BYPASS (a test holds them equal; importing it would load the cache at every CLI start). */
export const DEFAULT_CACHE_BYPASS = 1024 * 1024;
export const MIN_PEER_TIMEOUT_MS = 100;
export const MAX_PEER_TIMEOUT_MS = 10 * 60 * 1000;
export const MIN_CLUSTER_SIZE = 4 * 1024;
export const MAX_CLUSTER_SIZE = 64 * 1024 * 1024;
export const SECTOR = 512;
/** sun_path is 108 bytes on Linux, including the terminating NUL. */
export const MAX_SOCKET_PATH = 107;
/** Past this many, the message says "and N more": the first few are what the reader acts on. */
export const MAX_REPORTED = 10;

export function loadConfig(file: string): ClusterConfig {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    const hint = err.code === 'ENOENT' ? ' (no such file: check the path; config/ has examples, e.g. config/demo.yaml)' : err.code === 'EACCES' ? ' (permission denied: run as a user who may read it)' : `: ${err.message.replace(/, \w+ '.*'$/, '')}`;
    throw new ConfigError(file, [{ path: '', message: `cannot read the file${hint}` }], { cause: e });
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
    throw new ConfigError(source, [{ path: '', message: `YAML syntax error: ${first.message}${more}; correct the YAML at that line and column (config/demo.yaml is a commented example)`, line, col }]);
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
    config.security = buildSecurity(parsed.data, config, baseDir);
    crossCheck(config, problems);
    checkSvol(config, problems);
    checkCfs(config, problems);
    checkSecurity(config, problems);
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

export type Segment = string | number;
export interface RawProblem {
  path: Segment[];
  message: string;
  /** For an unknown key: the known key it is probably a typo of. */
  meant?: Segment[];
}

export const MISSING = 'missing required key';

export class LeafError extends Error {}

export function leaf<T>(parse: (input: unknown) => T) {
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

export function fail(message: string): never {
  throw new LeafError(message);
}

export function mapping<S extends z.ZodRawShape>(shape: S) {
  return z.strictObject(shape, { error: (iss) => (iss.input === undefined ? MISSING : `expected a mapping, got ${show(iss.input)}`) });
}

export function list<T extends z.ZodType>(item: T) {
  return z.array(item, { error: (iss) => (iss.input === undefined ? MISSING : `expected a list, got ${show(iss.input)}`) });
}

export const id = leaf((v) => (Number.isSafeInteger(v) && (v as number) > 0 ? (v as number) : fail(`expected a positive integer, got ${show(v)}`)));

export function readSize(v: unknown, expected: string): number {
  if (typeof v !== 'number' && typeof v !== 'string') fail(`expected ${expected}, got ${show(v)}`);
  try {
    return parseSize(v);
  } catch (e) {
    fail((e as Error).message);
  }
}

export function size(check: (bytes: number, input: string | number) => string | undefined) {
  return leaf((v) => {
    const bytes = readSize(v, 'a size such as 512, 64KiB, 1GiB');
    const problem = check(bytes, v as string | number);
    return problem === undefined ? bytes : fail(problem);
  });
}

export const volumeSize = size((n, v) => {
  if (n === 0) return 'a volume size must be greater than 0';
  if (n % SECTOR !== 0) return `volume size ${JSON.stringify(v)} is not a multiple of ${SECTOR} bytes`;
  return undefined;
});

export const clusterSize = size((n, v) =>
  n >= MIN_CLUSTER_SIZE && n <= MAX_CLUSTER_SIZE && (n & (n - 1)) === 0
    ? undefined
    : `clusterSize must be a power of two from ${formatSize(MIN_CLUSTER_SIZE)} to ${formatSize(MAX_CLUSTER_SIZE)}, got ${JSON.stringify(v)}`,
);

export const cacheSize = size((n) => (n > 0 ? undefined : 'a cache size must be greater than 0 (leave out cache for none)'));

/** Bytes per second; "100MiB/s" reads as well as "100MiB". */
export const syncRate = leaf((v) => {
  const bytes = readSize(typeof v === 'string' ? v.replace(/\/s\s*$/, '') : v, 'a rate in bytes per second such as 100MiB');
  return bytes > 0 ? bytes : fail('syncRate must be greater than 0 (leave it out for no limit)');
});

export const hostPort = leaf((v): HostPort => {
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
export const peerTimeout = leaf((v) => {
  const m = typeof v === 'number' ? [String(v), String(v), 'ms'] : typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(v) : null;
  if (!m) fail(`expected a duration such as 5s or 500ms, got ${show(v)}`);
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1);
  if (!Number.isFinite(ms) || ms < MIN_PEER_TIMEOUT_MS || ms > MAX_PEER_TIMEOUT_MS) {
    fail(`peerTimeout must be from ${MIN_PEER_TIMEOUT_MS}ms to ${MAX_PEER_TIMEOUT_MS / 1000}s, got ${show(v)}`);
  }
  return Math.round(ms);
});

export const fence = leaf((v): FenceLevel => (v === 'never' || v === 'data' ? v : fail(`expected never or data, got ${show(v)}`)));

export const bool = leaf((v) => (typeof v === 'boolean' ? v : fail(`expected true or false, got ${show(v)}`)));

export const filePath = leaf((v) => (typeof v === 'string' && v.length > 0 ? v : fail(`expected a path, got ${show(v)}`)));

export const mode = leaf((v): PairMode => (v === 'sync' || v === 'async' ? v : fail(`expected sync or async, got ${show(v)}`)));

// Pair names appear in admin API URLs (/api/pairs/NAME/split), so keep them URL-safe.
export const pairName = leaf((v) =>
  typeof v === 'string' && /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(v)
    ? v
    : fail(`expected a pair name (letters, digits, ".", "_" and "-", at most 64), got ${show(v)}`),
);

export const VolRefSchema = mapping({ ss: id, vol: id });
// iSCSI names (RFC 3720 3.2.6): iqn.YYYY-MM.reversed.domain[:anything] or eui.16HEX.
export const iscsiName = leaf((v) =>
  typeof v === 'string' && /^(iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[a-z0-9.:_-]+)?|eui\.[0-9a-f]{16})$/i.test(v) && v.length <= 223
    ? v.toLowerCase()
    : fail(`expected an iSCSI name like iqn.2026-12.org.example:disk1, got ${show(v)}`),
);
// "HOST:PORT", or "HOST" alone for the iSCSI port 3260.
export const iscsiAddress = leaf((v): HostPort => {
  if (typeof v !== 'string') fail(`expected an address HOST:PORT (port 3260 if omitted), got ${show(v)}`);
  const m = /^(?:\[([^\]]*)\]|([A-Za-z0-9.-]+))(?::(\d{1,5}))?$/.exec(v);
  if (!m || (m[1] !== undefined && !net.isIPv6(m[1]))) fail(`invalid iSCSI address ${JSON.stringify(v)} (expected HOST:PORT, e.g. 127.0.0.1:3260)`);
  const port = m![3] === undefined ? 3260 : Number(m![3]);
  if (port > 65535) fail(`invalid port ${port} in ${JSON.stringify(v)}`);
  return { host: m![1] ?? m![2]!, port };
});
export const allowEntry = leaf((v) =>
  typeof v === 'string' && v.length > 0 && v.length <= 255 ? v : fail(`expected an IQN pattern or a CIDR, got ${show(v)}`),
);
export const nbdAllowEntry = leaf((v) => {
  if (typeof v !== 'string') fail(`expected an address, a subnet such as 10.0.0.0/8 or a TLS identity, got ${show(v)}`);
  const problem = allowEntryProblem(v);
  return problem === undefined ? v : fail(problem);
});
// Inline CHAP secrets (docs/iscsi.md). No message here ever shows a value: it may be a secret.
export const chapUser = leaf((v) =>
  typeof v === 'string' && v.length > 0 && v.length <= 255 && !/[\x00-\x1f]/.test(v) ? v : fail(`expected a CHAP user name (1 to 255 printable characters), got ${show(v)}`),
);
export const chapSecret = leaf((v) => {
  if (typeof v !== 'string') fail('expected a CHAP secret in quotes (the value is not shown)');
  // RFC 7143 12.1.3: secrets of at least 12 bytes (16 recommended) resist offline guessing.
  if (v.length < 12) fail('the CHAP secret is shorter than 12 characters (RFC 7143 12.1.3; 16 or more recommended)');
  if (v.length > 255 || /[\x00-\x1f]/.test(v)) fail('the CHAP secret must be at most 255 printable characters');
  return v;
});
export const ChapSchema = z.strictObject(
  { user: chapUser, secret: chapSecret, mutualUser: chapUser.optional(), mutualSecret: chapSecret.optional() },
  { error: (iss) => (iss.input === undefined ? MISSING : 'expected a mapping {user, secret, mutualUser, mutualSecret} (the value is not shown)') },
);
export const VolumeSchema = mapping({
  id,
  size: volumeSize,
  iscsiTarget: iscsiName.optional(),
  iscsiChap: ChapSchema.optional(),
  iscsiChapFile: filePath.optional(),
  iscsiAllow: list(allowEntry).optional(),
  allow: list(nbdAllowEntry).optional(),
});
export const tlsMode = leaf((v) => (v === 'off' || v === 'allow' || v === 'require' ? v : fail(`expected off, allow or require, got ${show(v)}`)));
export const TlsSchema = mapping({ mode: tlsMode, cert: filePath.optional(), key: filePath.optional(), pskFile: filePath.optional(), verifyClients: bool.optional() });
export const adminHost = leaf((v) => (typeof v === 'string' && /^[A-Za-z0-9.-]+(:\d{1,5})?$|^\[[0-9a-fA-F:]+\](:\d{1,5})?$/.test(v) ? v.toLowerCase() : fail(`expected a host name such as array.example.com, got ${show(v)}`)));
export const SecuritySchema = mapping({
  insecure: bool.optional(),
  ca: filePath.optional(),
  adminTokenFile: filePath.optional(),
  adminHosts: list(adminHost).optional(),
  adminReadOpen: bool.optional(),
  adminTls: bool.optional(),
  client: mapping({ cert: filePath, key: filePath }).optional(),
});
export const cachePolicy = leaf((v): CachePolicy => (v === 'write-back' || v === 'write-through' ? v : fail(`expected write-back or write-through, got ${show(v)}`)));
export const cacheBypass = size(() => undefined);
export const CacheSchema = mapping({ size: cacheSize, policy: cachePolicy.optional(), bypass: cacheBypass.optional() });
// `svolGroups:` (docs/svol.md); the cross-checks are in config-svol.ts.
export const svolAttr = leaf((v): SvolAttr => (v === 'RO' || v === 'RW' || v === 'spare' ? v : fail(`expected RO, RW or spare, got ${show(v)}`)));
export const SvolMemberSchema = mapping({ vol: id, attr: svolAttr, logicalId: id.optional(), increments: id.optional() });
/** Milliseconds a member's I/O may hang before the member is declared failed: "30s", "500ms". */
export const svolIoTimeout = leaf((v) => {
  const m = typeof v === 'number' ? [String(v), String(v), 'ms'] : typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(v) : null;
  if (!m) fail(`expected a duration such as 30s or 500ms, got ${show(v)}`);
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1);
  if (!Number.isFinite(ms) || ms < 100 || ms > 600_000) fail(`ioTimeout must be from 100ms to 600s, got ${show(v)}`);
  return Math.round(ms);
});
export const SvolGroupSchema = mapping({
  name: pairName,
  pvol: id,
  members: list(SvolMemberSchema).min(1, { error: 'a group needs at least one member' }),
  spreadReads: bool.optional(),
  ioTimeout: svolIoTimeout.optional(),
});
export const StorageSystemSchema = mapping({
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
  iscsiChap: ChapSchema.optional(),
  iscsiChapFile: filePath.optional(),
  iscsiAllow: list(allowEntry).optional(),
  tls: TlsSchema.optional(),
  allow: list(nbdAllowEntry).optional(),
  svolGroups: list(SvolGroupSchema).optional(),
});
export const PairSchema = mapping({
  name: pairName,
  mode,
  master: VolRefSchema,
  mirrors: list(VolRefSchema).min(1, { error: 'a pair needs at least one mirror' }),
  syncRate: syncRate.optional(),
  fence: fence.optional(),
  autoResync: bool.optional(),
  autoFailover: leaf((v) => (typeof v === 'boolean' || v === 'allowDataLoss' ? v : fail(`expected true, false or allowDataLoss, got ${show(v)}`))).optional(),
});
// The `cfs:` section (docs/cfs.md). Cross-checks are in checkCfs().
export const DEFAULT_CFS_BLOCK_SIZE = 64 * 1024;
export const cfsBlockSize = size((n, v) =>
  n >= MIN_CLUSTER_SIZE && n <= MAX_CLUSTER_SIZE && (n & (n - 1)) === 0
    ? undefined
    : `blockSize must be a power of two from ${formatSize(MIN_CLUSTER_SIZE)} to ${formatSize(MAX_CLUSTER_SIZE)}, got ${JSON.stringify(v)}`,
);
export const cfsFlag = leaf((v) => (typeof v === 'boolean' ? v : fail(`expected true or false, got ${show(v)}`)));
export const CfsSchema = mapping({
  listen: hostPort,
  dataDir: filePath.optional(),
  blockSize: cfsBlockSize.optional(),
  pairs: list(pairName).min(1, { error: 'list at least one pair, or leave pairs out for all of them' }).optional(),
  ss: id.optional(),
  readFromMaster: cfsFlag.optional(),
  tokenFile: filePath.optional(),
  tls: cfsFlag.optional(),
});
// `faults:` (docs/faults.md): the same fields as `blockmirror fault set`, range as START:LEN.
export const faultText = leaf((v) => (typeof v === 'string' && v.length > 0 ? v : fail(`expected a string, got ${show(v)}`)));
export const faultNumber = leaf((v) => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : fail(`expected a number, got ${show(v)}`)));
export const FaultSchema = mapping({
  target: faultText,
  kind: faultText,
  op: z.union([faultText, list(faultText)]).optional(),
  range: faultText.optional(),
  probability: faultNumber.optional(),
  ms: faultNumber.optional(),
  jitter: faultNumber.optional(),
  mode: faultText.optional(),
});
export const etcdEndpoint = leaf((v) => {
  if (typeof v !== 'string' || !/^(https?:\/\/)?[A-Za-z0-9.[\]:-]+:\d{1,5}$/.test(v)) fail(`expected an etcd endpoint HOST:PORT or http://HOST:PORT, got ${show(v)}`);
  return v;
});
export const etcdPrefix = leaf((v) => (typeof v === 'string' && /^\/[A-Za-z0-9._/-]*[A-Za-z0-9._-]$/.test(v) ? v : fail(`expected a key prefix such as /blockmirror, got ${show(v)}`)));
/** etcd's lease granularity is a second; a shorter TTL is rounded up by etcd itself. */
export const leaseTtl = leaf((v) => {
  const m = typeof v === 'number' ? [String(v), String(v), 'ms'] : typeof v === 'string' ? /^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$/.exec(v) : null;
  if (!m) fail(`expected a duration such as 2s or 1500ms, got ${show(v)}`);
  const ms = Number(m[1]) * (m[2] === 's' ? 1000 : 1);
  if (!Number.isFinite(ms) || ms < 1000 || ms > 60_000) fail(`leaseTtl must be from 1s to 60s, got ${show(v)}`);
  return Math.round(ms);
});
export const EtcdSchema = mapping({
  endpoints: list(etcdEndpoint).min(1, { error: 'list at least one etcd endpoint' }),
  prefix: etcdPrefix.optional(),
  leaseTtl: leaseTtl.optional(),
});
export const ClusterSchema = mapping({
  clusterSize: clusterSize.optional(),
  peerTimeout: peerTimeout.optional(),
  storageSystems: list(StorageSystemSchema).min(1, { error: 'at least one storage system is required' }),
  pairs: list(PairSchema).optional(),
  cfs: CfsSchema.optional(),
  faults: list(FaultSchema).optional(),
  etcd: EtcdSchema.optional(),
  security: SecuritySchema.optional(),
});

/** Which keys a mapping takes, by its path with indexes dropped: for "did you mean". */
export const KEYS_AT = new Map<string, readonly string[]>([
  ['', Object.keys(ClusterSchema.shape)],
  ['storageSystems[]', Object.keys(StorageSystemSchema.shape)],
  ['storageSystems[].volumes[]', Object.keys(VolumeSchema.shape)],
  ['storageSystems[].cache', Object.keys(CacheSchema.shape)],
  ['storageSystems[].iscsiChap', Object.keys(ChapSchema.shape)],
  ['storageSystems[].volumes[].iscsiChap', Object.keys(ChapSchema.shape)],
  ['pairs[]', Object.keys(PairSchema.shape)],
  ['pairs[].master', Object.keys(VolRefSchema.shape)],
  ['pairs[].mirrors[]', Object.keys(VolRefSchema.shape)],
  ['cfs', Object.keys(CfsSchema.shape)],
  ['faults[]', Object.keys(FaultSchema.shape)],
  ['etcd', Object.keys(EtcdSchema.shape)],
  ['security', Object.keys(SecuritySchema.shape)],
  ['storageSystems[].tls', Object.keys(TlsSchema.shape)],
  ['storageSystems[].svolGroups[]', Object.keys(SvolGroupSchema.shape)],
  ['storageSystems[].svolGroups[].members[]', Object.keys(SvolMemberSchema.shape)],
]);

export function fromIssue(issue: z.core.$ZodIssue, data: unknown): RawProblem[] {
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
export function withoutEchoes(problems: RawProblem[]): RawProblem[] {
  const meant = new Set(problems.flatMap((p) => (p.meant ? [formatPath(p.meant)] : [])));
  return problems.filter((p) => !(p.message === MISSING && meant.has(formatPath(p.path))));
}

// ---------------------------------------------------------------------------------------------
// Pass 2b: defaults and absolute paths.

export type Parsed = z.output<typeof ClusterSchema>;

export function build(p: Parsed, source: string, baseDir: string, problems: RawProblem[]): ClusterConfig {
  const storageSystems = p.storageSystems.map((ss, i): StorageSystemConfig => {
    const iscsi = buildIscsi(ss, i, baseDir, problems);
    const out: StorageSystemConfig = { id: ss.id, nbd: ss.nbd, admin: ss.admin, volumes: iscsi.volumes };
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
    if (iscsi.iscsi) out.iscsi = iscsi.iscsi;
    if (ss.cache !== undefined) out.cache = { size: ss.cache.size, policy: ss.cache.policy ?? 'write-back', bypass: ss.cache.bypass ?? DEFAULT_CACHE_BYPASS };
    if (ss.allow !== undefined) out.allow = ss.allow;
    if (ss.svolGroups !== undefined) {
      out.svolGroups = ss.svolGroups.map((g) => ({
        name: g.name,
        pvol: g.pvol,
        members: g.members.map((m) => ({ vol: m.vol, attr: m.attr, ...(m.logicalId !== undefined ? { logicalId: m.logicalId } : {}), ...(m.increments !== undefined ? { increments: m.increments } : {}) })),
        ...(g.spreadReads !== undefined ? { spreadReads: g.spreadReads } : {}),
        ...(g.ioTimeout !== undefined ? { ioTimeout: g.ioTimeout } : {}),
      }));
    }
    if (ss.tls !== undefined) {
      out.tls = { mode: ss.tls.mode, verifyClients: ss.tls.verifyClients ?? false };
      for (const k of ['cert', 'key', 'pskFile'] as const) if (ss.tls[k] !== undefined) out.tls[k] = path.resolve(baseDir, ss.tls[k]);
    }
    return out;
  });
  const pairs = (p.pairs ?? []).map((pr, j): PairConfig => {
    if (pr.fence === 'data' && pr.mode === 'async') {
      problems.push({ path: ['pairs', j, 'fence'], message: 'fence: data applies to sync pairs (an async pair never waits for its mirrors)' });
    }
    const out: PairConfig = {
      name: pr.name,
      mode: pr.mode,
      master: pr.master,
      mirrors: pr.mirrors,
      fence: pr.fence ?? 'never',
      autoResync: pr.autoResync ?? true,
      autoFailover: pr.autoFailover ?? true,
    };
    if (pr.syncRate !== undefined) out.syncRate = pr.syncRate;
    return out;
  });
  const faults: FaultRequest[] = [];
  (p.faults ?? []).forEach((f, k) => {
    try {
      const req = { ...f, ...(f.range !== undefined ? { range: parseByteRange(f.range) } : {}) } as FaultRequest;
      const checked = FaultRequestSchema.safeParse(req);
      if (!checked.success) throw new FaultSpecError(checked.error.issues.map((i) => `${i.path.join('.') || 'fault'}: ${i.message}`).join('; '));
      resolveFault(checked.data);
      faults.push(checked.data);
    } catch (e) {
      if (!(e instanceof FaultSpecError)) throw e;
      problems.push({ path: ['faults', k], message: e.message });
    }
  });
  const out: ClusterConfig = { source, clusterSize: p.clusterSize ?? DEFAULT_CLUSTER_SIZE, peerTimeout: p.peerTimeout ?? DEFAULT_PEER_TIMEOUT_MS, storageSystems, pairs, faults, security: { insecure: false, adminHosts: [], adminReadOpen: false, adminTls: false } };
  if (p.etcd) out.etcd = { endpoints: p.etcd.endpoints, prefix: p.etcd.prefix ?? '/blockmirror', leaseTtl: p.etcd.leaseTtl ?? 2000 };
  return out;
}

