// Large writes past the cache memory (cache/memory.ts, rule 5), with real clients against `up`:
// fio with verify interleaves 4 KiB random writes, staged in the cache, with 1 MiB sequential
// writes over the same bytes, which go straight to the volumes, and a stream of 256 KiB writes,
// whose first MiB is staged and the rest goes straight to the volumes, on a sync pair of memory volumes
// (whose mirror adopts the master's pages) and one of file volumes. Both copies of each pair are
// compared byte for byte at the end, through the exports and in the files.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { adminFetch, cacheStatus, cachedSyncPairsYaml } from './helpers/admin.js';
import { fio, requireTools } from './helpers/clients.js';
import { CLI, freePort, run, startUp, tmpDir, type RunningCluster } from './helpers/servers.js';

const MiB = 1024 * 1024;
const running: RunningCluster[] = [];
afterEach(async () => {
  for (const c of running.splice(0)) await c.stop();
});

describe('large writes past the cache memory, with real clients', () => {
  it('keeps a sync pair\'s copies equal while fio verifies 1 MiB writes past the cache over 4 KiB writes in it, on memory and file volumes', { timeout: 240_000 }, async () => {
    requireTools('fio', 'nbdcopy');
    const dir = tmpDir('bm-bypass-');
    const [nbd1, admin1, nbd2, admin2] = [await freePort(), await freePort(), await freePort(), await freePort()];
    const file = path.join(dir, 'cluster.yaml');
    fs.writeFileSync(file, cachedSyncPairsYaml({ nbd1, admin1, nbd2, admin2 }, '{ size: 16MiB }', '48MiB'));
    const c = await startUp(file, [nbd1, admin1, nbd2, admin2]);
    running.push(c);
    for (const [nbd, admin] of [
      [nbd1, admin1],
      [nbd2, admin2],
    ] as const) {
      const uri = `nbd://127.0.0.1:${nbd}/vol5`;
      const before = await cacheStatus(admin);
      expect(before.bypass).toBe(MiB);
      // Small writes first (dirty in the cache), then 1 MiB writes over them and past them, then
      // small ones again over what went past: each phase verifies what it wrote.
      const phases = [
        ['--rw=randwrite', '--bs=4k', '--size=16M', '--io_size=4M', '--randseed=1'],
        ['--rw=write', '--bs=1M', '--size=40M', '--iodepth=8'],
        ['--rw=randwrite', '--bs=4k', '--size=24M', '--io_size=4M', '--randseed=2', '--offset=8M'],
        ['--rw=write', '--bs=256k', '--size=8M', '--offset=40M', '--iodepth=4'],
      ];
      for (const [i, phase] of phases.entries()) {
        const jobs = await fio(uri, dir, [`--name=p${i}`, '--iodepth=16', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', ...phase]);
        expect(jobs[0]!.error, `phase ${i}`).toBe(0);
        expect(jobs[0]!.write.io_bytes, `phase ${i}`).toBeGreaterThan(0);
      }
      const after = await cacheStatus(admin);
      // 40 MiB on the master and 40 on the mirror went past the cache, and of the 8 MiB stream of
      // 256 KiB writes all but its first MiB, on the master and, if they reached it in that
      // order, on the mirror; the small writes went in it.
      const bypassed = after.bypassedBytes - before.bypassedBytes;
      expect(bypassed).toBeGreaterThanOrEqual(80 * MiB + 7 * MiB);
      expect(bypassed).toBeLessThanOrEqual(80 * MiB + 14 * MiB);

      // Both copies through the exports: the mirror is readable while the pair is in PAIR.
      const copies = await Promise.all(
        [5, 6].map(async (vol) => {
          const out = path.join(dir, `ss${admin}-vol${vol}.img`);
          const r = await run('nbdcopy', [`nbd://127.0.0.1:${nbd}/vol${vol}`, out]);
          expect(r.code, r.stderr).toBe(0);
          return fs.readFileSync(out);
        }),
      );
      expect(copies[0]!.length).toBe(48 * MiB);
      expect(copies[0]!.equals(copies[1]!)).toBe(true);
      expect(copies[0]!.subarray(0, 40 * MiB).equals(Buffer.alloc(40 * MiB))).toBe(false);
      expect(copies[0]!.subarray(40 * MiB).equals(Buffer.alloc(8 * MiB))).toBe(false);
    }

    // The memory pair's mirror took the master's pages of the 1 MiB writes instead of copying them.
    const metrics = await (await adminFetch(`http://127.0.0.1:${admin1}/metrics`)).text();
    const shared = Number(/^blockmirror_memory_shared_bytes\{ss="1"\} (\d+)$/m.exec(metrics)?.[1]);
    expect(shared).toBeGreaterThanOrEqual(20 * MiB);

    // The status line says what the cache does with large writes.
    const st = await run(process.execPath, [CLI, 'status', '-c', file]);
    expect(st.code, st.stderr).toBe(0);
    expect(st.stdout).toMatch(/writes ≥ 1MiB and sequential streams past 1MiB bypass it \((8[7-9]|9[0-4])MiB so far\)/);

    // On the files, after a clean stop (the caches destage): the two copies of the file pair are equal.
    expect(await c.stop('SIGTERM')).toBe(0);
    running.splice(0);
    const master = fs.readFileSync(path.join(dir, 'data2', 'vol5.img'));
    expect(master.equals(fs.readFileSync(path.join(dir, 'data2', 'vol6.img')))).toBe(true);
  });
});
