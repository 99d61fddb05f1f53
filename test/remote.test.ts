// Pairs across storage systems, each storage system in its own process on
// loopback: replication over the control channel and NBD, never-stale mirror
// reads, peer failures and fence levels, resync, swap, takeover and verify.
// Every scenario ends by comparing the two volume files byte for byte.
import fs from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { CLI, PYTHON, run } from './helpers/servers.js';
import { SSProcess, inSync, loopbackAddrs, qemuIo, sameBytes, twoSSYaml, writeConfig, type PairSpec } from './helpers/remote.js';

const started: SSProcess[] = [];
afterEach(async () => {
  await Promise.all(started.splice(0).map((s) => s.kill()));
});

async function cluster(pairs: PairSpec[]) {
  const [a, b] = await loopbackAddrs();
  const { dir, file } = writeConfig(twoSSYaml(a, b, pairs));
  const ss1 = new SSProcess(1, file, a);
  const ss2 = new SSProcess(2, file, b);
  started.push(ss1, ss2);
  await Promise.all([ss1.start(), ss2.start()]);
  for (const p of pairs) await ss1.waitPair(p.name, inSync, 'in sync');
  return { dir, file, ss1, ss2 };
}

const pairCmd = (file: string, cmd: string, name: string) => run(process.execPath, [CLI, 'pair', cmd, name, '-c', file]);

describe('pairs across storage systems', () => {
  it('async: the remote mirror never returns stale data, and ends identical', async () => {
    // 256 KiB/s: 16 s for the 4 MiB, so most of it is still Invalid on the mirror when it is read.
    const { dir, ss1, ss2 } = await cluster([{ name: 'pa', mode: 'async', vol: 1, syncRate: '256KiB' }]);
    const w = await qemuIo(ss1.uri(1), ['write -P 0x5a 0 4M']);
    expect(w.code, w.stderr).toBe(0);
    // Most of the 4 MiB is still Invalid on the mirror, so its storage system must read those
    // clusters from the master.
    const master = await ss1.pair('pa');
    expect(master!.mirrors[0]!.invalidClusters).toBeGreaterThan(16);
    const mirrorView = await ss2.pair('pa');
    expect(mirrorView).toMatchObject({ role: 'mirror', stale: false });
    expect(mirrorView!.mirrors[0]!.invalidClusters).toBeGreaterThan(0);
    const r = await qemuIo(ss2.uri(1), ['read -P 0x5a 0 4M'], true);
    expect(r.stdout).not.toMatch(/verification failed/);
    expect(r.code, r.stdout).toBe(0);
    await ss1.waitPair('pa', inSync, 'in sync', 60_000);
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
  });

  it('sync: fio with verify on the master; the mirror holds every acknowledged write', async () => {
    const { dir, ss1, ss2 } = await cluster([{ name: 'ps', mode: 'sync', vol: 2 }]);
    const f = await run('fio', [
      '--name=v', '--ioengine=nbd', `--uri=${ss1.uri(2)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=8M',
      '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse',
    ], { timeoutMs: 60_000 });
    expect(f.code, f.stderr).toBe(0);
    const p = await ss1.pair('ps');
    expect(p).toMatchObject({ state: 'PAIR', role: 'master' });
    // Nothing left to copy: the mirror got every write synchronously.
    expect(p!.mirrors[0]).toMatchObject({ invalidClusters: 0, connected: true });
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);
    const st = await ss2.status();
    expect(st!.storageSystems[0]!.peers).toEqual([{ ss: 1, connected: true }]);
  });

  it('a mirror export takes no host writes, and the replication export is hidden and refuses a wrong token', async () => {
    const { ss2 } = await cluster([{ name: 'pa', mode: 'async', vol: 1 }]);
    const w = await qemuIo(ss2.uri(1), ['write -P 1 0 4k']);
    expect(w.code).not.toBe(0);
    const list = await run('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${ss2.addr.nbd}`]);
    const names = (JSON.parse(list.stdout) as { exports: { 'export-name': string }[] }).exports.map((e) => e['export-name']);
    expect(names).toEqual(['vol1']);
    const guess = await qemuIo(`nbd://127.0.0.1:${ss2.addr.nbd}/.replication%2Fvol1%2F00000000000000000000000000000000`, ['write -P 1 0 4k']);
    expect(guess.code).not.toBe(0);
  });

  it('kill -9 of the mirror during writes: the master suspends the pair and goes on, then resyncs only what changed', async () => {
    const { dir, ss1, ss2 } = await cluster([
      { name: 'ps', mode: 'sync', vol: 2 },
      { name: 'pa', mode: 'async', vol: 1 },
    ]);
    const fio = run('fio', [
      '--name=w', '--ioengine=nbd', `--uri=${ss1.uri(2)}`, '--rw=randwrite', '--bs=4k', '--iodepth=8', '--size=4M',
      '--time_based', '--runtime=3', '--output-format=json',
    ], { timeoutMs: 60_000 });
    await new Promise((r) => setTimeout(r, 800));
    await ss2.kill();
    const res = await fio;
    expect(res.code, res.stderr).toBe(0);
    // fio went on after the kill (how long one write waited is measured in bench/, not asserted here).
    // fio's nbd engine prints "fio: connected to NBD server" before the JSON.
    const job = (JSON.parse(res.stdout.slice(res.stdout.indexOf('{'))) as { jobs: { error: number; write: { total_ios: number } }[] }).jobs[0]!;
    expect(job.error).toBe(0);
    expect(job.write.total_ios).toBeGreaterThan(0);
    const down = await ss1.waitPair('ps', (p) => p.state === 'PSUE', 'PSUE');
    expect(down.error).toMatch(/storage system 2/);
    expect(down.mirrors[0]!.invalidClusters).toBeGreaterThan(0);
    // Tracked: only the 4 MiB (64 clusters) fio writes, not the whole 16 MiB volume.
    expect(down.mirrors[0]!.invalidClusters).toBeLessThanOrEqual(64);
    // Writes while the mirror is gone are acknowledged (fence never) and tracked.
    expect((await qemuIo(ss1.uri(1), ['write -P 0x77 8M 1M'])).code).toBe(0);
    await ss2.start();
    await ss1.waitPair('ps', inSync, 'in sync again');
    await ss1.waitPair('pa', inSync, 'in sync again');
    expect(await sameBytes(ss1.volumeFile(dir, 2), ss2.volumeFile(dir, 2))).toBe(true);
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
  });

  it('kill -9 of the master mid-writes: every write it acknowledged is on the surviving sync mirror', async () => {
    const { ss1, ss2 } = await cluster([{ name: 'ps', mode: 'sync', vol: 2 }]);
    // Sequential 4 KiB writes, each block tagged with its number; a line per acknowledged write.
    const writer = run(PYTHON, ['-c', `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for i in range(4096):
    h.pwrite(i.to_bytes(4, 'little') * 1024, i * 4096)
    print(i, flush=True)
`, ss1.uri(2)], { timeoutMs: 30_000 });
    await new Promise((r) => setTimeout(r, 400));
    await ss1.kill();
    const acked = (await writer).stdout.trim().split('\n').filter((l) => l !== '').map(Number);
    expect(acked.length).toBeGreaterThan(10);
    expect(acked.length).toBeLessThan(4096); // the kill came mid-way
    // The mirror's storage system, alone now, serves its own data (and says it may be stale).
    await ss2.waitPair('ps', (p) => p.stale === true, 'stale');
    const check = await run(PYTHON, ['-c', `
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n = int(sys.argv[2])
data = h.pread(n * 4096, 0)
bad = [i for i in range(n) if data[i * 4096:(i + 1) * 4096] != i.to_bytes(4, 'little') * 1024]
print(len(bad), bad[:5])
`, ss2.uri(2), String(acked.length)]);
    expect(check.stdout.trim(), check.stderr).toBe('0 []');
  });

  it('fence: data refuses writes with EIO while the mirror is unreachable, and takes them again after the resync', async () => {
    const { dir, ss1, ss2 } = await cluster([{ name: 'pf', mode: 'sync', vol: 3, fence: 'data' }]);
    expect((await qemuIo(ss1.uri(3), ['write -P 1 0 64k'])).code).toBe(0);
    await ss2.kill();
    await ss1.waitPair('pf', (p) => p.state === 'PSUE', 'PSUE');
    const refused = await qemuIo(ss1.uri(3), ['write -P 2 0 64k']);
    expect(refused.stdout + refused.stderr).toMatch(/Input\/output error/);
    // Reads go on.
    expect((await qemuIo(ss1.uri(3), ['read -P 1 0 64k'], true)).code).toBe(0);
    await ss2.start();
    await ss1.waitPair('pf', inSync, 'in sync again');
    expect((await qemuIo(ss1.uri(3), ['write -P 3 0 64k'])).code).toBe(0);
    expect(await sameBytes(ss1.volumeFile(dir, 3), ss2.volumeFile(dir, 3))).toBe(true);
  });

  it('autoResync: false leaves the pair suspended until `pair resync`', async () => {
    const { dir, file, ss1, ss2 } = await cluster([{ name: 'pm', mode: 'async', vol: 4, autoResync: false }]);
    await ss2.kill();
    await ss1.waitPair('pm', (p) => p.state === 'PSUE', 'PSUE');
    expect((await qemuIo(ss1.uri(4), ['write -P 9 0 1M'])).code).toBe(0);
    await ss2.start();
    await ss1.waitPair('pm', (p) => p.mirrors[0]!.connected === true, 'a session');
    expect((await ss1.pair('pm'))!.state).toBe('PSUE');
    const r = await pairCmd(file, 'resync', 'pm');
    expect(r.code, r.stderr).toBe(0);
    await ss1.waitPair('pm', inSync, 'in sync');
    expect(await sameBytes(ss1.volumeFile(dir, 4), ss2.volumeFile(dir, 4))).toBe(true);
  });

  it('swap: the mirror becomes master with every write; the old master turns read-only and follows', async () => {
    const { dir, file, ss1, ss2 } = await cluster([{ name: 'pa', mode: 'async', vol: 1, syncRate: '2MiB' }]);
    expect((await qemuIo(ss1.uri(1), ['write -P 0x31 0 2M'])).code).toBe(0);
    const r = await pairCmd(file, 'swap', 'pa');
    expect(r.code, r.stderr).toBe(0);
    const now = await ss2.waitPair('pa', (p) => p.role === 'master', 'the master role');
    expect(now.epoch).toBe(2);
    expect(now.master).toEqual({ ss: 2, vol: 1 });
    // Every write acknowledged before the swap is on the new master.
    expect((await qemuIo(ss2.uri(1), ['read -P 0x31 0 2M'], true)).code).toBe(0);
    expect((await qemuIo(ss1.uri(1), ['write -P 1 0 4k'])).code).not.toBe(0);
    expect((await qemuIo(ss2.uri(1), ['write -P 0x32 4M 1M'])).code).toBe(0);
    expect((await qemuIo(ss1.uri(1), ['read -P 0x32 4M 1M'], true)).code).toBe(0);
    await ss2.waitPair('pa', inSync, 'in sync');
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
    // The CLI finds the new master by itself.
    const split = await pairCmd(file, 'split', 'pa');
    expect(split.stdout.trim()).toBe('pa: PSUS');
    expect((await ss2.pair('pa'))!.state).toBe('PSUS');
  });

  it('takeover: the old master comes back as a mirror and never overwrites the new master', async () => {
    const { dir, file, ss1, ss2 } = await cluster([{ name: 'pa', mode: 'async', vol: 1, syncRate: '1MiB' }]);
    // Refused while the master is reachable.
    const early = await pairCmd(file, 'takeover', 'pa');
    expect(early.code).toBe(1);
    expect(early.stderr).toMatch(/reachable; use swap/);
    // An async write the mirror does not have yet, then the master dies.
    expect((await qemuIo(ss1.uri(1), ['write -P 0xaa 0 2M'])).code).toBe(0);
    await ss1.kill();
    await ss2.waitPair('pa', (p) => p.stale === true, 'stale');
    const t = await pairCmd(file, 'takeover', 'pa');
    expect(t.code, t.stderr).toBe(0);
    const promoted = await ss2.waitPair('pa', (p) => p.role === 'master', 'the master role');
    expect(promoted.epoch).toBe(2);
    expect((await qemuIo(ss2.uri(1), ['write -P 0xbb 4M 1M'])).code).toBe(0);
    const before = Buffer.alloc(6 * 1024 * 1024);
    await ss1.start();
    const back = await ss1.waitPair('pa', (p) => p.role === 'mirror' && p.epoch === 2, 'the mirror role');
    expect(back.master).toEqual({ ss: 2, vol: 1 });
    await ss2.waitPair('pa', inSync, 'in sync', 40_000);
    // Both copies now hold what the new master holds.
    const fd = fs.openSync(ss2.volumeFile(dir, 1), 'r');
    fs.readSync(fd, before, 0, before.length, 0);
    fs.closeSync(fd);
    expect(before.subarray(4 * 1024 * 1024, 5 * 1024 * 1024).every((b) => b === 0xbb)).toBe(true);
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
    expect((await qemuIo(ss1.uri(1), ['write -P 1 0 4k'])).code).not.toBe(0);
  });

  it('verify compares by checksum, marks and reports differences, and the daemon repairs them', async () => {
    const { dir, file, ss1, ss2 } = await cluster([{ name: 'pa', mode: 'async', vol: 1 }]);
    expect((await qemuIo(ss1.uri(1), ['write -P 0x42 0 2M'])).code).toBe(0);
    await ss1.waitPair('pa', inSync, 'in sync');
    const clean = await pairCmd(file, 'verify', 'pa');
    expect(clean.code, clean.stderr).toBe(0);
    expect(clean.stdout).toMatch(/verified 256 clusters: the mirrors match the master/);
    await ss2.kill();
    const fd = fs.openSync(ss2.volumeFile(dir, 1), 'r+');
    fs.writeSync(fd, Buffer.from('silent corruption'), 0, 17, 5 * 65536 + 100);
    fs.closeSync(fd);
    await ss2.start();
    await ss1.waitPair('pa', inSync, 'in sync again');
    const found = await pairCmd(file, 'verify', 'pa');
    expect(found.code).toBe(1);
    expect(found.stdout).toMatch(/1 differ and are marked Invalid \(clusters 5\)/);
    await ss1.waitPair('pa', inSync, 'repaired');
    expect(await sameBytes(ss1.volumeFile(dir, 1), ss2.volumeFile(dir, 1))).toBe(true);
  });

  it('refuses bad commands with one clear line', async () => {
    const { file } = await cluster([{ name: 'pa', mode: 'async', vol: 1 }]);
    const unknown = await pairCmd(file, 'swap', 'nope');
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim().split('\n')).toHaveLength(1);
    const badCmd = await run(process.execPath, [CLI, 'pair', 'promote', 'pa']);
    expect(badCmd.code).toBe(2);
    expect(badCmd.stderr).toMatch(/unknown command "promote"/);
  });
});

describe('configuration of pairs across storage systems', () => {
  it('requires a peer address on both storage systems', async () => {
    const [a, b] = await loopbackAddrs();
    const text = twoSSYaml(a, b, [{ name: 'pa', mode: 'async', vol: 1 }]).replace(/\n {4}peer: .*/g, '');
    const { file } = writeConfig(text);
    const r = await run(process.execPath, [CLI, 'up', '-c', file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/storageSystems\[0\]\.peer: missing required key: pair "pa" spans storage systems 1 and 2/);
  });

  it('refuses fence: data on an async pair, and a bad peerTimeout', async () => {
    const [a, b] = await loopbackAddrs();
    const fence = writeConfig(twoSSYaml(a, b, [{ name: 'pa', mode: 'async', vol: 1, fence: 'data' }]));
    const r = await run(process.execPath, [CLI, 'up', '-c', fence.file]);
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/pairs\[0\]\.fence: fence: data applies to sync pairs/);
    for (const bad of ['5 minutes', '50ms', '20m']) {
      const t = writeConfig(twoSSYaml(a, b, [{ name: 'pa', mode: 'async', vol: 1 }], { peerTimeout: bad }));
      const r2 = await run(process.execPath, [CLI, 'up', '-c', t.file]);
      expect(r2.code).toBe(2);
      expect(r2.stderr).toMatch(/peerTimeout: /);
      expect(r2.stderr.trim().split('\n')).toHaveLength(1);
    }
  });
});
