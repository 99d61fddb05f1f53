// Live reconfiguration (`blockmirror apply`, docs: README "Changing a running cluster"): each kind
// of change on a running `up`, seen by real clients; the refusals, word for word, with nothing
// applied; and a failure half way (a volume file that cannot be created) undoing what came before.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { connect, type NbdClient } from '../src/nbd/client.js';
import { adminFetch } from './helpers/admin.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

const MiB = 1024 * 1024;
const running: RunningCluster[] = [];
const clients: NbdClient[] = [];
afterEach(async () => {
  await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
  await Promise.all(running.splice(0).map((c) => c.stop('SIGKILL')));
});

interface Ports {
  nbd: number;
  admin: number;
}

interface Shape {
  volumes: [number, string][];
  pairs: string;
  cache?: string;
  /** The cache's bypass size, as written in the YAML. */
  bypass?: string;
  peerTimeout?: string;
}

/** One storage system with file volumes in dataDir, as the tests reshape it. */
function yaml(p: Ports, s: Shape): string {
  return `# the cluster of a reconfiguration test
${s.peerTimeout ? `peerTimeout: ${s.peerTimeout}\n` : ''}storageSystems:
  - id: 1
    nbd: 127.0.0.1:${p.nbd}
    admin: 127.0.0.1:${p.admin}
    dataDir: data
    cache: { size: 8MiB${s.cache ? `, policy: ${s.cache}` : ''}${s.bypass ? `, bypass: ${s.bypass}` : ''} }
    volumes:
${s.volumes.map(([id, size]) => `      - { id: ${id}, size: ${size} }`).join('\n')}
pairs:
${s.pairs}`;
}

const PAIR2 = `  - name: pair2
    mode: sync
    master: { ss: 1, vol: 5 }
    mirrors: [ { ss: 1, vol: 6 } ]
`;

async function start(s: Shape): Promise<{ c: RunningCluster; p: Ports; file: string }> {
  const p = { nbd: await freePort(), admin: await freePort() };
  const dir = tmpDir('bm-reconf-');
  const file = path.join(dir, 'cluster.yaml');
  fs.writeFileSync(file, yaml(p, s));
  const c = await startUp(file, [p.nbd, p.admin]);
  running.push(c);
  return { c, p, file };
}

function apply(file: string, ...args: string[]) {
  return run(process.execPath, [CLI, 'apply', '-c', file, ...args], { timeoutMs: 60_000 });
}

interface Report {
  storageSystems: { peerTimeout?: number; cache?: { policy?: string; dirtyBytes: number; bypass?: number; bypassedBytes?: number }; volumes: { id: number; size: number; role: string; pair?: string }[] }[];
  pairs: { name: string; state: string; syncRate?: number; fence: string; master: { vol: number }; mirrors: { vol: number; invalidClusters: number }[] }[];
}

async function status(p: Ports): Promise<Report> {
  return (await (await adminFetch(`http://127.0.0.1:${p.admin}/api/status`)).json()) as Report;
}

async function waitState(p: Ports, name: string, state: string, ms = 30_000): Promise<Report['pairs'][number]> {
  const deadline = Date.now() + ms;
  let last: Report['pairs'][number] | undefined;
  while (Date.now() < deadline) {
    last = (await status(p)).pairs.find((x) => x.name === name);
    if (last?.state === state) return last;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${name} never reached ${state}; last ${JSON.stringify(last)}`);
}

const uri = (p: Ports, vol: number) => `nbd://127.0.0.1:${p.nbd}/vol${vol}`;

async function exportSize(p: Ports, vol: number): Promise<number | undefined> {
  const r = await run('nbdinfo', ['--size', uri(p, vol)]);
  return r.code === 0 ? Number(r.stdout.trim()) : undefined;
}

/** Every copy's bytes through NBD, compared with the first. */
async function sameData(p: Ports, vols: number[], dir: string): Promise<void> {
  const files = [];
  for (const v of vols) {
    const f = path.join(dir, `copy-vol${v}.img`);
    const r = await run('nbdcopy', [uri(p, v), f]);
    expect(r.code, r.stderr).toBe(0);
    files.push(f);
  }
  for (const f of files.slice(1)) {
    const r = await run('cmp', [files[0]!, f]);
    expect(r.code, `${files[0]} and ${f} differ: ${r.stdout}`).toBe(0);
  }
}

async function write(p: Ports, vol: number, pattern: number, offset: string, length: string): Promise<void> {
  const r = await run('qemu-io', ['-f', 'raw', '-c', `write -P ${pattern} ${offset} ${length}`, uri(p, vol)]);
  expect(r.code, r.stderr).toBe(0);
}

async function holdOpen(p: Ports, vol: number): Promise<NbdClient> {
  const c = await connect(uri(p, vol));
  clients.push(c);
  return c;
}

describe('blockmirror apply', () => {
  it('prints the plan with --dry-run and changes nothing, in the running storage system or in its file', async () => {
    const { p, file } = await start({ volumes: [[5, '16MiB'], [6, '16MiB']], pairs: PAIR2 });
    const before = fs.readFileSync(file, 'utf8');
    const edited = path.join(path.dirname(file), 'edited.yaml');
    fs.writeFileSync(edited, yaml(p, { volumes: [[5, '16MiB'], [6, '16MiB'], [9, '8MiB']], pairs: PAIR2.replace('    mirrors', '    syncRate: 4MiB\n    mirrors') }));
    const r = await apply(edited, '--dry-run');
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('plan (2 changes):\n  ss1: pair2: syncRate unlimited -> 4MiB/s\n  ss1: add volume 9 (8MiB)\n');
    expect(r.code).toBe(0);
    expect(await exportSize(p, 9)).toBeUndefined();
    expect((await status(p)).pairs[0]!.syncRate).toBeUndefined();
    expect(fs.readFileSync(file, 'utf8')).toBe(before);
    const same = await apply(file);
    expect(same.stdout).toBe('no changes\n');
    expect(same.code).toBe(0);
  });

  it('applies each kind of change to a running storage system, which clients and status see at once', { timeout: 180_000 }, async () => {
    const { p, file } = await start({ volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB']], pairs: PAIR2 });
    const dir = path.dirname(file);
    await waitState(p, 'pair2', 'PAIR');
    await write(p, 5, 0x11, '0', '3M');
    await write(p, 7, 0x77, '1M', '1M');
    const step = async (s: Shape, expected: string) => {
      fs.writeFileSync(file, yaml(p, s));
      const r = await apply(file);
      expect(r.stderr).toBe('');
      expect(r.stdout).toBe(expected);
      expect(r.code).toBe(0);
    };
    // Settings: sync rate, fence level, peerTimeout, cache policy and bypass.
    const pair2 = PAIR2.replace('    mirrors', '    syncRate: 32MiB\n    fence: data\n    mirrors');
    await step({ volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB']], pairs: pair2, peerTimeout: '2s', cache: 'write-through', bypass: '0' }, 'plan (4 changes):\n  ss1: peerTimeout 5000 ms -> 2000 ms\n  ss1: cache policy write-back -> write-through\n  ss1: cache bypass 1MiB -> none\n  ss1: pair2: syncRate unlimited -> 32MiB/s, fence never -> data\napplied 4 changes\n');
    let s = await status(p);
    expect(s.pairs[0]).toMatchObject({ name: 'pair2', syncRate: 32 * MiB, fence: 'data' });
    expect(s.storageSystems[0]).toMatchObject({ peerTimeout: 2000, cache: { policy: 'write-through', bypass: 0 } });
    // Write-through: a write is on the volume file when it is acknowledged, so nothing is dirty.
    // With no bypass, this 1 MiB write went through the cache, not past it.
    // The 3 MiB written to volume 5 above, with the default bypass, went past it.
    const bypassed = s.storageSystems[0]!.cache!.bypassedBytes;
    expect(bypassed).toBeGreaterThanOrEqual(3 * MiB);
    await write(p, 7, 0x78, '3M', '1M');
    s = await status(p);
    expect(s.storageSystems[0]!.cache).toMatchObject({ dirtyBytes: 0, bypassedBytes: bypassed });
    const base: Shape = { volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB']], pairs: pair2, peerTimeout: '2s', cache: 'write-through', bypass: '0' };
    // A new volume, and a simplex volume holding data grown.
    await step({ ...base, volumes: [[5, '16MiB'], [6, '16MiB'], [7, '12MiB'], [9, '8MiB']] }, 'plan (2 changes):\n  ss1: add volume 9 (8MiB)\n  ss1: resize volume 7: 8MiB -> 12MiB\napplied 2 changes\n');
    expect(await exportSize(p, 9)).toBe(8 * MiB);
    expect(await exportSize(p, 7)).toBe(12 * MiB);
    const grown = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x77 1M 1M', '-c', 'read -P 0x78 3M 1M', '-c', 'read -P 0 8M 4M', uri(p, 7)]);
    expect(grown.stdout, grown.stderr).not.toMatch(/Pattern verification failed/);
    expect(grown.code).toBe(0);
    // A mirror added to the pair (full copy, then PAIR) and a new pair of the new volume.
    const vols: [number, string][] = [[5, '16MiB'], [6, '16MiB'], [7, '12MiB'], [9, '8MiB'], [10, '16MiB'], [11, '8MiB']];
    const withMirror = pair2.replace('[ { ss: 1, vol: 6 } ]', '[ { ss: 1, vol: 6 }, { ss: 1, vol: 10 } ]');
    const pair3 = `  - name: pair3\n    mode: async\n    master: { ss: 1, vol: 9 }\n    mirrors: [ { ss: 1, vol: 11 } ]\n`;
    await step({ ...base, volumes: vols, pairs: withMirror + pair3 }, 'plan (4 changes):\n  ss1: add volume 10 (16MiB)\n  ss1: add volume 11 (8MiB)\n  ss1: pair2: add mirror 1:10 (full copy, then PAIR)\n  ss1: create pair pair3 (async, master 1:9, mirror 1:11: full copy, then PAIR)\napplied 4 changes\n');
    await write(p, 9, 0x99, '0', '2M');
    await waitState(p, 'pair2', 'PAIR');
    await waitState(p, 'pair3', 'PAIR');
    await sameData(p, [5, 6, 10], dir);
    await sameData(p, [9, 11], dir);
    // The pair's master moved to another volume while no host uses the pair: every mirror copies it.
    const moved = withMirror.replace('master: { ss: 1, vol: 5 }', 'master: { ss: 1, vol: 6 }').replace('{ ss: 1, vol: 6 }, { ss: 1, vol: 10 }', '{ ss: 1, vol: 5 }, { ss: 1, vol: 10 }');
    await write(p, 5, 0x55, '8M', '1M');
    await step({ ...base, volumes: vols, pairs: moved + pair3 }, 'plan (1 change):\n  ss1: pair2: master 1:5 -> 1:6 (every mirror copies it whole)\napplied 1 change\n');
    await waitState(p, 'pair2', 'PAIR');
    s = await status(p);
    expect(s.pairs.find((x) => x.name === 'pair2')!.master.vol).toBe(6);
    await sameData(p, [6, 5, 10], dir);
    // A mirror removed, a pair deleted (its volumes keep their data as simplex volumes), a volume removed.
    const fewer = moved.replace('{ ss: 1, vol: 5 }, { ss: 1, vol: 10 }', '{ ss: 1, vol: 5 }');
    await step({ ...base, volumes: [[5, '16MiB'], [6, '16MiB'], [7, '12MiB'], [9, '8MiB'], [11, '8MiB']], pairs: fewer }, 'plan (3 changes):\n  ss1: delete pair pair3 (1:9 and 1:11 become simplex volumes)\n  ss1: pair2: remove mirror 1:10 (it becomes a simplex volume)\n  ss1: remove volume 10 (its file stays in ' + path.join(dir, 'data') + ')\napplied 3 changes\n');
    expect(await exportSize(p, 10)).toBeUndefined();
    s = await status(p);
    expect(s.pairs.map((x) => x.name)).toEqual(['pair2']);
    expect(s.pairs[0]!.mirrors.map((m) => m.vol)).toEqual([5]);
    expect(s.storageSystems[0]!.volumes.find((v) => v.id === 11)).toMatchObject({ role: 'simplex' });
    await sameData(p, [9, 11], dir);
    // The simplex copy of a deleted pair takes writes now.
    await write(p, 11, 0xaa, '0', '64K');
  });

  it('refuses unsafe changes with one line and applies nothing', { timeout: 120_000 }, async () => {
    const { p, file } = await start({ volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB'], [8, '16MiB']], pairs: PAIR2 });
    await waitState(p, 'pair2', 'PAIR');
    await write(p, 7, 0x77, '0', '1M');
    const before = fs.readFileSync(file, 'utf8');
    const refused = async (s: Shape, message: string) => {
      const edited = path.join(path.dirname(file), 'edited.yaml');
      fs.writeFileSync(edited, yaml(p, s));
      const r = await apply(edited);
      expect(r.stdout).toBe('');
      expect(r.stderr).toBe(`blockmirror: ${message}; nothing was applied\n`);
      expect(r.code).toBe(1);
      // Nothing changed: the first change of the plan (the sync rate) is not there either.
      expect((await status(p)).pairs[0]!.syncRate).toBeUndefined();
      expect(fs.readFileSync(file, 'utf8')).toBe(before);
    };
    const rate = PAIR2.replace('    mirrors', '    syncRate: 4MiB\n    mirrors');
    await refused({ volumes: [[5, '16MiB'], [6, '16MiB'], [7, '4MiB'], [8, '8MiB']], pairs: rate }, 'storage system 1: volume 7 holds data: shrinking it from 8MiB to 4MiB would lose data; copy it to a new volume instead');
    const host = await holdOpen(p, 5);
    await refused(
      { volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB'], [8, '16MiB']], pairs: rate.replace('vol: 5 }', 'vol: 8 }').replace('{ ss: 1, vol: 6 }', '{ ss: 1, vol: 5 }') },
      'storage system 1: pair pair2 is in use (1 host connection): its master cannot change from 1:5 to 1:8 while hosts use it; detach them, or use pair swap',
    );
    const other = await holdOpen(p, 8);
    await refused({ volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB']], pairs: rate }, 'storage system 1: volume 8 is in use (1 host connection): detach the hosts before removing it');
    await refused(
      { volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB'], [8, '16MiB']], pairs: rate.replace('[ { ss: 1, vol: 6 } ]', '[ { ss: 1, vol: 6 }, { ss: 1, vol: 8 } ]') },
      'storage system 1: volume 8 is in use (1 host connection): it would become a mirror of pair2, read-only to hosts; detach them first',
    );
    // The hosts were never disturbed.
    await host.pwrite(Buffer.alloc(4096, 0x42), 0);
    expect((await other.pread(4096, 0)).equals(Buffer.alloc(4096))).toBe(true);
    // A change only a restart makes.
    const moved = yaml({ ...p, nbd: await freePort() }, { volumes: [[5, '16MiB'], [6, '16MiB'], [7, '8MiB'], [8, '16MiB']], pairs: rate });
    const edited = path.join(path.dirname(file), 'edited.yaml');
    fs.writeFileSync(edited, moved);
    const r = await apply(edited);
    expect(r.stderr).toBe('blockmirror: storage system 1: the NBD address (nbd) cannot change at run time; restart the storage system (blockmirror up) to change it; nothing was applied\n');
    expect(r.code).toBe(1);
  });

  it('undoes the changes before a failing one: the sync rate and the first new volume are gone again', { timeout: 60_000 }, async () => {
    const { p, file } = await start({ volumes: [[5, '16MiB'], [6, '16MiB']], pairs: PAIR2 });
    const dir = path.dirname(file);
    await waitState(p, 'pair2', 'PAIR');
    // Fault injection: volume 13's file cannot be created, because a directory has its name.
    fs.mkdirSync(path.join(dir, 'data', 'vol13.img'));
    const before = fs.readFileSync(file, 'utf8');
    fs.writeFileSync(file, yaml(p, { volumes: [[5, '16MiB'], [6, '16MiB'], [12, '8MiB'], [13, '8MiB']], pairs: PAIR2.replace('    mirrors', '    syncRate: 4MiB\n    mirrors') }));
    const r = await apply(file);
    expect(r.stdout).toBe('plan (3 changes):\n  ss1: pair2: syncRate unlimited -> 4MiB/s\n  ss1: add volume 12 (8MiB)\n  ss1: add volume 13 (8MiB)\n');
    expect(r.stderr).toBe(`blockmirror: ss1: add volume 13 (8MiB): EISDIR: illegal operation on a directory, open '${path.join(dir, 'data', 'vol13.img')}'; nothing applied (undid the 2 changes before it)\n`);
    expect(r.code).toBe(1);
    expect((await status(p)).pairs[0]!.syncRate).toBeUndefined();
    expect(await exportSize(p, 12)).toBeUndefined();
    expect((await status(p)).storageSystems[0]!.volumes.map((v) => v.id)).toEqual([5, 6]);
    // The running process kept its YAML: a restart would run what runs now.
    const got = await adminFetch(`http://127.0.0.1:${p.admin}/api/config`);
    expect(((await got.json()) as { yaml: string }).yaml).toBe(before);
    // With the obstacle gone, the same file applies.
    fs.rmdirSync(path.join(dir, 'data', 'vol13.img'));
    const again = await apply(file);
    expect(again.stdout).toMatch(/\napplied 3 changes\n$/);
    expect(await exportSize(p, 13)).toBe(8 * MiB);
  });

  it('refuses to change the copies of a pair the CFS keeps files on, and still changes what the CFS does not use', async () => {
    const p = { nbd: await freePort(), admin: await freePort() };
    const dir = tmpDir('bm-reconf-cfs-');
    const file = path.join(dir, 'cluster.yaml');
    const cfs = `cfs:\n  listen: 127.0.0.1:${await freePort()}\n  dataDir: cfs\n  pairs: [ pair2 ]\n`;
    const shape = (extra: [number, string][], pairs: string) => `${yaml(p, { volumes: [[5, '16MiB'], [6, '16MiB'], ...extra], pairs })}${cfs}`;
    fs.writeFileSync(file, shape([], PAIR2));
    running.push(await startUp(file, [p.nbd, p.admin], ['--no-cfs']));
    fs.writeFileSync(file, shape([[10, '16MiB']], PAIR2.replace('[ { ss: 1, vol: 6 } ]', '[ { ss: 1, vol: 6 }, { ss: 1, vol: 10 } ]')));
    const r = await apply(file);
    expect(r.stderr).toBe('blockmirror: the cfs: section and the copies of the pairs it keeps files on cannot change at run time; restart the storage systems with the new YAML; nothing was applied\n');
    expect(r.code).toBe(1);
    expect(await exportSize(p, 10)).toBeUndefined();
    fs.writeFileSync(file, shape([[10, '16MiB']], PAIR2));
    const ok = await apply(file);
    expect(ok.stdout).toBe('plan (1 change):\n  ss1: add volume 10 (16MiB)\napplied 1 change\n');
    expect(await exportSize(p, 10)).toBe(16 * MiB);
  });

  it('refuses a YAML with a mistake with its line and column, exit code 2', async () => {
    const { p, file } = await start({ volumes: [[5, '16MiB'], [6, '16MiB']], pairs: PAIR2 });
    fs.writeFileSync(file, yaml(p, { volumes: [[5, '16MiB'], [6, '16MiB']], pairs: PAIR2.replace('mode: sync', 'mode: [sync') }));
    const r = await apply(file);
    const why = 'YAML syntax error: Flow sequence in block collection must be sufficiently indented and end with a ]; correct the YAML at that line and column (config/demo.yaml is a commented example)';
    expect(r.stderr).toBe(`blockmirror: ${file}:14:5: ${why}\n`);
    expect(r.code).toBe(2);
    // The admin API says the same, about the file of the storage system's own process.
    const res = await adminFetch(`http://127.0.0.1:${p.admin}/api/config`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ yaml: fs.readFileSync(file, 'utf8') }) });
    expect(res.status).toBe(400);
    expect(await res.json()).toEqual({ error: `${file}:14:5: ${why}` });
  });
});
