// S-VOL groups (docs/svol.md) with real clients: `blockmirror up` runs the storage system,
// `blockmirror svol` and `blockmirror fault` drive it, qemu-io and nbdcopy are the hosts, and
// every scenario ends with a byte-for-byte compare of the volumes' files against a model.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { adminFetch } from './helpers/admin.js';
import { requireTools } from './helpers/clients.js';
import { RawInitiator } from './helpers/iscsi-raw.js';
import { openSession, writeAt } from './helpers/raw.js';
import { freePort, run } from './helpers/servers.js';
import { cli, CLUSTER, destaged, fill, hostImage, hostWrite, KiB, member, MiB, qemuIo, query, restart, settled, splitGroup, start, stopAll, svol, uri, volFile, waitFor } from './helpers/svol.js';
import type { SvolGroupStatus } from '../src/controller/svol/status.js';

afterEach(stopAll);

// Each scenario starts a storage system and a dozen CLI and client processes: on the shared, loaded
// machine one takes up to a minute.
describe('S-VOL groups over NBD', { timeout: 120_000 }, () => {
  it('keeps split images point-in-time while the P-VOL changes, logs RW writes in the increments volume, and resyncs only the changed clusters', async () => {
    const k = await start();
    const size = 8 * MiB;
    await hostWrite(k, 1, 0, size, 0x11);
    const init = await svol(k, 'init', 'backup', '--wait');
    expect(init).toMatch(/^backup: paired, P-VOL 1, split generation 0\n/);
    const paired = await query(k);
    expect(paired.members.filter((m) => m.logicalId !== undefined).map((m) => [m.logicalId, m.vol, m.state, m.changedClusters])).toEqual([
      [2, 2, 'paired', 0],
      [3, 3, 'paired', 0],
      [40, 4, 'paired', 0],
    ]);
    // Paired members follow the P-VOL write by write.
    await hostWrite(k, 1, 7 * MiB, 64 * KiB, 0x12);
    const pvol = fill(size, 0x11);
    pvol.fill(0x12, 7 * MiB, 7 * MiB + 64 * KiB);
    expect((await hostImage(k, 40)).equals(pvol)).toBe(true);

    const split = await svol(k, 'split', 'backup');
    expect(split).toMatch(/^backup: split, P-VOL 1, split generation 1 at \d{4}-/);
    const atSplit = Buffer.from(pvol);

    await hostWrite(k, 1, 0, 1 * MiB, 0x22); // 16 clusters on the P-VOL
    pvol.fill(0x22, 0, 1 * MiB);
    await hostWrite(k, 3, 2 * MiB, 64 * KiB, 0x33); // one whole cluster of the RW member
    await hostWrite(k, 3, 5 * MiB + 100, 1000, 0x44); // part of one cluster
    const rw = Buffer.from(atSplit);
    rw.fill(0x33, 2 * MiB, 2 * MiB + 64 * KiB);
    rw.fill(0x44, 5 * MiB + 100, 5 * MiB + 1100);

    expect((await hostImage(k, 2)).equals(atSplit)).toBe(true);
    expect((await hostImage(k, 40)).equals(atSplit)).toBe(true);
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    expect((await hostImage(k, 1)).equals(pvol)).toBe(true);

    const before = await query(k);
    expect(member(before, 3).increments).toMatchObject({ vol: 9, clusters: 2, bytes: 2 * CLUSTER });
    expect(member(before, 3).changedClusters).toBe(18);
    expect(member(before, 2).changedClusters).toBe(16);
    // The increments volume holds the RW member's clusters as they are now, after its map.
    const incr = volFile(k, 9);
    const slots = incr.subarray(incr.length - 63 * CLUSTER);
    expect(slots.subarray(0, CLUSTER).equals(rw.subarray(2 * MiB, 2 * MiB + CLUSTER))).toBe(true);
    expect(slots.subarray(CLUSTER, 2 * CLUSTER).equals(rw.subarray(5 * MiB, 5 * MiB + CLUSTER))).toBe(true);

    await svol(k, 'resync', 'backup', '--wait');
    const after = await waitFor(k, (g) => g.state === 'paired' && settled(g), 'paired and copied');
    // Only what changed on either side since the split was copied.
    expect(member(after, 3).copiedBytes! - member(before, 3).copiedBytes!).toBe(18 * CLUSTER);
    expect(member(after, 2).copiedBytes! - member(before, 2).copiedBytes!).toBe(16 * CLUSTER);
    expect(member(after, 3).increments).toMatchObject({ clusters: 0, bytes: 0 });

    await k.c.stop();
    for (const v of [1, 2, 3, 4]) expect(volFile(k, v).equals(pvol), `vol${v}.img`).toBe(true);
  });

  it('refuses host writes to RO members (qemu-io cannot open them for writing, a raw WRITE gets EPERM) and to a member made RO under a connected host', async () => {
    const k = await start();
    const size = 8 * MiB;
    const image = await splitGroup(k, size);
    // The dashboard's cluster view lists the group, and its page has the table for it.
    const view = (await (await adminFetch(`http://127.0.0.1:${k.admin}/api/cluster`)).json()) as { svolGroups: (SvolGroupStatus & { ss: number })[] };
    expect(view.svolGroups.map((g) => [g.name, g.ss, g.state, g.generation, g.members.length])).toEqual([['backup', 1, 'split', 1, 5]]);
    expect(await (await adminFetch(`http://127.0.0.1:${k.admin}/`)).text()).toContain('id="svol-groups"');

    const q = await qemuIo(uri(k, 2), ['write -P 0x55 0 4k']);
    expect(q.code).not.toBe(0);
    expect(q.stderr + q.stdout).toMatch(/Permission denied|Operation not permitted/);

    const ro = await openSession({ host: '127.0.0.1', port: k.nbd }, { name: 'vol40' });
    await expect(writeAt(ro.client, 0n, Buffer.alloc(4096, 0x55))).rejects.toThrow(/EPERM/);
    ro.client.destroy();

    // A host attached while vol3 was RW: the attribute changes under it, its next write is refused.
    const rw = await openSession({ host: '127.0.0.1', port: k.nbd }, { name: 'vol3' });
    expect(await svol(k, 'attr', 'backup', '3', 'RO')).toMatch(/vol3 +3 +RO +split/);
    await expect(writeAt(rw.client, 0n, Buffer.alloc(4096, 0x55))).rejects.toThrow(/EPERM/);
    rw.client.destroy();

    expect((await hostImage(k, 3)).equals(image)).toBe(true);
    await k.c.stop();
    for (const v of [1, 2, 3, 4]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  });

  it('serves the logical IDs as iSCSI LUNs: an RO member is write protected (DATA PROTECT), an RW member takes writes that NBD reads back', async () => {
    requireTools('qemu-io', 'iscsi-ls');
    const iscsi = await freePort();
    const k = await start({ iscsi });
    const image = await splitGroup(k, 8 * MiB);
    const target = 'iqn.2026-12.org.blockmirror:ss1';
    const ls = await run('iscsi-ls', ['-s', `iscsi://127.0.0.1:${iscsi}`]);
    expect(ls.stdout).toMatch(/Lun:40\s+Type:DIRECT_ACCESS/);
    expect(ls.stdout).not.toMatch(/Lun:5\s/);

    const ini = await RawInitiator.connect(iscsi);
    try {
      await ini.login(target);
      expect(await ini.clearUnitAttentions(40)).toEqual(['6/2900']);
      // WRITE(10) of one block at LBA 0 of the RO member.
      const w = await ini.scsi(40, Buffer.from([0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0]), { dataOut: Buffer.alloc(512, 0x55) });
      expect(w.status).toBe(2);
      expect(w.senseKey).toBe(0x07);
      expect(w.asc).toBe(0x2700);
    } finally {
      ini.sock.destroy();
    }
    const rw = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 64k 128k', '-c', 'flush', `iscsi://127.0.0.1:${iscsi}/${target}/3`]);
    expect(rw.code, rw.stderr).toBe(0);
    const expected = Buffer.from(image);
    expected.fill(0x3c, 64 * KiB, 192 * KiB);
    expect((await hostImage(k, 3)).equals(expected)).toBe(true);
    expect(member(await query(k), 3).increments).toMatchObject({ clusters: 2 });
    await destaged(k);
    await k.c.stop();
    expect(volFile(k, 3).equals(expected)).toBe(true);
    for (const v of [1, 2, 4]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  });

  it('rebuilds a failed RW member on an RO sibling plus its increments (the spare takes the sibling\'s RO role), and an offline RO member on a spare, keeping their logical IDs across a restart', async () => {
    let k = await start();
    const size = 8 * MiB;
    const image = await splitGroup(k, size);
    await hostWrite(k, 3, 1 * MiB, 128 * KiB, 0x33);
    const rw = Buffer.from(image);
    rw.fill(0x33, 1 * MiB, 1 * MiB + 128 * KiB);

    // The RW member's disk fails: the host's next write still succeeds (it is in the increments).
    const set = await cli('fault', 'set', '-c', k.file, '1:3', 'error');
    expect(set.code, set.stderr).toBe(0);
    await hostWrite(k, 3, 3 * MiB, 4 * KiB, 0x44);
    rw.fill(0x44, 3 * MiB, 3 * MiB + 4 * KiB);
    let g = await waitFor(k, (s) => member(s, 3).state === 'split' && member(s, 3).vol !== 3, 'vol3 restored');
    // Tomita claim 1: the least-accessed RO sibling (volume 2) takes the increments and becomes RW
    // vol3; the spare (volume 5) is a copy of it and serves its RO logical ID vol2.
    expect(member(g, 3)).toMatchObject({ logicalId: 3, vol: 2, attr: 'RW', state: 'split', generation: 1 });
    expect(member(g, 2)).toMatchObject({ logicalId: 2, vol: 5, attr: 'RO', state: 'split', generation: 1 });
    expect(g.members.find((m) => m.vol === 3)).toMatchObject({ state: 'error' });
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);

    // An RO member's volume goes offline: the host's read is served by a sibling, and the member is rebuilt on the other spare.
    expect((await cli('fault', 'set', '-c', k.file, '1:4', 'offline', '--mode', 'fail')).code).toBe(0);
    const r = await qemuIo(uri(k, 40), ['read -P 0x11 0 1M'], true);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/error|fail|pattern/i);
    g = await waitFor(k, (s) => member(s, 40).state === 'split' && member(s, 40).vol === 6, 'vol40 restored');
    expect(g.restore).toBeUndefined();
    const text = await svol(k, 'query', 'backup');
    expect(text).toMatch(/^vol2 +5 +RO +split +1 /m);
    expect(text).toMatch(/^vol3 +2 +RW +split +1 /m);
    expect(text).toMatch(/^vol40 +6 +RO +split +1 /m);
    expect(text).toMatch(/^- +3 +spare +error /m);

    // A restart keeps the map, the states, the generation and the increments.
    k = await restart(k);
    const again = await query(k);
    expect(again.generation).toBe(1);
    expect(again.members.filter((m) => m.logicalId !== undefined).map((m) => [m.logicalId, m.vol, m.attr, m.state])).toEqual([
      [2, 5, 'RO', 'split'],
      [3, 2, 'RW', 'split'],
      [40, 6, 'RO', 'split'],
    ]);
    expect(member(again, 3).increments).toMatchObject({ clusters: 3 });
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    expect((await hostImage(k, 40)).equals(image)).toBe(true);
    // The restart destages every changed cluster again; the volume holds them once it is done.
    await destaged(k);
    await k.c.stop();
    expect(volFile(k, 2).equals(rw)).toBe(true);
    for (const v of [1, 5, 6]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  });

  it('keeps fio --verify on the RW member and a reader of an RO member free of errors while the RW member fails and is rebuilt under them', async () => {
    requireTools('fio', 'nbdcopy');
    const k = await start({ incrSize: '9MiB' });
    const image = await splitGroup(k, 8 * MiB);
    const fio = run(
      'fio',
      [
        '--name=svol', '--ioengine=nbd', `--uri=${uri(k, 3)}`, '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=8M', '--io_size=64M',
        '--rate=,16m', '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--output-format=json', `--directory=${path.dirname(k.data)}`,
      ],
      { timeoutMs: 180_000 },
    );
    let fioDone = false;
    void fio.then(() => (fioDone = true));
    let reading = true;
    const reads: boolean[] = [];
    const reader = (async () => {
      while (reading) reads.push((await hostImage(k, 40)).equals(image));
    })();
    await waitFor(k, (g) => (member(g, 3).increments?.clusters ?? 0) >= 8, 'fio under way');
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'error')).code).toBe(0);
    // The fault lands in the middle of the workload (fio writes at most 16 MiB/s), not after it.
    expect(fioDone).toBe(false);
    let r;
    try {
      const g = await waitFor(k, (s) => member(s, 3).vol !== 3 && member(s, 3).state === 'split', 'vol3 rebuilt');
      expect(g.members.find((m) => m.vol === 3)).toMatchObject({ state: 'error' });
      r = await fio;
    } finally {
      reading = false;
      await reader;
    }
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number } }[] };
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    expect(job.jobs[0]!.error).toBe(0);
    expect(job.jobs[0]!.write.io_bytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(reads.length).toBeGreaterThan(0);
    expect(reads.every(Boolean)).toBe(true);
    // What the host reads of vol3 is on its new volume, byte for byte; the RO images never moved.
    const seen = await hostImage(k, 3);
    const map = await destaged(k);
    await k.c.stop();
    expect(volFile(k, member(map, 3).vol).equals(seen)).toBe(true);
    for (const id of [2, 40]) expect(volFile(k, member(map, id).vol).equals(image), `vol${id}`).toBe(true);
    // Every RO volume still holds the split image, and the RW one only differs where fio wrote.
    expect(new Set([member(map, 2).vol, member(map, 3).vol, member(map, 40).vol]).size).toBe(3);
  });

  it('finds silent corruption of an RO member with svol verify and restores it from a sibling onto a spare; the host then reads the right bytes', async () => {
    const k = await start();
    const image = await splitGroup(k, 8 * MiB);
    await hostWrite(k, 1, 0, 2 * MiB, 0x22); // the P-VOL moves on: those clusters are not compared
    const clean = await cli('svol', 'verify', 'backup', '-c', k.file);
    expect(clean.code, clean.stderr).toBe(0);
    expect(clean.stdout).toMatch(/verify at .*: 384 clusters checked; no data errors/);

    expect((await cli('fault', 'set', '-c', k.file, '1:4', 'corrupt', '--range', '4MiB:128KiB')).code).toBe(0);
    const found = await cli('svol', 'verify', 'backup', '-c', k.file, '--wait');
    expect(found.code).toBe(1);
    expect(found.stdout).toContain('vol40: 2 clusters differ (first 64, 65)');
    const g = await waitFor(k, (s) => !s.restore && member(s, 40).state === 'split', 'vol40 restored');
    expect(member(g, 40).vol).toBe(5);
    expect(g.members.find((m) => m.vol === 4)).toMatchObject({ state: 'error', error: expect.stringContaining('data error: 2 clusters differ') });
    expect((await hostImage(k, 40)).equals(image)).toBe(true);
    await k.c.stop();
    expect(volFile(k, 5).equals(image)).toBe(true);
    expect(volFile(k, 2).equals(image)).toBe(true);
  });

  it('answers bad commands with one line and a non-zero exit, and bad API requests with 400, 404 or 409', async () => {
    const k = await start();
    const oneLine = (r: { code: number | null; stderr: string }, code: number, text: string) => {
      expect(r.code).toBe(code);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toContain(text);
    };
    oneLine(await cli('svol'), 2, 'svol: missing command (init, split, resync, restore, attr, verify, query)');
    oneLine(await cli('svol', 'split', 'nosuch', '-c', k.file), 2, 'unknown S-VOL group "nosuch"');
    oneLine(await cli('svol', 'attr', 'backup', '3', 'rw', '-c', k.file), 2, 'svol attr: unknown attribute "rw" (expected RO, RW or spare)');
    oneLine(await cli('svol', 'restore', 'backup', 'three', '-c', k.file), 2, 'invalid member "three"');
    oneLine(await cli('svol', 'split', 'backup', '-c', k.file), 1, 'the group is not initialized; run svol init first');
    oneLine(await cli('svol', 'resync', 'backup', '--member', '99', '-c', k.file), 1, 'the group is simplex, not split');
    await svol(k, 'init', 'backup', '--wait');
    await svol(k, 'split', 'backup');
    oneLine(await cli('svol', 'restore', 'backup', '99', '-c', k.file), 1, 'group backup has no logical ID 99 (its logical IDs: 2, 3, 40)');
    oneLine(await cli('svol', 'attr', 'backup', '3', 'spare', '-c', k.file), 1, 'volume 3 serves vol3 to hosts');
    const help = await cli('svol', 'split', '--help');
    expect(help.stdout).toContain('Example:\n  blockmirror svol split backup -c cluster.yaml');

    const api = (p: string, init?: RequestInit) => adminFetch(`http://127.0.0.1:${k.admin}${p}`, init);
    const post = (p: string, body: string) => api(p, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
    let res = await api('/api/svol/nosuch');
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({ error: 'no S-VOL group named nosuch in storage system 1 (it has backup)' });
    res = await post('/api/svol/backup/attr', '{"member": 3, "attr": "bogus"}');
    expect(res.status).toBe(400);
    expect(((await res.json()) as { error: string }).error).toMatch(/^attr backup: attr: /);
    res = await post('/api/svol/backup/restore', '{"member": "3; rm -rf /"}');
    expect(res.status).toBe(400);
    res = await post('/api/svol/backup/restore', '{"member": 3, "extra": 1}');
    expect(res.status).toBe(400);
    res = await post('/api/svol/backup/split', '{');
    expect(res.status).toBe(400);
    res = await post('/api/svol/backup/split', '{}');
    expect(res.status).toBe(409);
    expect(await res.json()).toEqual({ error: 'split backup: already split at generation 1; resync first' });
    res = await api('/api/svol/backup/split');
    expect(res.status).toBe(405);
    // Nothing the bad requests did changed the group.
    const g = await query(k);
    expect([g.state, g.generation, g.members.map((m) => [m.logicalId, m.vol, m.attr, m.state])]).toEqual([
      'split',
      1,
      [
        [2, 2, 'RO', 'split'],
        [3, 3, 'RW', 'split'],
        [40, 4, 'RO', 'split'],
        [undefined, 5, 'spare', 'spare'],
        [undefined, 6, 'spare', 'spare'],
      ],
    ]);
    await k.c.stop();
    const zero = fill(8 * MiB, 0);
    for (const v of [1, 2, 3, 4]) expect(volFile(k, v).equals(zero), `vol${v}.img`).toBe(true);
  });

  it('refuses to rebuild an RW member when no RO sibling shares its split generation', async () => {
    const k = await start({
      group: `
    svolGroups:
      - name: backup
        pvol: 1
        members:
          - { vol: 2, attr: RO }
          - { vol: 3, attr: RW, increments: 9 }
          - { vol: 5, attr: spare }`,
    });
    const image = await splitGroup(k, 8 * MiB);
    await hostWrite(k, 3, 0, 64 * KiB, 0x33);
    // The only RO sibling goes back to the P-VOL: it no longer holds generation 1.
    await svol(k, 'resync', 'backup', '--member', '2');
    await waitFor(k, (g) => member(g, 2).state === 'paired' && member(g, 2).changedClusters === 0, 'vol2 copied');
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'error')).code).toBe(0);
    // Nothing can serve vol3 now: its read fails with EIO rather than mixing split times.
    const r = await qemuIo(uri(k, 3), ['read 0 64k'], true);
    expect(r.stdout + r.stderr).toMatch(/Input\/output error/);
    const g = await waitFor(k, (s) => member(s, 3).state === 'error', 'vol3 in error');
    expect(member(g, 3).error).toBe('no RO sibling of split generation 1 to rebuild from (siblings split at another time are not interchangeable)');
    const restore = await cli('svol', 'restore', 'backup', '3', '-c', k.file);
    expect(restore.code).toBe(1);
    expect(restore.stderr.trim().split('\n')).toHaveLength(1);
    expect(restore.stderr).toContain('no RO sibling of split generation 1');
    // The spare was not touched, and the P-VOL and the resynced sibling still match.
    await k.c.stop();
    expect(volFile(k, 5).equals(fill(8 * MiB, 0))).toBe(true);
    for (const v of [1, 2]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  });

  it('fails writes with ENOSPC and one log line once the increments volume is full, and keeps every write before it', async () => {
    // 64 KiB of header and map, then two slots.
    const k = await start({ incrSize: '192KiB' });
    const image = await splitGroup(k, 8 * MiB);
    await hostWrite(k, 3, 0, 4 * KiB, 0x31);
    await hostWrite(k, 3, 1 * MiB, 4 * KiB, 0x32);
    await hostWrite(k, 3, 100, 100, 0x33); // a cluster already logged: no new slot
    const full = await qemuIo(uri(k, 3), ['write -P 0x34 2M 4k']);
    expect(full.stdout + full.stderr).toMatch(/No space left on device/);
    const again = await qemuIo(uri(k, 3), ['write -P 0x35 3M 4k']);
    expect(again.stdout + again.stderr).toMatch(/No space left on device/);
    const rw = Buffer.from(image);
    rw.fill(0x31, 0, 4 * KiB);
    rw.fill(0x33, 100, 200);
    rw.fill(0x32, 1 * MiB, 1 * MiB + 4 * KiB);
    expect((await hostImage(k, 3)).equals(rw)).toBe(true);
    const lines = k.c.stderr().split('\n').filter((l) => l.includes('is full'));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toContain('vol9 (increments of logical vol3 in group backup) is full (2 clusters changed since the split): writes fail with ENOSPC until a resync');
    const g = await query(k);
    expect(member(g, 3).increments).toMatchObject({ clusters: 2, bytes: 2 * CLUSTER, capacity: 2 * CLUSTER });
    await destaged(k);
    await k.c.stop();
    expect(volFile(k, 3).equals(rw)).toBe(true);
    expect(volFile(k, 2).equals(image)).toBe(true);
  });

  it('resumes a restore cut by a crash where it was recorded, and ends with the right bytes', async () => {
    let k = await start({ size: '64MiB' });
    const image = await splitGroup(k, 64 * MiB);
    // A slow spare, so that the crash lands in the middle of the copy (4 runs of 1 MiB in flight: 64 MiB in 1.6 s).
    expect((await cli('fault', 'set', '-c', k.file, '1:5', 'delay', '--ms', '100', '--op', 'write')).code).toBe(0);
    expect((await cli('fault', 'set', '-c', k.file, '1:2', 'error', '--op', 'read')).code).toBe(0);
    const r = await qemuIo(uri(k, 2), ['read -P 0x11 0 64k'], true);
    expect(r.code, r.stderr + r.stdout).toBe(0);
    // Past a checkpoint (16 MiB, flushed and recorded), with runs copied since that no checkpoint covers yet.
    const cut = await waitFor(k, (g) => (g.restore?.checkpointClusters ?? 0) >= 256 && g.restore!.copiedClusters > g.restore!.checkpointClusters, 'past the first checkpoint of the restore');
    k = await restart(k, 'SIGKILL');
    const resumed = k.c
      .stderr()
      .split('\n')
      .find((l) => l.includes('resuming the restore'));
    expect(resumed).toBeDefined();
    const at = Number(/at cluster (\d+) of 1024/.exec(resumed!)![1]);
    // Resumed at a checkpoint: the one seen before the crash, or a later one recorded before the kill.
    expect(at).toBeGreaterThanOrEqual(cut.restore!.checkpointClusters);
    expect(at).toBeLessThan(1024);
    const g = await waitFor(k, (s) => !s.restore && member(s, 2).state === 'split', 'vol2 restored');
    expect(member(g, 2).vol).toBe(5);
    expect((await hostImage(k, 2)).equals(image)).toBe(true);
    await k.c.stop();
    for (const v of [1, 4, 5]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  });
});
