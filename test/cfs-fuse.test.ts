// `blockmirror cfs mount`: ordinary tools on the mounted CFS (cp, cmp, cat, ls, mv, rm, dd, fio),
// what they write seen by other clients, and a clean unmount on SIGTERM and SIGINT.
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { isMounted, mountCfs, pattern, startCfsCluster, type CfsCluster, type Proc } from './helpers/cfs.js';
import { run } from './helpers/servers.js';

const MiB = 1024 * 1024;
const cleanup: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  // Last registered, first undone: a mount goes before the cluster under it.
  for (const f of cleanup.splice(0).reverse()) await f().catch(() => {});
});

async function mounted(): Promise<{ c: CfsCluster; mnt: string; mount: Proc }> {
  const c = await startCfsCluster();
  cleanup.push(() => c.stop());
  const mnt = path.join(c.dir, 'mnt');
  const mount = await mountCfs(c.config, mnt);
  // Unmount even if the test failed half-way, so no stale mount is left behind.
  cleanup.push(async () => {
    await mount.kill('SIGTERM');
    if (isMounted(mnt)) await run('fusermount', ['-uz', mnt]);
  });
  return { c, mnt, mount };
}

async function sh(script: string, cwd: string) {
  const r = await run('sh', ['-ec', script], { cwd, timeoutMs: 120_000 });
  expect(r.code, `${script}\n${r.stderr}${r.stdout}`).toBe(0);
  return r.stdout;
}

describe('cfs mount', () => {
  it('works with cp, cmp, cat, ls, mv, rm, append, overwrite in place and dd', async () => {
    const { c, mnt } = await mounted();
    const data = pattern('cp', 9 * MiB + 777);
    fs.writeFileSync(path.join(c.dir, 'src.bin'), data);

    // cp in and out, cmp both ways.
    await sh(`cp src.bin mnt/a.bin && cmp src.bin mnt/a.bin && cp mnt/a.bin back.bin && cmp src.bin back.bin`, c.dir);
    expect(fs.statSync(path.join(mnt, 'a.bin')).size).toBe(data.length);
    // Another client sees the file once cp closed it (close-to-open).
    const got = path.join(c.dir, 'got.bin');
    expect((await c.cli(['get', '/a.bin', got])).code).toBe(0);
    expect(fs.readFileSync(got).equals(data)).toBe(true);

    // Append with the shell, twice; cat reads it back.
    await sh(`printf 'one\\n' > mnt/log.txt && printf 'two\\n' >> mnt/log.txt && printf 'three\\n' >> mnt/log.txt`, c.dir);
    expect(await sh('cat mnt/log.txt', c.dir)).toBe('one\ntwo\nthree\n');
    expect(fs.readFileSync(path.join(mnt, 'log.txt'), 'utf8')).toBe('one\ntwo\nthree\n');

    // Overwrite in place: 3 x 4 KiB at an odd offset, inside the file, without truncating it.
    await sh(`dd if=/dev/zero of=mnt/a.bin bs=4096 seek=100 count=3 conv=notrunc status=none`, c.dir);
    const expected = Buffer.from(data);
    expected.fill(0, 100 * 4096, 103 * 4096);
    expect(fs.readFileSync(path.join(mnt, 'a.bin')).equals(expected)).toBe(true);
    expect((await c.cli(['get', '/a.bin', got])).code).toBe(0);
    expect(fs.readFileSync(got).equals(expected)).toBe(true);

    // A file put by another client shows up in the mount.
    expect((await c.cli(['put', '-', '/from-cli.txt'], { input: 'hi from the CLI\n' })).code).toBe(0);
    expect(await sh('cat mnt/from-cli.txt', c.dir)).toBe('hi from the CLI\n');

    // Directories, rename, remove.
    await sh(`mkdir mnt/dir && mv mnt/a.bin mnt/dir/b.bin && mv mnt/log.txt mnt/dir/`, c.dir);
    expect((await sh('ls mnt', c.dir)).split('\n').filter(Boolean)).toEqual(['dir', 'from-cli.txt']);
    expect((await sh('ls mnt/dir', c.dir)).split('\n').filter(Boolean)).toEqual(['b.bin', 'log.txt']);
    const long = await sh('ls -l mnt/dir', c.dir);
    expect(long).toMatch(new RegExp(`-rw-r--r-- +1 +\\S+ +\\S+ +${data.length} .* b\\.bin`));
    await sh(`rm mnt/dir/b.bin && rm mnt/from-cli.txt`, c.dir);
    expect(fs.readdirSync(path.join(mnt, 'dir'))).toEqual(['log.txt']);
    const rmdir = await run('rmdir', [path.join(mnt, 'dir')]);
    expect(rmdir.code).not.toBe(0);
    expect(rmdir.stderr).toMatch(/Directory not empty/);
    await sh(`rm -r mnt/dir`, c.dir);
    expect(fs.readdirSync(mnt)).toEqual([]);
    expect(fs.existsSync(path.join(mnt, 'nope'))).toBe(false);

    // dd: a stream written and read back.
    await sh(`dd if=src.bin of=mnt/dd.bin bs=1M status=none && dd if=mnt/dd.bin of=dd.out bs=256k status=none && cmp src.bin dd.out`, c.dir);
    // df sees the pair's space.
    expect(await sh('df -B1 mnt | tail -1', c.dir)).toMatch(new RegExp(`blockmirror-cfs +${128 * MiB} `));

    const client = await c.client();
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
  });

  it('runs fio with verify on a file in the mount', async () => {
    const { c, mnt } = await mounted();
    const common = ['--ioengine=psync', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1', '--verify_state_save=0', '--output-format=terse'];
    const rand = await run('fio', ['--name=rand', `--filename=${path.join(mnt, 'fio.dat')}`, '--rw=randwrite', '--bs=4k', '--size=8M', ...common], { timeoutMs: 120_000 });
    expect(rand.code, rand.stderr + rand.stdout).toBe(0);
    const seq = await run('fio', ['--name=seq', `--filename=${path.join(mnt, 'seq.dat')}`, '--rw=write', '--bs=1M', '--size=16M', ...common], { timeoutMs: 120_000 });
    expect(seq.code, seq.stderr + seq.stdout).toBe(0);
    const rw = await run('fio', ['--name=rw', `--filename=${path.join(mnt, 'fio.dat')}`, '--rw=randrw', '--bs=16k', '--size=8M', '--verify=crc32c', '--verify_state_save=0', '--ioengine=psync', '--output-format=terse', '--numjobs=2', '--runtime=2', '--time_based', '--group_reporting'], { timeoutMs: 120_000 });
    expect(rw.code, rw.stderr + rw.stdout).toBe(0);
    expect(fs.statSync(path.join(mnt, 'fio.dat')).size).toBe(8 * MiB);
    const client = await c.client();
    expect(await client.check()).toEqual({ consistent: true, problems: [] });
  });

  it('commits what is open and unmounts cleanly on SIGTERM and on SIGINT', async () => {
    const { c, mnt, mount } = await mounted();
    await sh(`printf 'kept\\n' > mnt/kept.txt`, c.dir);
    expect(await mount.kill('SIGTERM')).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    expect(mount.stderr()).not.toMatch(/"level":[56]0/); // no error or fatal log lines

    const again = await mountCfs(c.config, mnt);
    cleanup.push(() => again.kill('SIGKILL'));
    expect(fs.readFileSync(path.join(mnt, 'kept.txt'), 'utf8')).toBe('kept\n');
    expect(await again.kill('SIGINT')).toBe(0);
    expect(isMounted(mnt)).toBe(false);
    const cat = await c.cli(['cat', '/kept.txt']);
    expect(cat.code, cat.stderr).toBe(0);
    expect(cat.stdout).toBe('kept\n');
    // The mount's opens were all returned.
    const usage = JSON.parse((await c.cli(['usage', '--json'])).stdout) as { pairs: { copies: { opens: number }[] }[] };
    expect(usage.pairs[0]!.copies.every((x) => x.opens === 0)).toBe(true);
  });
});
