// Loads the CommonJS bundle (dist/bundle-cjs/, scripts/bundle-cli.mjs) through vm.Script with V8's
// code cache (issue 18: CLI start-up). Node 20 compiles every ES module from source at every start
// and has no module.enableCompileCache (22.1+); a vm.Script can be handed the code V8 compiled last
// time (cachedData), which skips parsing and compiling the functions the command ran then.
//
// One entry per chunk and set of Node flags, CHUNK.FLAGS.v8, FLAGS being the CRC-32 of the flags in hex
// (V8 rejects a code cache made under other flags, and `node bin/blockmirror.js` and the shebang's
// flags would otherwise overwrite each other's entries at every other start). The entry, u32s
// little-endian; header: Node's version, arch and flags, as JSON:
//   u32 header length | header | u32 source length | source | u32 CRC-32 of the code | V8 cachedData
//
// | concern | answer |
// |---|---|
// | stale cache (a rebuilt or edited bundle) | the entry holds the chunk's whole source and is used only if it is byte for byte the file's (Buffer.equals, a memcmp). V8's own check is not enough: it compares the source's length, and runs the OLD code of a same-length edit (test/cli-code-cache.test.ts). A hash would need node:crypto, which a client command otherwise does not load |
// | another Node or other flags | the header must match, else the entry is stale |
// | corrupt or truncated entry | the framing does not parse or the CRC-32 of V8's part does not match: compiled from source, the entry rewritten. The CRC is ours because V8 does not checksum a code cache: a damaged one aborts the process ("Fatal error") |
// | a directory others can write | never read nor written (ours(): an entry is code run as us) |
// | read-only install | the cache goes to BLOCKMIRROR_CODE_CACHE (only there, if set), else dist/bundle-cjs/.code-cache/, else the OS temp directory; any write failure only costs the next start its cache |
// | concurrent starts | an entry is written to a temp file and renamed: a reader sees an old entry or a new one, never half |
// | what gets cached | written at exit, after the command ran, so it holds the functions the command compiled lazily, not just the top level |
//
// BLOCKMIRROR_NO_CODE_CACHE=1 compiles from source and writes nothing; BLOCKMIRROR_CODE_CACHE_DEBUG=1
// prints what the cache did (used, missing, stale, rejected: chunks) on stderr at exit.
'use strict';
const fs = require('node:fs');
const { createRequire } = require('node:module');
const path = require('node:path');
const vm = require('node:vm');
const zlib = require('node:zlib');

/**
 * Where cache entries go: the first directory of these that can be created and written; BLOCKMIRROR_CODE_CACHE
 * alone if set. The temp directory's is a function, called only when the first has no entry: node:os
 * is ~6 M instructions of a start-up (issue 18) that finds its entries next to the bundle.
 */
function cacheDirs(bundleDir) {
  if (process.env.BLOCKMIRROR_CODE_CACHE) return [process.env.BLOCKMIRROR_CODE_CACHE];
  return [path.join(bundleDir, '.code-cache'), () => path.join(require('node:os').tmpdir(), `blockmirror-code-cache-${process.getuid?.() ?? 'u'}`)];
}

/**
 * Whether entries in `d` may be run: a directory, not a symlink, ours, and writable by nobody else.
 * An entry is code run as us, so one that another user could have planted (the temp-directory
 * fallback lives in a world-writable /tmp, where anyone can make that directory first) is never
 * read, and nothing is written there.
 */
function ours(d) {
  try {
    const st = fs.lstatSync(d);
    return st.isDirectory() && (process.getuid === undefined || st.uid === process.getuid()) && (st.mode & 0o022) === 0;
  } catch {
    return false;
  }
}

/** What the last loadCachedBundle did, per chunk (for tests and BLOCKMIRROR_CODE_CACHE_DEBUG=1). */
const codeCacheStats = { used: 0, missing: 0, stale: 0, rejected: 0 };

const HEADER = Buffer.from(JSON.stringify({ node: process.version, arch: process.arch, flags: process.execArgv }));
/** The entries' suffix: the flags alone, so that a new Node replaces the entries of the old one. */
const SUFFIX = typeof zlib.crc32 === 'function' ? `.${zlib.crc32(JSON.stringify(process.execArgv)).toString(16).padStart(8, '0')}.v8` : '.v8';

/** The cachedData of an entry made from exactly `source` under this Node, or why not. */
function parseEntry(entry, source) {
  let at = 0;
  const field = () => {
    if (at + 4 > entry.length) return undefined;
    const len = entry.readUInt32LE(at);
    if (at + 4 + len > entry.length) return undefined;
    at += 4 + len;
    return entry.subarray(at - len, at);
  };
  const header = field();
  const src = field();
  if (header === undefined || src === undefined || at + 4 > entry.length) return 'rejected';
  if (!header.equals(HEADER) || !src.equals(source)) return 'stale';
  const data = entry.subarray(at + 4);
  return zlib.crc32(data) === entry.readUInt32LE(at) && data.length > 0 ? data : 'rejected';
}

function frame(source, data) {
  const u32 = (n) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(n);
    return b;
  };
  return Buffer.concat([u32(HEADER.length), HEADER, u32(source.length), source, u32(zlib.crc32(data)), data]);
}

/**
 * Load `entry` (an absolute path to a .cjs file of the bundle) and return its exports. Relative
 * requires of .cjs chunks go through the same cached loader; everything else through Node's require.
 */
function loadCachedBundle(entry, dirsForTest) {
  const bundleDir = path.dirname(entry);
  // zlib.crc32 is Node 20.15 and later; before it, no cache rather than an unchecked one.
  const useCache = !process.env.BLOCKMIRROR_NO_CODE_CACHE && typeof zlib.crc32 === 'function';
  const listed = useCache ? (dirsForTest ?? cacheDirs(bundleDir)) : [];
  const dirs = () => listed.map((d, i) => (typeof d === 'function' ? (listed[i] = d()) : d));
  const nodeRequire = createRequire(entry);
  const modules = new Map();
  const toWrite = [];

  const isOurs = new Map();
  const readEntry = (name) => {
    for (let i = 0; i < listed.length; i++) {
      if (typeof listed[i] === 'function') listed[i] = listed[i]();
      const d = listed[i];
      if (!isOurs.has(d)) isOurs.set(d, ours(d));
      if (!isOurs.get(d)) continue;
      try {
        return fs.readFileSync(path.join(d, name));
      } catch {
        // Not in this directory (or unreadable): try the next one, else compile from source.
      }
    }
    return undefined;
  };

  const load = (file) => {
    const known = modules.get(file);
    if (known) return known.exports;
    const bytes = fs.readFileSync(file);
    const name = `${path.basename(file)}${SUFFIX}`;
    const stored = useCache ? readEntry(name) : undefined;
    const found = stored === undefined ? 'missing' : parseEntry(stored, bytes);
    const cachedData = typeof found === 'string' ? undefined : found;
    const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${bytes.toString('utf8')}\n})`, {
      filename: file,
      cachedData,
      importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
    });
    const outcome = typeof found === 'string' ? found : script.cachedDataRejected ? 'rejected' : 'used';
    codeCacheStats[outcome]++;
    if (useCache && outcome !== 'used') toWrite.push({ name, bytes, script });
    const module = { exports: {}, filename: file, id: file, loaded: false };
    modules.set(file, module);
    const req = (id) => (id.startsWith('./') && id.endsWith('.cjs') ? load(path.join(bundleDir, id)) : LAZY_BUILTINS.has(id) ? lazyBuiltin(id, nodeRequire) : nodeRequire(id));
    script.runInThisContext().call(module.exports, module.exports, req, module, file, bundleDir);
    module.loaded = true;
    return module.exports;
  };

  if (useCache) process.once('exit', () => toWrite.length > 0 && writeEntries(dirs(), toWrite));
  if (process.env.BLOCKMIRROR_CODE_CACHE_DEBUG) process.once('exit', () => process.stderr.write(`code cache: ${JSON.stringify(codeCacheStats)}\n`));
  return load(entry);
}

/**
 * Built-in modules that a chunk requires when it loads but uses only on paths our commands never
 * take: commander requires node:child_process (and with it dgram and net's socket list) for
 * executable subcommands, which blockmirror has none of. Each gets a stand-in that requires the
 * real module on first use, so a command that never spawns anything never loads it.
 */
const LAZY_BUILTINS = new Set(['node:child_process']);
const lazyBuiltins = new Map();
function lazyBuiltin(id, nodeRequire) {
  let stand = lazyBuiltins.get(id);
  if (stand) return stand;
  let real;
  const mod = () => (real ??= nodeRequire(id));
  stand = new Proxy(
    {},
    {
      get: (_, key) => mod()[key],
      has: (_, key) => key in mod(),
      ownKeys: () => Reflect.ownKeys(mod()),
      getOwnPropertyDescriptor: (_, key) => {
        const d = Reflect.getOwnPropertyDescriptor(mod(), key);
        // The stand-in's target has no such property: a proxy may only report it configurable.
        return d && { ...d, configurable: true };
      },
    },
  );
  lazyBuiltins.set(id, stand);
  return stand;
}

/** Write each new entry to the first directory that takes it, through a temp file and a rename. */
function writeEntries(dirs, entries) {
  if (entries.length === 0) return;
  for (const d of dirs) {
    try {
      fs.mkdirSync(d, { recursive: true, mode: 0o700 });
      if (!ours(d)) continue;
      for (const { name, bytes, script } of entries) {
        const tmp = path.join(d, `${name}.${process.pid}.tmp`);
        try {
          fs.writeFileSync(tmp, frame(bytes, script.createCachedData()));
          fs.renameSync(tmp, path.join(d, name));
        } catch (e) {
          fs.rmSync(tmp, { force: true });
          throw e;
        }
      }
      return;
    } catch {
      // Read-only or full: try the next directory; with none, the next start compiles from source again.
    }
  }
}

module.exports = { loadCachedBundle, codeCacheStats };
