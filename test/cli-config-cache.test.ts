// The CLI's parsed-configuration cache (src/cli/config-cache.ts, issue 18): a client command uses
// an entry only for the same absolute path, the same bytes and the same build; anything else, or
// a directory that is not private, is a miss, and a miss parses exactly as before.
import fs from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { cachedConfig, keepConfig, loadConfigOrUsage, MAX_ENTRIES } from '../src/cli/config-cache.js';
import { loadConfig, parseConfig, type ClusterConfig } from '../src/cluster/config.js';
import { CLI, ROOT, run, tmpDir } from './helpers/servers.js';

const top = tmpDir('bm-cfg-cache-');
const BUILD = 'test build';

function yamlFile(dir: string, adminPort: number, name = 'cluster.yaml'): string {
  const file = path.join(dir, name);
  fs.writeFileSync(
    file,
    `storageSystems:
  - id: 1
    nbd: 127.0.0.1:1
    admin: 127.0.0.1:${adminPort}
    volumes:
      - { id: 1, size: 1MiB }
      - { id: 2, size: 1MiB }
pairs:
  - { name: p, mode: sync, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ] }
`,
  );
  return file;
}

/** A private cache directory of its own. */
function cacheDir(): string {
  const dir = fs.mkdtempSync(path.join(top, 'cache-'));
  fs.chmodSync(dir, 0o700);
  return dir;
}

const parse = (file: string): ClusterConfig => parseConfig(fs.readFileSync(file, 'utf8'), file, path.dirname(path.resolve(file)));

/** Every value JSON carries unchanged: no Map, Set, Buffer, Date, function, bigint, NaN or Infinity anywhere. */
function nonPlain(v: unknown, at = 'config'): string[] {
  if (v === null || typeof v === 'string' || typeof v === 'boolean' || v === undefined) return [];
  if (typeof v === 'number') return Number.isFinite(v) ? [] : [`${at}: ${v}`];
  if (Array.isArray(v)) return v.flatMap((x, i) => nonPlain(x, `${at}[${i}]`));
  if (typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) return Object.entries(v).flatMap(([k, x]) => nonPlain(x, `${at}.${k}`));
  return [`${at}: ${Object.prototype.toString.call(v)}`];
}

describe('the parsed-configuration cache of client commands', () => {
  it('gives back what parseConfig gave for the same path, bytes and build, named as this command names the file', () => {
    const dir = cacheDir();
    const file = yamlFile(fs.mkdtempSync(path.join(top, 'y-')), 7001);
    const text = fs.readFileSync(file, 'utf8');
    expect(cachedConfig(file, text, { dir, build: BUILD })).toBeUndefined();
    const parsed = parse(file);
    keepConfig(file, text, parsed, { dir, build: BUILD });
    const [entry] = fs.readdirSync(dir);
    expect(entry).toMatch(/^config-[0-9a-f]{8}\.json$/);
    expect(fs.statSync(path.join(dir, entry!)).mode & 0o777).toBe(0o600);
    expect(cachedConfig(file, text, { dir, build: BUILD })).toEqual(parsed);
    // The same file named relative to the working directory: the entry, with `source` as given now.
    const relative = path.relative(process.cwd(), file);
    expect(cachedConfig(relative, text, { dir, build: BUILD })).toEqual({ ...parsed, source: relative });
  });

  it('misses on an edit of the same length, another build, another path with the same bytes, and a damaged entry', () => {
    const dir = cacheDir();
    const file = yamlFile(fs.mkdtempSync(path.join(top, 'y-')), 7001);
    const text = fs.readFileSync(file, 'utf8');
    keepConfig(file, text, parse(file), { dir, build: BUILD });
    expect(cachedConfig(file, text.replace('7001', '7002'), { dir, build: BUILD })).toBeUndefined();
    expect(cachedConfig(file, text, { dir, build: 'another build' })).toBeUndefined();
    const copy = path.join(fs.mkdtempSync(path.join(top, 'y-')), 'cluster.yaml');
    fs.copyFileSync(file, copy);
    expect(cachedConfig(copy, text, { dir, build: BUILD })).toBeUndefined();
    expect(cachedConfig(file, text, { dir, build: BUILD })).toBeDefined();
    const [entry] = fs.readdirSync(dir);
    fs.writeFileSync(path.join(dir, entry!), '{"format":1,');
    expect(cachedConfig(file, text, { dir, build: BUILD })).toBeUndefined();
    for (const damaged of ['null', JSON.stringify({ format: 1, build: BUILD, file: path.resolve(file), text, config: null })]) {
      fs.writeFileSync(path.join(dir, entry!), damaged);
      expect(cachedConfig(file, text, { dir, build: BUILD })).toBeUndefined();
    }
  });

  it('neither reads nor writes a directory that others may read or write, or that is a symlink', async () => {
    const file = yamlFile(fs.mkdtempSync(path.join(top, 'y-')), 7001);
    const text = fs.readFileSync(file, 'utf8');
    const loose = cacheDir();
    keepConfig(file, text, parse(file), { dir: loose, build: BUILD });
    fs.chmodSync(loose, 0o755);
    expect(cachedConfig(file, text, { dir: loose, build: BUILD })).toBeUndefined();
    const fresh = cacheDir();
    fs.chmodSync(fresh, 0o757);
    expect((await loadConfigOrUsage(file, { dir: fresh, build: BUILD })).storageSystems[0]!.admin.port).toBe(7001);
    expect(fs.readdirSync(fresh)).toEqual([]);
    const target = cacheDir();
    keepConfig(file, text, parse(file), { dir: target, build: BUILD });
    const link = path.join(top, `link-${process.pid}`);
    fs.symlinkSync(target, link);
    expect(cachedConfig(file, text, { dir: link, build: BUILD })).toBeUndefined();
  });

  it('parses on a miss and keeps the result, and reports a bad file as a usage error without writing anything', async () => {
    const dir = cacheDir();
    const file = yamlFile(fs.mkdtempSync(path.join(top, 'y-')), 7001);
    expect(await loadConfigOrUsage(file, { dir, build: BUILD })).toEqual(loadConfig(file));
    expect(fs.readdirSync(dir)).toHaveLength(1);
    const bad = path.join(path.dirname(file), 'bad.yaml');
    fs.writeFileSync(bad, 'storageSystems: [\n');
    await expect(loadConfigOrUsage(bad, { dir, build: BUILD })).rejects.toThrow(/bad\.yaml.*YAML syntax error/);
    await expect(loadConfigOrUsage(path.join(top, 'missing.yaml'), { dir, build: BUILD })).rejects.toThrow(/missing\.yaml.*no such file/);
    expect(fs.readdirSync(dir)).toHaveLength(1);
  });

  it(`keeps at most ${MAX_ENTRIES} entries, the most recently written`, () => {
    const dir = cacheDir();
    const ydir = fs.mkdtempSync(path.join(top, 'y-'));
    const files = Array.from({ length: MAX_ENTRIES + 3 }, (_, i) => yamlFile(ydir, 7001, `c${i}.yaml`));
    const text = fs.readFileSync(files[0]!, 'utf8');
    const parsed = parse(files[0]!);
    files.forEach((f, i) => {
      keepConfig(f, text, parsed, { dir, build: BUILD });
      // Written in order, each a second older than the next (mtime resolution does not order them).
      const entry = fs.readdirSync(dir).map((e) => path.join(dir, e)).find((e) => JSON.parse(fs.readFileSync(e, 'utf8')).file === path.resolve(f))!;
      fs.utimesSync(entry, 1_000_000 + i, 1_000_000 + i);
    });
    expect(fs.readdirSync(dir)).toHaveLength(MAX_ENTRIES);
    const kept = files.filter((f) => cachedConfig(f, text, { dir, build: BUILD }) !== undefined);
    expect(kept).toEqual(files.slice(3));
  });

  it('round-trips every example configuration through JSON unchanged', () => {
    const examples = fs.readdirSync(path.join(ROOT, 'config')).filter((f) => f.endsWith('.yaml'));
    expect(examples.length).toBeGreaterThanOrEqual(5);
    for (const f of examples) {
      const config = loadConfig(path.join(ROOT, 'config', f));
      expect(nonPlain(config), f).toEqual([]);
      expect(JSON.parse(JSON.stringify(config)), f).toEqual(config);
    }
  });
});

describe('the CLI with its configuration cache', () => {
  it('uses an entry only while the YAML is unchanged: an edit takes effect at the next command', async () => {
    const runtime = fs.mkdtempSync(path.join(top, 'xdg-'));
    fs.chmodSync(runtime, 0o700);
    const env = { XDG_RUNTIME_DIR: runtime, BLOCKMIRROR_ADMIN_TOKEN: 'config-cache-test-token' };
    const dir = fs.mkdtempSync(path.join(top, 'y-'));
    const file = yamlFile(dir, 7001);
    // No storage system runs: `status` names the admin address it tried, which comes from the configuration.
    const status = async (): Promise<string> => {
      const r = await run(process.execPath, [CLI, 'status', '-c', file], { env });
      expect(r.code).toBe(1);
      return r.stdout;
    };
    expect(await status()).toContain('(127.0.0.1:7001) is not reachable');
    const cache = path.join(runtime, `blockmirror-${process.getuid!()}`);
    const entries = fs.readdirSync(cache).filter((f) => f.startsWith('config-'));
    expect(entries).toHaveLength(1);
    const entryFile = path.join(cache, entries[0]!);
    expect(fs.statSync(entryFile).mode & 0o777).toBe(0o600);
    expect(fs.statSync(cache).mode & 0o777).toBe(0o700);
    // The next command reads the entry, not the YAML: an entry altered by hand shows through.
    const entry = JSON.parse(fs.readFileSync(entryFile, 'utf8')) as { config: ClusterConfig };
    entry.config.storageSystems[0]!.admin.port = 7003;
    fs.writeFileSync(entryFile, JSON.stringify(entry));
    expect(await status()).toContain('(127.0.0.1:7003) is not reachable');
    // An edit of the YAML misses, is parsed, and replaces the entry.
    yamlFile(dir, 7002);
    expect(await status()).toContain('(127.0.0.1:7002) is not reachable');
    expect(await status()).toContain('(127.0.0.1:7002) is not reachable');
    expect(fs.readdirSync(cache).filter((f) => f.startsWith('config-'))).toEqual(entries);
  });

  it('neither reads nor writes an entry with BLOCKMIRROR_NO_CONFIG_CACHE=1', async () => {
    const runtime = fs.mkdtempSync(path.join(top, 'xdg-'));
    fs.chmodSync(runtime, 0o700);
    const env = { XDG_RUNTIME_DIR: runtime, BLOCKMIRROR_ADMIN_TOKEN: 'config-cache-test-token', BLOCKMIRROR_NO_CONFIG_CACHE: '1' };
    const file = yamlFile(fs.mkdtempSync(path.join(top, 'y-')), 7004);
    const r = await run(process.execPath, [CLI, 'status', '-c', file], { env });
    expect(r.stdout).toContain('(127.0.0.1:7004) is not reachable');
    const cache = path.join(runtime, `blockmirror-${process.getuid!()}`);
    expect(fs.existsSync(cache) ? fs.readdirSync(cache).filter((f) => f.startsWith('config-')) : []).toEqual([]);
  });
});
