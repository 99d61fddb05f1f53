// A client command's configuration, parsed once per version of the file. Parsing the YAML and
// checking it with zod is most of a client command's start-up: loading the two modules and
// running them cold took `status` ~70 ms of its ~225 (bench/RESULTS.md, "pm18"). So the CLI
// keeps what parseConfig returned, as JSON, in the per-user directory that also holds the admin
// tokens of storage systems in memory: $XDG_RUNTIME_DIR (or the temp dir)/blockmirror-UID/.
//
//   one entry per file     config-<hash of the absolute path>.json, replaced when the file changes
//   used only when         the entry names the same absolute path, holds the file's whole text
//                          byte for byte (an edit misses, whatever its size), and was written by
//                          this very build (the bundle's chunk, by size and mtime) and Node
//   private                the directory must be ours and mode 0700, or nothing is read or
//                          written; entries are mode 0600 (a YAML file may hold CHAP secrets)
//   best effort            any failure to read or write an entry is a miss: the command parses
//   bounded                a miss that writes an entry removes the oldest beyond MAX_ENTRIES
//   off                    with BLOCKMIRROR_NO_CONFIG_CACHE=1
//
// Servers (`up`) always parse. Run from the TypeScript sources (the tests), the cache is off: no
// build to name.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { userRuntimeDir } from '../cluster/admin-token.js';
import type { ClusterConfig } from '../cluster/config.js';
import { UsageError } from './errors.js';

/** The entry's own format: bump it when Entry changes. */
const FORMAT = 1;
/** Entries kept, one per configuration file used: beyond this, the least recently written go. */
export const MAX_ENTRIES = 64;

interface Entry {
  format: number;
  build: string;
  file: string;
  text: string;
  config: ClusterConfig;
}

export interface CacheOptions {
  /** The directory (default: the per-user runtime directory). */
  dir?: string;
  /** What names this build (default: this module's file, by size and mtime; none from sources). */
  build?: string;
}

let ownBuild: string | null | undefined;

/** This build, named by the file this module was bundled into; null when run from the sources. */
function thisBuild(): string | null {
  if (ownBuild !== undefined) return ownBuild;
  try {
    const own = fileURLToPath(import.meta.url);
    if (own.endsWith('.ts')) return (ownBuild = null);
    const st = fs.statSync(own);
    ownBuild = `${process.version} ${own} ${st.size} ${st.mtimeMs}`;
  } catch {
    ownBuild = null;
  }
  return ownBuild;
}

/** The per-user runtime directory, made if missing; undefined unless it is ours and private. */
function privateDir(dir?: string): string | undefined {
  const uid = typeof process.getuid === 'function' ? process.getuid() : 0;
  const d = dir ?? userRuntimeDir();
  try {
    fs.mkdirSync(d, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') return undefined;
  }
  try {
    const st = fs.lstatSync(d);
    if (!st.isDirectory() || st.uid !== uid || (st.mode & 0o077) !== 0) return undefined;
  } catch {
    return undefined;
  }
  return d;
}

/** FNV-1a, 32 bits: a file name per config path (a clash only makes the two paths miss in turn). */
function fnv1a(s: string): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return (h >>> 0).toString(16).padStart(8, '0');
}

function where(resolved: string, opts: CacheOptions): { file: string; build: string } | undefined {
  if (process.env.BLOCKMIRROR_NO_CONFIG_CACHE === '1') return undefined;
  const build = opts.build ?? thisBuild();
  if (!build) return undefined;
  const dir = privateDir(opts.dir);
  return dir ? { file: path.join(dir, `config-${fnv1a(resolved)}.json`), build } : undefined;
}

/** The cached parse of config file `file` (as given) whose text is `text`, or undefined. */
export function cachedConfig(file: string, text: string, opts: CacheOptions = {}): ClusterConfig | undefined {
  const resolved = path.resolve(file);
  const at = where(resolved, opts);
  if (!at) return undefined;
  let entry: Entry;
  try {
    entry = JSON.parse(fs.readFileSync(at.file, 'utf8')) as Entry;
  } catch {
    return undefined;
  }
  if (entry?.format !== FORMAT || entry.build !== at.build || entry.file !== resolved || entry.text !== text || !entry.config || typeof entry.config !== 'object') return undefined;
  // Named as this command was given it: the admin token's file is found from it, relative to the working directory.
  entry.config.source = file;
  return entry.config;
}

/** Keep `config`, the parse of `file` (as given) with text `text`, for the next command. Never throws. */
export function keepConfig(file: string, text: string, config: ClusterConfig, opts: CacheOptions = {}): void {
  const resolved = path.resolve(file);
  const at = where(resolved, opts);
  if (!at) return;
  const entry: Entry = { format: FORMAT, build: at.build, file: resolved, text, config };
  const tmp = `${at.file}.${process.pid}.tmp`;
  try {
    fs.writeFileSync(tmp, JSON.stringify(entry), { mode: 0o600, flag: 'wx' });
    fs.renameSync(tmp, at.file);
  } catch {
    try {
      fs.unlinkSync(tmp);
    } catch {
      // Not made, or already renamed.
    }
    return;
  }
  prune(path.dirname(at.file));
}

/** Remove the least recently written entries beyond MAX_ENTRIES. */
function prune(dir: string): void {
  try {
    const names = fs.readdirSync(dir).filter((f) => /^config-[0-9a-f]{8}\.json$/.test(f));
    if (names.length <= MAX_ENTRIES) return;
    const aged = names.map((f) => ({ f, t: fs.statSync(path.join(dir, f)).mtimeMs })).sort((a, b) => a.t - b.t);
    for (const { f } of aged.slice(0, names.length - MAX_ENTRIES)) fs.unlinkSync(path.join(dir, f));
  } catch {
    // Another command pruned meanwhile: next time.
  }
}

/**
 * A client command's configuration: from the cache when this build parsed these very bytes
 * before, else parsed (and kept). Every failure is a one-line usage error (exit 2). The YAML and
 * zod modules are loaded only on a miss.
 */
export async function loadConfigOrUsage(file: string, opts: CacheOptions = {}): Promise<ClusterConfig> {
  let text: string | undefined;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch {
    // loadConfig below says why, in the words every command uses.
  }
  if (text !== undefined) {
    const hit = cachedConfig(file, text, opts);
    if (hit) return hit;
  }
  const { ConfigError, loadConfig, parseConfig } = await import('../cluster/config.js');
  try {
    if (text === undefined) return loadConfig(file);
    const config = parseConfig(text, file, path.dirname(path.resolve(file)));
    keepConfig(file, text, config, opts);
    return config;
  } catch (e) {
    if (e instanceof ConfigError) throw new UsageError(e.message);
    throw new UsageError(`${file}: ${(e as Error).message}`);
  }
}
