// S-VOL groups (docs/svol.md) under the faults `svol verify` alone would not find in time: reads
// spread over RO siblings (spreadReads), silent corruption caught by the members' checksums on
// read, and a member whose I/O hangs (offline, mode hang) failed after ioTimeout. Real hosts
// (qemu-io, nbdcopy) on the logical IDs; each scenario ends with a byte-for-byte compare of the
// volumes' files against the model.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { requireTools } from './helpers/clients.js';
import { run } from './helpers/servers.js';
import { cli, destaged, fill, hostImage, hostWrite, KiB, member, MiB, qemuIo, query, restart, splitGroup, start, stopAll, svol, uri, volFile, waitFor } from './helpers/svol.js';

afterEach(stopAll);

const SIZE = 8 * MiB;
// The hang tests' ioTimeout (3s): long enough that no request of a healthy volume on the loaded shared
// machine takes it (300 ms did: a restore's first 1 MiB write to a fresh spare), short for a test.

/** qemu-io commands: `n` reads of 64 KiB over the first MiB, each checked against `byte`. */
const badByte = (error: string) => Number(/at byte (\d+)/.exec(error)![1]);

const patternReads = (n: number, byte: number) => Array.from({ length: n }, (_, k) => `read -P ${byte} ${(k % 16) * 64 * KiB} 64k`);

describe('S-VOL groups under faults', () => {
  it('spreads host reads of an RO logical ID over its RO siblings of the same split generation, and never onto a sibling that was resynced', async () => {
    const k = await start({ groupKeys: 'spreadReads: true' });
    const image = await splitGroup(k, SIZE);
    const before = await query(k);
    expect(before.spreadReads).toBe(true);

    const n = 40;
    const r = await qemuIo(uri(k, 2), patternReads(n, 0x11), true);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/error|fail|pattern/i);
    const spread = await query(k);
    const delta = (g: typeof spread, id: number) => member(g, id).reads - member(before, id).reads;
    // The reads of vol2 reached volume 2 and volume 4 (vol40's), taking turns; the RW member's volume none.
    expect(delta(spread, 2) + delta(spread, 40)).toBeGreaterThanOrEqual(n);
    expect(delta(spread, 2)).toBeGreaterThanOrEqual(n / 4);
    expect(delta(spread, 40)).toBeGreaterThanOrEqual(n / 4);
    expect(delta(spread, 3)).toBe(0);

    // vol40 rejoins the P-VOL, which moves on: vol40 no longer holds the split image, so vol2's reads stay home.
    await svol(k, 'resync', 'backup', '--member', '40');
    await hostWrite(k, 1, 0, 1 * MiB, 0x22);
    await waitFor(k, (g) => member(g, 40).state === 'paired' && member(g, 40).changedClusters === 0, 'vol40 copied');
    const paired = await query(k);
    const again = await qemuIo(uri(k, 2), patternReads(n, 0x11), true);
    expect(again.code, again.stderr + again.stdout).toBe(0);
    expect(again.stdout + again.stderr).not.toMatch(/error|fail|pattern/i);
    const after = await query(k);
    expect(member(after, 2).reads - member(paired, 2).reads).toBeGreaterThanOrEqual(n);
    expect(member(after, 40).reads).toBe(member(paired, 40).reads);

    const pvol = fill(SIZE, 0x11);
    pvol.fill(0x22, 0, 1 * MiB);
    expect((await hostImage(k, 2)).equals(image)).toBe(true);
    await k.c.stop();
    for (const v of [2, 3]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
    for (const v of [1, 4]) expect(volFile(k, v).equals(pvol), `vol${v}.img`).toBe(true);
  }, 120_000);

  it('catches corrupt reads of an RO and an RW member by their checksums, serves the host from a sibling, and rebuilds each on a spare, also after a crash and a restart', async () => {
    let k = await start();
    const image = await splitGroup(k, SIZE);
    await hostWrite(k, 3, 1 * MiB, 128 * KiB, 0x33);
    // On volume 3 itself before it is failed below (the compare at the end reads its file).
    await destaged(k);
    const rw = Buffer.from(image);
    rw.fill(0x33, 1 * MiB, 1 * MiB + 128 * KiB);
    const checked = await query(k);
    // Every block of the RO members was written whole (the copy from the P-VOL): all checked.
    expect(member(checked, 40).checkedBlocks).toBe(SIZE / 4096);
    expect(checked.checksumMismatches).toBe(0);

    // A crash: the split images' checksums were saved at the split, and are trusted again.
    k = await restart(k, 'SIGKILL');
    expect(member(await query(k), 40).checkedBlocks).toBe(SIZE / 4096);
    expect((await cli('fault', 'set', '-c', k.file, '1:4', 'corrupt', '--range', '4MiB:128KiB')).code).toBe(0);
    const ro = await hostImage(k, 40);
    expect(ro.equals(image)).toBe(true);
    let g = await waitFor(k, (s) => !s.restore && member(s, 40).state === 'split' && member(s, 40).vol !== 4, 'vol40 rebuilt');
    expect(member(g, 40).vol).toBe(5);
    const replaced = g.members.find((m) => m.vol === 4)!;
    expect(replaced).toMatchObject({ state: 'error', error: expect.stringMatching(/^read: volume 4: checksum mismatch in the 4 KiB block at byte \d+ /) });
    expect(badByte(replaced.error!)).toBeGreaterThanOrEqual(4 * MiB);
    expect(badByte(replaced.error!)).toBeLessThan(4 * MiB + 128 * KiB);
    expect(g.checksumMismatches).toBeGreaterThanOrEqual(1);
    expect(k.c.stderr()).toMatch(/vol40 \(volume 4\) failed on read/);

    // A clean restart keeps them too; now the RW member's reads come back corrupt where it did not write.
    k = await restart(k);
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'corrupt', '--range', '6MiB:64KiB')).code).toBe(0);
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    g = await waitFor(k, (s) => !s.restore && member(s, 3).state === 'split' && member(s, 3).vol !== 3, 'vol3 rebuilt');
    // Tomita claim 1: the RO sibling (volume 2) takes the increments and the RW role; spare 6 its RO role.
    expect(member(g, 3)).toMatchObject({ vol: 2, attr: 'RW', state: 'split' });
    expect(member(g, 2)).toMatchObject({ vol: 6, attr: 'RO', state: 'split' });
    const rwOld = g.members.find((m) => m.vol === 3)!;
    expect(rwOld).toMatchObject({ state: 'error', error: expect.stringContaining('volume 3: checksum mismatch') });
    expect(badByte(rwOld.error!)).toBeGreaterThanOrEqual(6 * MiB);
    expect(badByte(rwOld.error!)).toBeLessThan(6 * MiB + 64 * KiB);
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    expect((await hostImage(k, 40)).equals(image)).toBe(true);
    expect((await hostImage(k, 2)).equals(image)).toBe(true);

    await destaged(k);
    await k.c.stop();
    // The fault flipped bits on the way, not on the disk: the replaced volumes still hold what was written.
    expect(volFile(k, 2).equals(rw)).toBe(true);
    expect(volFile(k, 3).equals(rw)).toBe(true);
    for (const v of [1, 4, 5, 6]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  }, 120_000);

  it('declares a member whose I/O hangs (offline, mode hang) failed after ioTimeout: the host reading an RO member and the host writing the RW member go on, both are rebuilt', async () => {
    const k = await start({ groupKeys: 'ioTimeout: 3s' });
    const image = await splitGroup(k, SIZE);
    expect((await query(k)).ioTimeoutMs).toBe(3000);

    // vol40's volume stops answering: the host's read waits out the timeout, then a sibling serves it.
    expect((await cli('fault', 'set', '-c', k.file, '1:4', 'offline')).code).toBe(0);
    const r = await qemuIo(uri(k, 40), ['read -P 0x11 0 1M'], true);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/error|fail|pattern/i);
    let g = await waitFor(k, (s) => !s.restore && member(s, 40).state === 'split' && member(s, 40).vol === 5, 'vol40 rebuilt');
    expect(g.members.find((m) => m.vol === 4)).toMatchObject({ state: 'error', error: expect.stringContaining('did not complete in 3000 ms (ioTimeout)') });
    expect(g.ioTimeouts).toBeGreaterThanOrEqual(1);

    // The RW member's volume hangs: the member's own write times out, the host's write is kept in the increments.
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'offline')).code).toBe(0);
    await hostWrite(k, 3, 2 * MiB, 64 * KiB, 0x3c);
    const rw = Buffer.from(image);
    rw.fill(0x3c, 2 * MiB, 2 * MiB + 64 * KiB);
    g = await waitFor(k, (s) => !s.restore && member(s, 3).state === 'split' && member(s, 3).vol !== 3, 'vol3 rebuilt');
    // The least-accessed RO sibling took the RW role, the last spare (6) its RO role.
    expect(member(g, 3).attr).toBe('RW');
    expect([member(g, 2).vol, member(g, 3).vol, member(g, 40).vol].sort()).toEqual([2, 5, 6]);
    expect(g.members.find((m) => m.vol === 3)).toMatchObject({ state: 'error', error: expect.stringContaining('(ioTimeout)') });
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    expect((await hostImage(k, 40)).equals(image)).toBe(true);

    // The hung requests are let go: they end on volumes out of service (the member's write lands on
    // volume 3, replaced), and nothing the hosts see changes.
    for (const v of ['1:3', '1:4']) expect((await cli('fault', 'clear', '-c', k.file, v)).code).toBe(0);
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    expect((await query(k)).members.find((m) => m.vol === 3)).toMatchObject({ state: 'error' });
    await destaged(k);
    await k.c.stop();
    const home = member(g, 3).vol;
    for (const v of [home, 3]) expect(volFile(k, v).equals(rw), `vol${v}.img`).toBe(true);
    for (const v of [1, 2, 4, 5, 6].filter((x) => x !== home)) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  }, 120_000);

  it('keeps fio --verify on the RW member and a reader of an RO member free of errors while first the RW member and then the RO member hang and are rebuilt under them', async () => {
    requireTools('fio', 'nbdcopy');
    const k = await start({ incrSize: '9MiB', groupKeys: 'ioTimeout: 3s' });
    const image = await splitGroup(k, SIZE);
    const fio = run(
      'fio',
      [
        '--name=svol', '--ioengine=nbd', `--uri=${uri(k, 3)}`, '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=8M', '--io_size=48M',
        '--rate=,8m', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--output-format=json', `--directory=${path.dirname(k.data)}`,
      ],
      { timeoutMs: 240_000 },
    );
    let fioDone = false;
    void fio.then(() => (fioDone = true));
    let reading = true;
    const reads: boolean[] = [];
    const reader = (async () => {
      while (reading) reads.push((await hostImage(k, 40)).equals(image));
    })();
    let g;
    let r;
    try {
      await waitFor(k, (s) => (member(s, 3).increments?.clusters ?? 0) >= 8, 'fio under way');
      expect((await cli('fault', 'set', '-c', k.file, '1:3', 'offline')).code).toBe(0);
      // The fault lands in the middle of the workload (fio writes at most 8 MiB/s), not after it.
      expect(fioDone).toBe(false);
      g = await waitFor(k, (s) => !s.restore && member(s, 3).vol !== 3 && member(s, 3).state === 'split', 'vol3 rebuilt');
      const ro = member(g, 40).vol;
      expect((await cli('fault', 'set', '-c', k.file, `1:${ro}`, 'offline')).code).toBe(0);
      g = await waitFor(k, (s) => !s.restore && member(s, 40).vol !== ro && member(s, 40).state === 'split', 'vol40 rebuilt');
      expect(g.members.filter((m) => m.logicalId === undefined).map((m) => [m.vol, m.state]).sort()).toEqual([
        [3, 'error'],
        [ro, 'error'],
      ]);
      expect(g.ioTimeouts).toBeGreaterThanOrEqual(2);
      r = await fio;
    } finally {
      reading = false;
      await reader;
      for (const v of ['1:3', '1:4', '1:5']) await cli('fault', 'clear', '-c', k.file, v);
    }
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    expect(job.jobs[0]!.error).toBe(0);
    expect(job.jobs[0]!.write.io_bytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(reads.length).toBeGreaterThan(0);
    expect(reads.every(Boolean)).toBe(true);
    const text = await svol(k, 'query', 'backup');
    expect(text).toMatch(new RegExp(`^vol3 +${member(g, 3).vol} +RW +split +1 `, 'm'));
    expect(text).toMatch(new RegExp(`^vol40 +${member(g, 40).vol} +RO +split +1 `, 'm'));
    // Both hangs timed out at least once (the destage's writes to the hung member can add more).
    const timeouts = /ioTimeout 3000 ms; \d+ checksum mismatches, (\d+) timeouts since start/.exec(text);
    expect(timeouts, text).not.toBeNull();
    expect(Number(timeouts![1])).toBeGreaterThanOrEqual(2);
    const seen = await hostImage(k, 3);
    await destaged(k);
    await k.c.stop();
    expect(volFile(k, member(g, 3).vol).equals(seen)).toBe(true);
    for (const id of [2, 40]) expect(volFile(k, member(g, id).vol).equals(image), `vol${id}`).toBe(true);
  }, 240_000);
});
