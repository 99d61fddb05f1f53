// Progress bars of the long commands, run as a user runs them: on a terminal (a pseudo-terminal,
// helpers/pty.ts) a bar that moves and ends at 100%; in a pipe no bar and no control character,
// one summary line instead; with --json, JSON and no bar even on a terminal. The numbers are what
// the storage system reports (pair resync/verify) or what the CFS client moved (cfs put/get).
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startCfsCluster, pattern, type CfsCluster } from './helpers/cfs.js';
import { barPercentages, CONTROL_CHARS, runInPty } from './helpers/pty.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

const MiB = 1024 * 1024;

/** The pair's sync daemon copies 8 MiB/s, so a resync of 24 MiB takes seconds: long enough for a bar. */
function yaml(nbd: number, admin: number): string {
  return `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    volumes:
      - { id: 1, size: 32MiB }
      - { id: 2, size: 32MiB }
pairs:
  - { name: slow, mode: async, master: { ss: 1, vol: 1 }, mirrors: [ { ss: 1, vol: 2 } ], syncRate: 8MiB }
`;
}

function nondecreasing(xs: number[]): boolean {
  return xs.every((x, i) => i === 0 || x >= xs[i - 1]!);
}

describe('pair resync --wait and pair verify', () => {
  let cluster: RunningCluster;
  let nbd: number;
  let file: string;
  const cli = (...args: string[]) => run(process.execPath, [CLI, ...args, '-c', file]);
  const pty = (...args: string[]) => runInPty(process.execPath, [CLI, ...args, '-c', file]);
  const uri = (vol: number) => `nbd://127.0.0.1:${nbd}/vol${vol}`;

  /** Split, then write `mib` MiB to the master: that much is Invalid on the mirror for the next resync. */
  async function splitAndWrite(mib: number, fill: number): Promise<void> {
    const split = await cli('pair', 'split', 'slow');
    expect(split.stdout, split.stderr).toBe('slow: PSUS\n');
    const w = await run('qemu-io', ['-f', 'raw', '-c', `write -P ${fill} 0 ${mib}M`, uri(1)]);
    expect(w.code, w.stderr + w.stdout).toBe(0);
  }

  async function copiesMatch(): Promise<void> {
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri(1), uri(2)]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
    expect(cmp.code).toBe(0);
  }

  beforeAll(async () => {
    nbd = await freePort();
    const admin = await freePort();
    file = path.join(tmpDir('bm-progress-'), 'cluster.yaml');
    fs.writeFileSync(file, yaml(nbd, admin));
    cluster = await startUp(file, [nbd, admin]);
  });
  afterAll(async () => {
    await cluster?.stop();
  });

  it('draws a bar on a terminal that moves with the copied clusters, reaches 100% and ends in PAIR', async () => {
    await splitAndWrite(24, 0x31);
    const r = await pty('pair', 'resync', 'slow', '--wait');
    expect(r.code, r.stdout).toBe(0);
    const seen = barPercentages(r.stdout, 'resync slow');
    expect(seen.length, r.stdout).toBeGreaterThan(1);
    expect(seen[0]).toBeLessThan(100);
    expect(seen.at(-1)).toBe(100);
    expect(nondecreasing(seen), seen.join(' ')).toBe(true);
    // The bar's totals are the controller's clusters: 24 MiB of 64 KiB clusters.
    expect(r.stdout).toContain('384/384 clusters');
    expect(r.stdout).toMatch(/slow: PAIR; resync copied 384 clusters \(24MiB\) in [\d.]+ s: the mirrors are in sync\r?\n/);
    await copiesMatch();
  });

  it('prints one summary line and no control character when piped', async () => {
    await splitAndWrite(16, 0x32);
    const r = await cli('pair', 'resync', 'slow', '--wait');
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^slow: PAIR; resync copied 256 clusters \(16MiB\) in [\d.]+ s: the mirrors are in sync\n$/);
    expect(CONTROL_CHARS.test(r.stdout)).toBe(false);
    await copiesMatch();
  });

  it('prints JSON and draws no bar with --json, even on a terminal', async () => {
    await splitAndWrite(8, 0x33);
    const r = await pty('pair', 'resync', 'slow', '--wait', '--json');
    expect(r.code, r.stdout).toBe(0);
    expect(barPercentages(r.stdout, 'resync slow')).toEqual([]);
    expect(CONTROL_CHARS.test(r.stdout.replace(/\r\n/g, '\n'))).toBe(false);
    const status = JSON.parse(r.stdout) as { name: string; state: string; mirrors: { invalidClusters: number }[] };
    expect(status).toMatchObject({ name: 'slow', state: 'PAIR', mirrors: [{ invalidClusters: 0 }] });
    await copiesMatch();
  });

  it('draws the verify bar to 100% on a terminal, and only the result line when piped', async () => {
    const t = await pty('pair', 'verify', 'slow');
    expect(t.code, t.stdout).toBe(0);
    const seen = barPercentages(t.stdout, 'verify slow');
    expect(seen.at(-1), t.stdout).toBe(100);
    expect(nondecreasing(seen)).toBe(true);
    expect(t.stdout).toContain('512/512 clusters');
    expect(t.stdout).toContain('slow: PAIR; verified 512 clusters: the mirrors match the master');
    const p = await cli('pair', 'verify', 'slow');
    expect(p.code, p.stderr).toBe(0);
    expect(p.stdout).toBe('slow: PAIR; verified 512 clusters: the mirrors match the master\n');
    expect(CONTROL_CHARS.test(p.stdout + p.stderr)).toBe(false);
  });
});

describe('svol --wait', () => {
  let cluster: RunningCluster;
  let file: string;
  let nbd: number;
  beforeAll(async () => {
    nbd = await freePort();
    const admin = await freePort();
    file = path.join(tmpDir('bm-progress-svol-'), 'cluster.yaml');
    fs.writeFileSync(
      file,
      `clusterSize: 64KiB
storageSystems:
  - id: 1
    nbd: 127.0.0.1:${nbd}
    admin: 127.0.0.1:${admin}
    volumes:
${[1, 2, 3, 4].map((v) => `      - { id: ${v}, size: 16MiB }`).join('\n')}
    svolGroups:
      - name: backup
        pvol: 1
        members:
          - { vol: 2, attr: RO }
          - { vol: 3, attr: RO }
          - { vol: 4, attr: spare }
`,
    );
    cluster = await startUp(file, [nbd, admin]);
  });
  afterAll(async () => {
    await cluster?.stop();
  });

  it('draws the group copy to 100% on a terminal and prints the group table; piped, only the table', async () => {
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x41 0 16M', `nbd://127.0.0.1:${nbd}/vol1`]);
    expect(w.code, w.stderr + w.stdout).toBe(0);
    const t = await runInPty(process.execPath, [CLI, 'svol', 'init', 'backup', '--wait', '-c', file]);
    expect(t.code, t.stdout).toBe(0);
    const seen = barPercentages(t.stdout, 'backup');
    expect(seen.at(-1), t.stdout).toBe(100);
    expect(nondecreasing(seen)).toBe(true);
    expect(t.stdout).toMatch(/backup: paired, P-VOL 1, split generation 0\r?\n/);
    const split = await run(process.execPath, [CLI, 'svol', 'split', 'backup', '-c', file]);
    expect(split.code, split.stderr).toBe(0);
    const w2 = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 4M', `nbd://127.0.0.1:${nbd}/vol1`]);
    expect(w2.code).toBe(0);
    const p = await run(process.execPath, [CLI, 'svol', 'resync', 'backup', '--wait', '-c', file]);
    expect(p.code, p.stderr).toBe(0);
    expect(p.stderr).toBe('');
    expect(p.stdout).toMatch(/^backup: paired, P-VOL 1, split generation 1\n/);
    expect(CONTROL_CHARS.test(p.stdout)).toBe(false);
    // Every member holds the P-VOL's data, byte for byte.
    for (const vol of [2, 3]) {
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', `nbd://127.0.0.1:${nbd}/vol1`, `nbd://127.0.0.1:${nbd}/vol${vol}`]);
      expect(cmp.stdout + cmp.stderr, `vol${vol}`).toContain('Images are identical');
    }
  });
});

describe('cfs put and get of a large file', () => {
  let c: CfsCluster;
  let dir: string;
  let big: string;
  const data = pattern('progress', 20 * MiB);

  beforeAll(async () => {
    c = await startCfsCluster();
    dir = tmpDir('bm-progress-cfs-');
    big = path.join(dir, 'big.bin');
    fs.writeFileSync(big, data);
  });
  afterAll(async () => {
    await c?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const pty = (...args: string[]) => runInPty(process.execPath, [CLI, 'cfs', ...args, '-c', c.config]);

  it('draws a bar to 100% on a terminal for put and for get, and the copy is byte for byte', async () => {
    const put = await pty('put', big, '/big.bin');
    expect(put.code, put.stdout).toBe(0);
    expect(barPercentages(put.stdout, 'put').at(-1), put.stdout).toBe(100);
    expect(put.stdout).toContain('20/20 MiB');
    const out = path.join(dir, 'back.bin');
    const get = await pty('get', '/big.bin', out);
    expect(get.code, get.stdout).toBe(0);
    expect(barPercentages(get.stdout, 'get').at(-1), get.stdout).toBe(100);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
  });

  it('prints one summary line on stderr and no control character when piped', async () => {
    const put = await c.cli(['put', big, '/piped.bin']);
    expect(put.code, put.stderr).toBe(0);
    expect(put.stdout).toBe('');
    expect(put.stderr).toMatch(new RegExp(`^put ${big.replace(/[.]/g, '\\.')} -> /piped\\.bin: 20MiB in [\\d.]+ s \\([\\d.]+[KMG]?i?B/s\\)\\n$`));
    const out = path.join(dir, 'piped.bin');
    const get = await c.cli(['get', '/piped.bin', out]);
    expect(get.code, get.stderr).toBe(0);
    expect(get.stderr).toMatch(/^get \/piped\.bin -> .*piped\.bin: 20MiB in [\d.]+ s/);
    expect(CONTROL_CHARS.test(put.stdout + put.stderr + get.stdout + get.stderr)).toBe(false);
    expect(fs.readFileSync(out).equals(data)).toBe(true);
    // A small file says nothing, as cp does.
    fs.writeFileSync(path.join(dir, 'small'), 'x');
    const small = await c.cli(['put', path.join(dir, 'small'), '/small']);
    expect([small.code, small.stdout, small.stderr]).toEqual([0, '', '']);
  });

  it('prints what was copied as JSON with --json, with no bar on a terminal, and refuses --json with get to stdout', async () => {
    const put = await pty('put', big, '/json.bin', '--json');
    expect(put.code, put.stdout).toBe(0);
    expect(barPercentages(put.stdout, 'put')).toEqual([]);
    expect(JSON.parse(put.stdout)).toMatchObject({ op: 'put', from: big, to: '/json.bin', bytes: 20 * MiB });
    const get = await c.cli(['get', '/json.bin', '-', '--json']);
    expect(get.code).toBe(2);
    expect(get.stderr).toBe('blockmirror: get: --json needs a local file, not - (stdout carries the data)\n');
  });
});
