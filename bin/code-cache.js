// Loads the CommonJS bundle (dist/bundle-cjs/, scripts/bundle-cli.mjs) through vm.Script with V8's
// code cache (issue 18: CLI start-up). Node 20 compiles every ES module from source at every start
// and has no module.enableCompileCache (22.1+); a vm.Script can be handed the code V8 compiled last
// time (cachedData), which skips parsing and compiling the functions the command ran then.
//
// | concern | answer |
// |---|---|
// | stale cache (a rebuilt bundle) | the cache file's name carries a hash of the chunk's source, Node's version and V8 flags: a changed chunk never finds an old entry. V8's own check is not enough: it compares the source's length, and runs the OLD code of a same-length edit (test/cli-code-cache.test.ts) |
// | corrupt or foreign cache | V8 checks it and sets cachedDataRejected; the chunk is compiled from source and the entry rewritten |
// | read-only install | the cache goes to BLOCKMIRROR_CODE_CACHE (only there, if set), else dist/bundle-cjs/.code-cache/, else the OS temp directory; any write failure only costs the next start its cache |
// | old entries | writing a chunk's entry removes the entries of its earlier builds |
// | what gets cached | written at exit, after the command ran, so it holds the functions the command compiled lazily, not just the top level |
//
// BLOCKMIRROR_NO_CODE_CACHE=1 compiles from source and writes nothing.
import crypto from 'node:crypto';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import vm from 'node:vm';

/** Where cache entries go: the first directory of these that can be created and written; BLOCKMIRROR_CODE_CACHE alone if set. */
function cacheDirs(bundleDir) {
  if (process.env.BLOCKMIRROR_CODE_CACHE) return [process.env.BLOCKMIRROR_CODE_CACHE];
  return [path.join(bundleDir, '.code-cache'), path.join(os.tmpdir(), `blockmirror-code-cache-${process.getuid?.() ?? 'u'}`)];
}

/** What the last loadCachedBundle did, per chunk (for tests and for BLOCKMIRROR_CODE_CACHE_DEBUG=1). */
export const codeCacheStats = { used: 0, missing: 0, rejected: 0 };

/**
 * Load `entry` (an absolute path to a .cjs file of the bundle) and return its exports. Relative
 * requires of .cjs chunks go through the same cached loader; everything else through Node's require.
 */
export function loadCachedBundle(entry, dirsForTest) {
  const bundleDir = path.dirname(entry);
  const useCache = !process.env.BLOCKMIRROR_NO_CODE_CACHE;
  const dirs = useCache ? (dirsForTest ?? cacheDirs(bundleDir)) : [];
  const nodeRequire = createRequire(entry);
  const flags = process.version + '\0' + process.execArgv.join(' ');
  const modules = new Map();
  const toWrite = [];

  const readCache = (name) => {
    for (const d of dirs) {
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
    const source = fs.readFileSync(file, 'utf8');
    const key = crypto.createHash('sha256').update(flags).update('\0').update(source).digest('hex').slice(0, 32);
    const name = `${path.basename(file)}.${key}.v8`;
    const cachedData = useCache ? readCache(name) : undefined;
    const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${source}\n})`, {
      filename: file,
      cachedData,
      importModuleDynamically: vm.constants.USE_MAIN_CONTEXT_DEFAULT_LOADER,
    });
    if (cachedData === undefined) codeCacheStats.missing++;
    else if (script.cachedDataRejected) codeCacheStats.rejected++;
    else codeCacheStats.used++;
    if (useCache && (cachedData === undefined || script.cachedDataRejected)) toWrite.push({ name, script });
    const module = { exports: {}, filename: file, id: file, loaded: false };
    modules.set(file, module);
    const req = (id) => (id.startsWith('./') && id.endsWith('.cjs') ? load(path.join(bundleDir, id)) : nodeRequire(id));
    script.runInThisContext().call(module.exports, module.exports, req, module, file, bundleDir);
    module.loaded = true;
    return module.exports;
  };

  if (useCache) process.once('exit', () => writeCaches(dirs, toWrite));
  if (process.env.BLOCKMIRROR_CODE_CACHE_DEBUG) process.once('exit', () => process.stderr.write(`code cache: ${JSON.stringify(codeCacheStats)}\n`));
  return load(entry);
}

/** Write each new entry to the first directory that takes it; a temp file and a rename so no reader sees half of one. */
function writeCaches(dirs, entries) {
  if (entries.length === 0) return;
  for (const d of dirs) {
    try {
      fs.mkdirSync(d, { recursive: true, mode: 0o700 });
      // Entries of older builds of the same chunk (cli.cjs keeps its name across builds) go.
      const old = fs.readdirSync(d);
      for (const { name, script } of entries) {
        const stem = name.slice(0, name.length - '.0123456789abcdef0123456789abcdef.v8'.length);
        for (const f of old) if (f !== name && f.startsWith(`${stem}.`) && f.endsWith('.v8') && f.length === name.length) fs.rmSync(path.join(d, f), { force: true });
        const tmp = path.join(d, `${name}.${process.pid}.tmp`);
        fs.writeFileSync(tmp, script.createCachedData());
        fs.renameSync(tmp, path.join(d, name));
      }
      return;
    } catch {
      // Read-only or full: try the next directory; with none, the next start compiles from source again.
    }
  }
}
