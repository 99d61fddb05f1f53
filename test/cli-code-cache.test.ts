// The CLI's start-up (issue 18): bin/code-cache.js runs the CommonJS bundle (dist/bundle-cjs/)
// through V8's code cache. A cache entry must never run code other than the chunk's current
// source, a damaged entry must be ignored and rewritten, and a cache that cannot be written must
// cost nothing but time. And the client commands load only what they run.
import fs from 'node:fs';
import path from 'node:path';
import zlib from 'node:zlib';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, ROOT, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

const top = tmpDir('bm-cli-cache-');
const LOADER = path.join(ROOT, 'bin/code-cache.js');

/** A two-chunk bundle in a directory of its own: cli.cjs requires ./b.cjs and exports its value. */
function makeBundle(value: string): { dir: string; cache: string; runner: string } {
  const dir = fs.mkdtempSync(path.join(top, 'bundle-'));
  fs.writeFileSync(path.join(dir, 'cli.cjs'), "exports.value = require('./b.cjs').value + ':' + require('node:path').basename(__filename);\n");
  fs.writeFileSync(path.join(dir, 'b.cjs'), `exports.value = '${value}';\n`);
  const cache = path.join(dir, 'cache');
  const runner = path.join(dir, 'runner.mjs');
  // argv[2]: the cache directory, JSON (a list) so a test can hand it several.
  fs.writeFileSync(
    runner,
    `import { loadCachedBundle, codeCacheStats } from ${JSON.stringify(LOADER)};
const { value } = loadCachedBundle(${JSON.stringify(path.join(dir, 'cli.cjs'))}, JSON.parse(process.argv[2]));
console.log(JSON.stringify({ value, ...codeCacheStats }));
`,
  );
  return { dir, cache, runner };
}

interface Loaded { value: string; used: number; missing: number; stale: number; rejected: number }

async function load(runner: string, dirs: string[]): Promise<Loaded> {
  const r = await run(process.execPath, [runner, JSON.stringify(dirs)]);
  expect(r.stderr).toBe('');
  expect(r.code).toBe(0);
  return JSON.parse(r.stdout) as Loaded;
}

const entries = (dir: string): string[] => (fs.existsSync(dir) ? fs.readdirSync(dir).sort() : []);
/** The entry of `chunk` made under no Node flags (CHUNK.CRC32-OF-FLAGS.v8). */
const entryOf = (chunk: string): string => `${chunk}.${zlib.crc32(JSON.stringify([])).toString(16).padStart(8, '0')}.v8`;

describe('the code cache of the CommonJS bundle (bin/code-cache.js)', () => {
  it('writes an entry per chunk at exit and uses them at the next start', async () => {
    const b = makeBundle('one');
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    expect(entries(b.cache)).toEqual([entryOf('b.cjs'), entryOf('cli.cjs')]);
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
  });

  it('never runs the cache of an earlier build of a chunk, even one of the same length, and replaces it', async () => {
    const b = makeBundle('one');
    await load(b.runner, [b.cache]);
    const before = fs.readFileSync(path.join(b.cache, entryOf('b.cjs')));
    // Same length: V8's own check of an entry compares the source's length, not its text.
    fs.writeFileSync(path.join(b.dir, 'b.cjs'), "exports.value = 'two';\n");
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'two:cli.cjs', used: 1, missing: 0, stale: 1, rejected: 0 });
    expect(entries(b.cache)).toEqual([entryOf('b.cjs'), entryOf('cli.cjs')]);
    expect(fs.readFileSync(path.join(b.cache, entryOf('b.cjs'))).equals(before)).toBe(false);
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'two:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
  });

  it('keeps the entries of each set of Node flags apart (V8 rejects a cache made under other flags), and takes one made under other flags as stale', async () => {
    const b = makeBundle('one');
    await load(b.runner, [b.cache]);
    const flagged = async () => {
      const r = await run(process.execPath, ['--stack-size=2000', b.runner, JSON.stringify([b.cache])]);
      expect(r.code).toBe(0);
      return JSON.parse(r.stdout) as Loaded;
    };
    expect(await flagged()).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    // Both sets of entries stay: starts with and without the flags, in turn, each use their own.
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
    expect(await flagged()).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
    expect(entries(b.cache)).toHaveLength(4);
    // An entry of other flags under this one's name (a CRC-32 collision): the header tells, stale.
    const theirs = entries(b.cache).filter((f) => !f.endsWith(entryOf('').slice(1)));
    for (const f of theirs) fs.copyFileSync(path.join(b.cache, f), path.join(b.cache, f.replace(/\.[0-9a-f]{8}\.v8$/, entryOf(''))));
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 0, stale: 2, rejected: 0 });
  });

  it('ignores a corrupt entry, compiles from source and rewrites the entry', async () => {
    const b = makeBundle('one');
    await load(b.runner, [b.cache]);
    const entry = path.join(b.cache, entryOf('b.cjs'));
    const good = fs.readFileSync(entry);
    // The framing intact, V8's part damaged: V8 rejects it.
    const garbage = Buffer.from(good);
    garbage.fill(0xa5, garbage.length - 64);
    fs.writeFileSync(entry, garbage);
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 1, missing: 0, stale: 0, rejected: 1 });
    expect(fs.readFileSync(entry).equals(garbage)).toBe(false);
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
    // Truncated, and bytes of no framing at all.
    for (const bad of [good.subarray(0, 16), Buffer.alloc(good.length, 0xa5), Buffer.alloc(0)]) {
      fs.writeFileSync(entry, bad);
      expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 1, missing: 0, stale: 0, rejected: 1 });
    }
  });

  it('never reads or writes entries in a cache directory that others can write, or that is a symlink', async () => {
    const b = makeBundle('one');
    await load(b.runner, [b.cache]);
    const written = entries(b.cache);
    expect(written).toEqual([entryOf('b.cjs'), entryOf('cli.cjs')]);
    // Group- and world-writable: anyone could have planted these entries.
    fs.chmodSync(b.cache, 0o777);
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    fs.chmodSync(b.cache, 0o700);
    const link = path.join(b.dir, 'link');
    fs.symlinkSync(b.cache, link);
    expect(await load(b.runner, [link])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    // The directory itself, ours and private again: its entries were kept, and are used.
    expect(await load(b.runner, [b.cache])).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
  });

  it('runs the chunks from source when no cache directory can be written, and writes to the next that can', async () => {
    const b = makeBundle('one');
    const notADir = path.join(b.dir, 'file');
    fs.writeFileSync(notADir, '');
    const unwritable = path.join(notADir, 'cache');
    expect(await load(b.runner, [unwritable])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    expect(await load(b.runner, [unwritable])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    expect(await load(b.runner, [unwritable, b.cache])).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    expect(await load(b.runner, [unwritable, b.cache])).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
  });

  it('falls back to the temp directory when the bundle\'s own cache directory cannot be used, and finds its entries there', async () => {
    const b = makeBundle('one');
    // The bundle's .code-cache is a file: not a directory, so never ours.
    fs.writeFileSync(path.join(b.dir, '.code-cache'), '');
    const tmp = fs.mkdtempSync(path.join(top, 'tmp-'));
    const viaDefaults = async () => {
      // argv[2] 'null': the loader's own list of directories (cacheDirs), with TMPDIR for os.tmpdir().
      const r = await run(process.execPath, [b.runner, 'null'], { env: { TMPDIR: tmp, BLOCKMIRROR_CODE_CACHE: '' } });
      expect(r.stderr).toBe('');
      expect(r.code).toBe(0);
      return JSON.parse(r.stdout) as Loaded;
    };
    expect(await viaDefaults()).toEqual({ value: 'one:cli.cjs', used: 0, missing: 2, stale: 0, rejected: 0 });
    const fallback = path.join(tmp, `blockmirror-code-cache-${process.getuid!()}`);
    expect(entries(fallback)).toEqual([entryOf('b.cjs'), entryOf('cli.cjs')]);
    expect(await viaDefaults()).toEqual({ value: 'one:cli.cjs', used: 2, missing: 0, stale: 0, rejected: 0 });
  });

  it('gives the same answers through a cold, a warm and a corrupted cache as dist/ module by module', async () => {
    const cache = path.join(top, 'cli-cache');
    const bad = path.join(top, 'bad.yaml');
    fs.writeFileSync(bad, 'storageSystems:\n  - id: 1\n    nbd: 127.0.0.1:10809\n    admin: nowhere\n    volumes: []\n');
    const env = { BLOCKMIRROR_CODE_CACHE: cache, BLOCKMIRROR_CODE_CACHE_DEBUG: '1' };
    const stats = (stderr: string) => JSON.parse(/code cache: (.*)\n/.exec(stderr)![1]!) as Omit<Loaded, 'value'>;
    const strip = (r: { code: number | null; stdout: string; stderr: string }) => ({ ...r, stderr: r.stderr.replace(/code cache: .*\n/, '') });
    for (const args of [['status', '-c', bad], ['pair', 'split', '--help'], ['cfs', 'ls', '-c', bad]]) {
      const plain = await run(process.execPath, [CLI, ...args], { env: { BLOCKMIRROR_NO_BUNDLE: '1' } });
      const cold = await run(process.execPath, [CLI, ...args], { env });
      const warm = await run(process.execPath, [CLI, ...args], { env });
      // Cold: this command's own chunk was in no entry yet (the directory is the test's alone).
      expect(stats(cold.stderr).missing, args.join(' ')).toBeGreaterThan(0);
      expect(stats(warm.stderr).used, args.join(' ')).toBeGreaterThan(0);
      expect(stats(warm.stderr).rejected).toBe(0);
      for (const f of fs.readdirSync(cache)) fs.writeFileSync(path.join(cache, f), 'not a code cache');
      const corrupt = await run(process.execPath, [CLI, ...args], { env });
      expect(stats(corrupt.stderr).rejected, args.join(' ')).toBeGreaterThan(0);
      for (const r of [cold, warm, corrupt]) expect(strip(r), args.join(' ')).toEqual(plain);
      expect(plain.stdout + plain.stderr).not.toBe('');
    }
  });
});

describe('what status, pair and cfs load', () => {
  let cluster: RunningCluster | undefined;
  afterAll(async () => {
    await cluster?.stop();
  });

  it('run status, pair split/resync and cfs put/get/ls without fastify, pino, etcd3, TLS, node:crypto, node:child_process, worker threads or the crc32c addon, cfs without node:http, and, once the configuration is cached, without YAML or zod', async () => {
    const [nbd, admin, cfs] = [await freePort(), await freePort(), await freePort()];
    const config = path.join(top, 'cluster.yaml');
    fs.writeFileSync(
      config,
      `storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    volumes:
      - { id: 1, size: 16MiB }
      - { id: 2, size: 16MiB }
pairs:
  - { name: p1, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
cfs:
  listen: 127.0.0.1:${cfs}
`,
    );
    cluster = await startUp(config, [nbd, admin, cfs]);
    // At exit: the packages the CommonJS loader holds, and the Node built-ins of interest.
    const probe = path.join(top, 'loaded.mjs');
    fs.writeFileSync(
      probe,
      `import { createRequire } from 'node:module';
import fs from 'node:fs';
const require = createRequire(import.meta.url);
// The bundle's chunks are read by bin/code-cache.js: YAML and zod are named by what their chunks hold.
const chunks = new Set();
const readFileSync = fs.readFileSync;
fs.readFileSync = function (file, ...rest) {
  if (typeof file === 'string' && file.endsWith('.cjs')) chunks.add(file);
  return readFileSync.call(this, file, ...rest);
};
process.on('exit', () => {
  const pk = Object.keys(require('module')._cache).filter((f) => f.includes('/node_modules/')).map((f) => f.replace(/.*\\/node_modules\\/((@[^/]+\\/)?[^/]+).*/, '$1'));
  const nat = process.moduleLoadList.filter((m) => /^NativeModule (http|https|tls|_http_server|_http_client|crypto|worker_threads|child_process)$/.test(m)).map((m) => m.slice('NativeModule '.length));
  const bundled = [...chunks].flatMap((f) => {
    const text = readFileSync(f, 'utf8');
    return [...(text.includes('YAMLParseError') ? ['yaml'] : []), ...(text.includes('ZodError') ? ['zod'] : [])];
  });
  process.stderr.write('loaded: ' + JSON.stringify([...new Set([...pk, ...nat, ...bundled])].sort()) + '\\n');
});
`,
    );
    const local = path.join(top, 'small.bin');
    fs.writeFileSync(local, Buffer.alloc(65536, 7));
    const loaded = async (args: string[]): Promise<string[]> => {
      const r = await run(process.execPath, ['--import', probe, CLI, ...args, '-c', config], { timeoutMs: 30_000 });
      expect(r.code, `${args.join(' ')}: ${r.stderr}`).toBe(0);
      return JSON.parse(/loaded: (.*)\n/.exec(r.stderr)![1]!) as string[];
    };
    const forbidden = ['fastify', 'pino', 'etcd3', 'tls', 'https', 'crypto', 'worker_threads', 'child_process', '@node-rs/crc32', '@node-rs/xxhash', 'fuse-native', 'prom-client'];
    // The first command parses the YAML (the probe sees YAML and zod) and caches the result; the rest use it.
    const first = await loaded(['status']);
    expect(first).toEqual(expect.arrayContaining(['http', 'yaml', 'zod'])); // the probe sees what is loaded
    forbidden.push('yaml', 'zod');
    for (const args of [['status'], ['pair', 'split', 'p1'], ['pair', 'resync', 'p1']]) {
      const got = await loaded(args);
      expect(got.filter((m) => forbidden.includes(m)), args.join(' ')).toEqual([]);
    }
    for (const args of [['cfs', 'put', local, '/small.bin'], ['cfs', 'get', '/small.bin', path.join(top, 'got.bin')], ['cfs', 'ls', '/']]) {
      const got = await loaded(args);
      expect(got.filter((m) => [...forbidden, 'http', '_http_client'].includes(m)), args.join(' ')).toEqual([]);
    }
    expect(fs.readFileSync(path.join(top, 'got.bin')).equals(fs.readFileSync(local))).toBe(true);
  });
});
