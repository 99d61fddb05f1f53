// Real hosts on an RW S-VOL member while its destage (destage.ts) lags far behind: fio writes and
// verifies through NBD, nbdcopy reads the logical ID, and neither ever sees stale bytes. The
// member's volume writes are slowed (a delay fault), so the verify reads meet pending clusters.
// Ends with a byte-for-byte compare of every volume file.
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { requireTools } from './helpers/clients.js';
import { run } from './helpers/servers.js';
import { cli, destaged, hostImage, member, MiB, qemuIo, query, splitGroup, start, stopAll, uri, volFile } from './helpers/svol.js';

afterEach(stopAll);

describe('S-VOL RW member with its destage behind', () => {
  it('keeps fio --verify and nbdcopy on the RW logical ID right while clusters are pending, and the member volume catches up to what the host reads', async () => {
    requireTools('fio', 'nbdcopy');
    const k = await start({ incrSize: '9MiB' });
    const image = await splitGroup(k, 8 * MiB);
    // Each destage run (up to 1 MiB) waits 30 ms on the member's volume.
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'delay', '--ms', '30', '--op', 'write')).code).toBe(0);
    const pending: number[] = [];
    let writing = true;
    const watcher = (async () => {
      while (writing) {
        pending.push(member(await query(k), 3).destagePending ?? -1);
        await new Promise((r) => setTimeout(r, 50));
      }
    })();
    let r;
    try {
      r = await run(
        'fio',
        [
          '--name=svol', '--ioengine=nbd', `--uri=${uri(k, 3)}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--size=8M', '--io_size=16M',
          '--verify=crc32c', '--verify_fatal=1', '--do_verify=1', '--verify_state_save=0', '--output-format=json', `--directory=${path.dirname(k.data)}`,
        ],
        { timeoutMs: 180_000 },
      );
    } finally {
      writing = false;
      await watcher;
    }
    const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] };
    expect(r.code, r.stderr + r.stdout.slice(0, 2000)).toBe(0);
    expect(job.jobs[0]!.error).toBe(0);
    expect(job.jobs[0]!.write.io_bytes).toBeGreaterThanOrEqual(8 * MiB);
    expect(job.jobs[0]!.read.io_bytes).toBeGreaterThan(0);
    // The verify and the status met clusters not on the member's volume yet.
    expect(Math.max(...pending)).toBeGreaterThan(0);
    // Five clusters a gap apart (five destage runs of 1.5 s each), written by qemu-io: nbdcopy reads
    // the logical ID while most of them are still only in the increments.
    await destaged(k);
    const seen = await hostImage(k, 3);
    expect((await cli('fault', 'set', '-c', k.file, '1:3', 'delay', '--ms', '1500', '--op', 'write')).code).toBe(0);
    const at = [0, 2, 4, 6, 8].map((c) => c * 64 * 1024 + 512);
    const w = await qemuIo(uri(k, 3), at.map((o) => `write -P 0x5e ${o} 4k`));
    expect(w.code, w.stderr + w.stdout).toBe(0);
    for (const o of at) seen.fill(0x5e, o, o + 4096);
    expect((await hostImage(k, 3)).equals(seen)).toBe(true);
    expect(member(await query(k), 3).destagePending).toBeGreaterThan(0);
    // The member's own volume is behind meanwhile.
    expect(volFile(k, 3).equals(seen)).toBe(false);
    expect((await cli('fault', 'clear', '-c', k.file, '1:3')).code).toBe(0);
    await destaged(k);
    expect((await hostImage(k, 3)).equals(seen)).toBe(true);
    expect(member(await query(k), 3).state).toBe('split');
    await k.c.stop();
    expect(volFile(k, 3).equals(seen)).toBe(true);
    for (const v of [1, 2, 4]) expect(volFile(k, v).equals(image), `vol${v}.img`).toBe(true);
  }, 240_000);
});
