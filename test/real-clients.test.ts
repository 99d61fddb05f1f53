// Real NBD clients against `blockmirror serve`: nbdinfo, qemu-io, qemu-img,
// nbdcopy, fio and python3-libnbd, each doing what it does in the field
// (../shared/reference/nbd.md §2, §3.4 b-e). Every test runs against the
// memory export and the --file export; the data-path tests also run against
// `nbdkit memory` as a reference, so a broken test shows up as a failure there
// too rather than as a "server bug".
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CLI, PYTHON, ROOT, run } from './helpers/servers.js';
import {
  Cleanup,
  describeRun,
  fio,
  firstDifference,
  nbdinfoJson,
  nbdinfoMap,
  nbdkitFile,
  nbdkitMemory,
  pseudoRandom,
  qemuIo,
  qemuIoOk,
  requirePythonLibnbd,
  requireTools,
  runOk,
  serveFile,
  serveMemory,
  type MapExtent,
  type Target,
} from './helpers/clients.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const cleanup = new Cleanup();
afterEach(() => cleanup.run());

beforeAll(async () => {
  requireTools('nbdinfo', 'nbdcopy', 'qemu-img', 'qemu-io', 'fio', 'nbdkit');
  await requirePythonLibnbd(PYTHON);
  if (!fs.existsSync(path.join(ROOT, 'dist/cli/main.js'))) throw new Error('dist/ is missing: run `npm run build` first');
});

const SERVE: Target[] = [serveMemory(cleanup), serveFile(cleanup)];
/** Data-path tests also run against nbdkit, to prove the test itself is sound. */
const WITH_REFERENCE: Target[] = [...SERVE, nbdkitMemory(cleanup)];
const each = (targets: Target[]) => describe.each(targets.map((t) => [t.label, t] as const));

/** A 16 MiB image with data, explicit zeroes and a real hole, written to a local file. */
function sparseImage(dir: string): { file: string; bytes: Buffer } {
  const bytes = Buffer.alloc(16 * MiB);
  pseudoRandom(4 * MiB, 1).copy(bytes, 0); //        [0, 4M)   data
  //                                                  [4M, 8M)  zero bytes, written out
  pseudoRandom(4 * MiB, 2).copy(bytes, 8 * MiB); //  [8M, 12M) data
  const file = path.join(dir, 'image.raw');
  fs.writeFileSync(file, bytes.subarray(0, 12 * MiB));
  fs.truncateSync(file, 16 * MiB); //                 [12M, 16M) a hole in the local file
  return { file, bytes };
}

function expectSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  expect(at, `${what}: first difference at byte ${at} (lengths ${actual.length} vs ${expected.length})`).toBe(-1);
}

/** Run a python3-libnbd snippet; `uri` is sys.argv[1]; it prints one JSON document. */
async function libnbd<T>(uri: string, script: string): Promise<T> {
  const r = await runOk(PYTHON, ['-c', `import json, sys, nbd\n${script}`, uri]);
  return JSON.parse(r.stdout) as T;
}

/** A libnbd call that is expected to fail: the errno name, or "ok". */
const TRY = `
import errno
def attempt(f):
    try:
        f()
        return "ok"
    except nbd.Error as e:
        # python3-libnbd 1.14 gives the errno as its name already; later ones may give the number.
        if isinstance(e.errno, str):
            return e.errno
        return errno.errorcode.get(e.errno, "errno %s: %s" % (e.errno, e.string))
`;

each(SERVE)('%s answers nbdinfo', (_label, target) => {
  it('reports the size, every capability flag, base:allocation, the block sizes and the description', async () => {
    const s = await target.start({ size: 64 * MiB, description: 'blockmirror interop disk' });
    const { info, whole } = await nbdinfoJson(s.uri);
    expect(whole.protocol).toBe('newstyle-fixed');
    expect(whole.structured).toBe(true);
    expect(info['export-name']).toBe('disk');
    expect(info['export-size']).toBe(64 * MiB);
    expect(info.description).toBe('blockmirror interop disk');
    expect(info.contexts).toContain('base:allocation');
    expect({
      is_read_only: info.is_read_only,
      can_multi_conn: info.can_multi_conn,
      can_trim: info.can_trim,
      can_zero: info.can_zero,
      can_fast_zero: info.can_fast_zero,
      can_fua: info.can_fua,
      can_flush: info.can_flush,
      can_cache: info.can_cache,
      can_df: info.can_df,
    }).toEqual({
      is_read_only: false,
      can_multi_conn: true,
      can_trim: true,
      can_zero: true,
      can_fast_zero: true,
      can_fua: true,
      can_flush: true,
      can_cache: true,
      can_df: true,
    });
    expect([info.block_size_minimum, info.block_size_preferred, info.block_size_maximum]).toEqual([1, 4096, 32 * MiB]);
  });

  it('lists the one export with its description, and the default export "" is the same disk', async () => {
    const s = await target.start({ size: 8 * MiB, description: 'listed disk' });
    const list = await runOk('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${s.port}/`]);
    const exports = (JSON.parse(list.stdout) as { exports: Record<string, unknown>[] }).exports;
    expect(exports.map((e) => [e['export-name'], e.description, e['export-size']])).toEqual([['disk', 'listed disk', 8 * MiB]]);

    const plain = await runOk('nbdinfo', ['--list', `nbd://127.0.0.1:${s.port}/`]);
    expect(plain.stdout).toContain('export="disk":');
    expect(plain.stdout).toContain('description: listed disk');

    // The default export name maps to the same storage, not a second disk.
    const dflt = `nbd://127.0.0.1:${s.port}/`;
    expect((await nbdinfoJson(dflt)).info['export-size']).toBe(8 * MiB);
    await qemuIoOk(s.uri, ['write -P 0x3c 0 64k']);
    await qemuIoOk(dflt, ['read -P 0x3c 0 64k']);
  });
});

each(WITH_REFERENCE)('%s under qemu-io', (_label, target) => {
  it('reads back pattern writes, write-zeroes and discards exactly, also from a new connection', async () => {
    const s = await target.start({ size: 4 * MiB });
    const script = [
      'write -P 0x11 0 3M', // something for the zero and discard to erase
      'write -P 0x5a 0 1M',
      'write -z 1M 1M', // WRITE_ZEROES with NO_HOLE
      'discard 2M 1M', // TRIM
      'flush',
      'read -P 0x5a 0 1M',
      'read -P 0 1M 2M',
    ];
    const r = await qemuIoOk(s.uri, script);
    expect(r.stdout).toContain('wrote 1048576/1048576 bytes at offset 0');
    expect(r.stdout).toContain('discard 1048576/1048576 bytes at offset 2097152');
    expect(r.stdout).toContain('read 2097152/2097152 bytes at offset 1048576');
    // A second process: the data lives in the server, not in qemu's cache.
    await qemuIoOk(s.uri, ['read -P 0x5a 0 1M', 'read -P 0 1M 2M', 'read -P 0 3M 1M']);
  });

  it('accepts FUA writes, writeback writes with an explicit flush, unmapping zeroes and unaligned writes', async () => {
    const s = await target.start({ size: 4 * MiB });
    // Default cache mode is writethrough: every write goes out with FUA; -f asks for it explicitly.
    await qemuIoOk(s.uri, ['write -f -P 0xa1 0 64k', 'write -P 0xa2 64k 64k', 'write -P 0xff 1M 1M', 'write -z -u 1M 512k']);
    await qemuIoOk(s.uri, ['write -P 0xa3 128k 64k', 'flush'], ['-t', 'writeback']);
    await qemuIoOk(s.uri, ['write -P 0x77 3000001 1234']);
    await qemuIoOk(s.uri, [
      'read -P 0xa1 0 64k',
      'read -P 0xa2 64k 64k',
      'read -P 0xa3 128k 64k',
      'read -P 0 192k 832k',
      'read -P 0 1M 512k',
      'read -P 0xff 1536k 512k',
      'read -P 0 2M 902849', // up to 3000001
      'read -P 0x77 3000001 1234',
      'read -P 0 3001235 1193069', // to the end
    ]);
  });

  it('reports "Pattern verification failed" for wrong data, so the checks above can fail', async () => {
    const s = await target.start({ size: 1 * MiB });
    await qemuIoOk(s.uri, ['write -P 0x5a 0 64k']);
    const r = await qemuIo(s.uri, ['read -P 0x5b 0 64k']);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toContain('Pattern verification failed');
  });
});

/**
 * qemu-io operations on an 8 MiB export, and the base:allocation map that
 * follows from them for blockmirror (4 KiB allocation granularity).
 */
const MAP_SCRIPT = [
  'write -P 0xab 0 2M',
  'write -z 1M 256k', //          NO_HOLE: stays allocated
  'write -z -u 1536k 256k', //    may unmap: blockmirror punches a hole
  'discard 512k 4k',
  'write -P 0xcd 4M 4k',
  'write -P 0xcd 6000000 1000', // unaligned: allocates the two 4 KiB blocks it touches
  'flush',
];
const MAP_READBACK = [
  'read -P 0xab 0 512k',
  'read -P 0 512k 4k',
  'read -P 0xab 516k 508k',
  'read -P 0 1M 256k',
  'read -P 0xab 1280k 256k',
  'read -P 0 1536k 256k',
  'read -P 0xab 1792k 256k',
  'read -P 0 2M 2M',
  'read -P 0xcd 4M 4k',
  'read -P 0 4100k 1801600', // 4198400 .. 6000000
  'read -P 0xcd 6000000 1000',
  'read -P 0 6001000 2387608',
];
const DATA = 0;
const HOLE_ZERO = 3;
/** Expected map; `noHoleZero` is how the NO_HOLE write-zeroes range reports. */
function expectedMap(noHoleZero: number): [number, number, number][] {
  const raw: [number, number, number][] = [
    [0, 524288, DATA],
    [524288, 4096, HOLE_ZERO],
    [528384, 520192, DATA],
    [1048576, 262144, noHoleZero],
    [1310720, 262144, DATA],
    [1572864, 262144, HOLE_ZERO],
    [1835008, 262144, DATA],
    [2097152, 2097152, HOLE_ZERO],
    [4194304, 4096, DATA],
    [4198400, 1798144, HOLE_ZERO],
    [5996544, 8192, DATA],
    [6004736, 2383872, HOLE_ZERO],
  ];
  // Neighbours with the same type merge into one extent.
  const out: [number, number, number][] = [];
  for (const e of raw) {
    const last = out[out.length - 1];
    if (last && last[2] === e[2]) last[1] += e[1];
    else out.push([...e]);
  }
  return out;
}
const asTriples = (m: MapExtent[]) => m.map((e) => [e.offset, e.length, e.type]);

each(SERVE)('%s under nbdinfo --map', (_label, target) => {
  it('shows data, zeroes and trimmed holes exactly where qemu-io put them', async () => {
    const s = await target.start({ size: 8 * MiB });
    expect(asTriples(await nbdinfoMap(s.uri))).toEqual([[0, 8 * MiB, HOLE_ZERO]]);
    await qemuIoOk(s.uri, MAP_SCRIPT);
    const map = asTriples(await nbdinfoMap(s.uri));
    if (target.kind === 'memory') {
      expect(map).toEqual(expectedMap(DATA));
    } else {
      // A file's NO_HOLE zeroes are allocated (fallocate ZERO_RANGE) but ext4 and xfs report such
      // unwritten extents as holes through SEEK_HOLE; filesystems that cannot zero a range get
      // written zeroes, i.e. data. Everything else is exact.
      expect([expectedMap(DATA), expectedMap(HOLE_ZERO)]).toContainEqual(map);
    }
    await qemuIoOk(s.uri, MAP_READBACK);

    const text = await runOk('nbdinfo', ['--map', s.uri]);
    expect(text.stdout).toMatch(/^\s+0\s+524288\s+0\s+data$/m);
    expect(text.stdout).toMatch(/^\s+524288\s+4096\s+3\s+hole,zero$/m);
  });

  if (target.kind === 'file') {
    it('reports the same map as nbdkit file after the same writes on the same filesystem', async () => {
      const ours = await target.start({ size: 8 * MiB });
      const theirs = await nbdkitFile(cleanup).start({ size: 8 * MiB });
      await qemuIoOk(ours.uri, MAP_SCRIPT);
      await qemuIoOk(theirs.uri, MAP_SCRIPT);
      expect(asTriples(await nbdinfoMap(ours.uri))).toEqual(asTriples(await nbdinfoMap(theirs.uri)));
    });
  }
});

each(WITH_REFERENCE)('%s under qemu-img', (_label, target) => {
  it('converts a sparse random image in and out bit for bit, and qemu-img compare agrees', async () => {
    const dir = cleanup.dir();
    const { file, bytes } = sparseImage(dir);
    const s = await target.start({ size: 16 * MiB });
    // Junk everywhere first, so the zero ranges of the image must really be written as zeroes.
    await qemuIoOk(s.uri, ['write -P 0xee 0 16M']);

    await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', file, s.uri], { timeoutMs: 60_000 });
    const cmp = await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, s.uri]);
    expect(cmp.stdout).toContain('Images are identical.');

    const back = path.join(dir, 'back.raw');
    await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', s.uri, back], { timeoutMs: 60_000 });
    expectSameBytes(fs.readFileSync(back), bytes, 'qemu-img convert round trip');

    // qemu-img wrote the zero ranges with WRITE_ZEROES (may unmap): base:allocation must now say
    // zero there and data elsewhere, which is what makes the next sparse copy cheap.
    expect(asTriples(await nbdinfoMap(s.uri))).toEqual([
      [0, 4 * MiB, DATA],
      [4 * MiB, 4 * MiB, HOLE_ZERO],
      [8 * MiB, 4 * MiB, DATA],
      [12 * MiB, 4 * MiB, HOLE_ZERO],
    ]);

    // Negative control: one changed byte must make compare fail.
    await qemuIoOk(s.uri, ['write -P 0x01 10M 512']);
    const bad = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', file, s.uri]);
    expect(bad.code, describeRun('qemu-img compare', bad)).toBe(1);
    expect(bad.stdout).toContain('Content mismatch at offset 10485760');
  });
});

each(WITH_REFERENCE)('%s under nbdcopy', (_label, target) => {
  it('round-trips a file through the export with --flush', async () => {
    const dir = cleanup.dir();
    const { file, bytes } = sparseImage(dir);
    const s = await target.start({ size: 16 * MiB });
    await runOk('nbdcopy', ['--flush', file, s.uri]);
    const out = path.join(dir, 'out.raw');
    await runOk('nbdcopy', [s.uri, out]);
    expectSameBytes(fs.readFileSync(out), bytes, 'nbdcopy round trip');
  });

  it('uses four connections because the export advertises multi-conn, flushes each, and keeps the data intact', async () => {
    const dir = cleanup.dir();
    const bytes = pseudoRandom(16 * MiB, 7);
    const file = path.join(dir, 'random.raw');
    fs.writeFileSync(file, bytes);
    const s = await target.start({ size: 16 * MiB });

    // nbdcopy drops to one connection unless the server sets CAN_MULTI_CONN.
    const up = await runOk('nbdcopy', ['-v', '--connections=4', '--threads=4', '--flush', file, s.uri]);
    expect(up.stderr).toContain('connections=4');
    expect(new Set(up.stderr.match(/dst\d+: nbd_connect_uri: enter/g))).toEqual(
      new Set([0, 1, 2, 3].map((i) => `dst${i}: nbd_connect_uri: enter`)),
    );
    expect(new Set(up.stderr.match(/dst\d+: nbd_flush: enter/g)).size).toBe(4);

    const out = path.join(dir, 'out.raw');
    const down = await runOk('nbdcopy', ['-v', '--connections=4', '--threads=4', s.uri, out]);
    expect(down.stderr).toContain('connections=4');
    expectSameBytes(fs.readFileSync(out), bytes, 'nbdcopy multi-conn round trip');
  });
});

each(WITH_REFERENCE)('%s under fio', (_label, target) => {
  it('verifies 16 MiB of 4k random writes at queue depth 16 with crc32c', async () => {
    const s = await target.start({ size: 16 * MiB });
    const jobs = await fio(s.uri, cleanup.dir(), [
      '--name=randwrite',
      '--rw=randwrite',
      '--bs=4k',
      '--iodepth=16',
      '--size=16M',
      '--verify=crc32c',
      '--do_verify=1',
    ]);
    expect(jobs.map((j) => [j.jobname, j.error, j.write.io_bytes, j.read.io_bytes])).toEqual([
      ['randwrite', 0, 16 * MiB, 16 * MiB], // every block written, then read back and verified
    ]);
  });

  it('verifies 32 MiB of 1 MiB sequential writes with crc32c', async () => {
    const s = await target.start({ size: 32 * MiB });
    const jobs = await fio(s.uri, cleanup.dir(), [
      '--name=seqwrite',
      '--rw=write',
      '--bs=1M',
      '--iodepth=4',
      '--size=32M',
      '--verify=crc32c',
      '--do_verify=1',
    ]);
    expect(jobs.map((j) => [j.jobname, j.error, j.write.io_bytes, j.read.io_bytes])).toEqual([
      ['seqwrite', 0, 32 * MiB, 32 * MiB],
    ]);
  });

  it('verifies 64 MiB of random writes of 4 KiB to 4 MiB at queue depth 8 with crc32c', async () => {
    // Both sides of the file volume's 1 MiB line between writes done on the event loop and on the pool.
    const s = await target.start({ size: 64 * MiB });
    const jobs = await fio(s.uri, cleanup.dir(), [
      '--name=mixed',
      '--rw=randwrite',
      '--bsrange=4k-4m',
      '--iodepth=8',
      '--size=64M',
      '--verify=crc32c',
      '--do_verify=1',
    ]);
    expect(jobs.map((j) => [j.jobname, j.error, j.write.io_bytes, j.read.io_bytes])).toEqual([
      ['mixed', 0, 64 * MiB, 64 * MiB],
    ]);
  });
});

each(SERVE)('%s with --read-only', (_label, target) => {
  it('says read-only to nbdinfo, keeps qemu-io from writing, and fails libnbd writes with EPERM', async () => {
    const content = Buffer.alloc(1 * MiB, 0x42);
    const initial = target.kind === 'file' ? content : undefined;
    const fill = target.kind === 'file' ? '0x42' : '0';
    const s = await target.start({ size: 2 * MiB, readOnly: true, initial });

    const { info } = await nbdinfoJson(s.uri);
    expect([info.is_read_only, info.can_trim, info.can_zero, info['export-size']]).toEqual([true, false, false, 2 * MiB]);

    // qemu sees READ_ONLY and refuses to open the export for writing at all.
    const w = await qemuIo(s.uri, ['write -P 0x01 0 4k']);
    expect(w.code).not.toBe(0);
    expect(w.stdout + w.stderr).toMatch(/Permission denied|read-only/);
    await qemuIoOk(s.uri, [`read -P ${fill} 0 1M`, 'read -P 0 1M 1M'], ['-r']);

    // libnbd with strict mode off sends the commands anyway: the server must refuse each.
    const res = await libnbd<Record<string, string>>(
      s.uri,
      `${TRY}
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
print(json.dumps({
    "write": attempt(lambda: h.pwrite(b"x" * 4096, 0)),
    "write_fua": attempt(lambda: h.pwrite(b"x" * 4096, 0, nbd.CMD_FLAG_FUA)),
    "trim": attempt(lambda: h.trim(4096, 0)),
    "zero": attempt(lambda: h.zero(4096, 0)),
    "read": attempt(lambda: h.pread(4096, 0)),
    "flush": attempt(lambda: h.flush()),
}))
h.shutdown()`,
    );
    expect(res).toEqual({ write: 'EPERM', write_fua: 'EPERM', trim: 'EPERM', zero: 'EPERM', read: 'ok', flush: 'ok' });

    await qemuIoOk(s.uri, [`read -P ${fill} 0 1M`], ['-r']);
    if (s.file) expectSameBytes(fs.readFileSync(s.file).subarray(0, 1 * MiB), content, 'backing file after refused writes');
  });
});

each(SERVE)('%s seen by libnbd', (_label, target) => {
  it('fails reads past the end with EINVAL and writes past the end with ENOSPC', async () => {
    const s = await target.start({ size: 1 * MiB });
    const res = await libnbd<Record<string, string>>(
      s.uri,
      `${TRY}
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
size = h.get_size()
print(json.dumps({
    "size": str(size),
    "read_past_end": attempt(lambda: h.pread(4096, size)),
    "read_straddling_end": attempt(lambda: h.pread(4096, size - 512)),
    "write_past_end": attempt(lambda: h.pwrite(b"y" * 4096, size)),
    "write_straddling_end": attempt(lambda: h.pwrite(b"y" * 4096, size - 512)),
    "last_block_still_zero": str(h.pread(512, size - 512) == bytes(512)),
    "write_last_byte": attempt(lambda: h.pwrite(b"z", size - 1)),
    "read_last_byte": h.pread(1, size - 1).decode(),
}))
h.shutdown()`,
    );
    expect(res).toEqual({
      size: String(1 * MiB),
      read_past_end: 'EINVAL',
      read_straddling_end: 'EINVAL',
      write_past_end: 'ENOSPC',
      write_straddling_end: 'ENOSPC',
      last_block_still_zero: 'True',
      write_last_byte: 'ok',
      read_last_byte: 'z',
    });
  });
});

each(SERVE)('%s on a unix socket', (_label, target) => {
  it('serves nbdinfo, qemu-io and nbdcopy through an nbd+unix URI', async () => {
    const dir = cleanup.dir('bm-sock-');
    const socket = path.join(dir, 'nbd.sock');
    const s = await target.start({ size: 4 * MiB, socket });
    expect(s.uri).toBe(`nbd+unix:///disk?socket=${socket}`);
    expect((await nbdinfoJson(s.uri)).info['export-size']).toBe(4 * MiB);
    await qemuIoOk(s.uri, ['write -P 0x33 0 1M', 'write -P 0x44 3M 1M']);
    await qemuIoOk(s.uri, ['read -P 0x33 0 1M', 'read -P 0 1M 2M', 'read -P 0x44 3M 1M']);
    const out = path.join(dir, 'out.raw');
    await runOk('nbdcopy', [s.uri, out]);
    const expected = Buffer.alloc(4 * MiB);
    expected.fill(0x33, 0, 1 * MiB);
    expected.fill(0x44, 3 * MiB);
    expectSameBytes(fs.readFileSync(out), expected, 'nbdcopy over the unix socket');
  });
});

describe('blockmirror serve under socket activation', () => {
  const serve = [process.execPath, CLI, 'serve'];

  it('gives nbdinfo [ blockmirror serve --size 1MiB ] a 1 MiB export', async () => {
    const r = await runOk('nbdinfo', ['--json', '--', '[', ...serve, '--size', '1MiB', ']']);
    const info = (JSON.parse(r.stdout) as { exports: Record<string, unknown>[] }).exports[0];
    expect(info['export-size']).toBe(1 * MiB);
    expect(info.contexts).toContain('base:allocation');
  });

  it('exports an existing file to nbdcopy [ blockmirror serve --file F ] and maps its hole', async () => {
    const dir = cleanup.dir();
    const file = path.join(dir, 'disk.img');
    const data = pseudoRandom(1 * MiB, 9);
    fs.writeFileSync(file, data);
    fs.truncateSync(file, 2 * MiB);

    const out = path.join(dir, 'out.raw');
    await runOk('nbdcopy', ['--', '[', ...serve, '--file', file, ']', out]);
    expectSameBytes(fs.readFileSync(out), Buffer.concat([data, Buffer.alloc(1 * MiB)]), 'nbdcopy from a socket-activated server');

    const map = await runOk('nbdinfo', ['--map', '--json', '--', '[', ...serve, '--file', file, ']']);
    expect((JSON.parse(map.stdout) as MapExtent[]).map((e) => [e.offset, e.length, e.type])).toEqual([
      [0, 1 * MiB, DATA],
      [1 * MiB, 1 * MiB, HOLE_ZERO],
    ]);
  });
});

describe('the nbdkit reference', () => {
  it('is the server the reference runs above use', async () => {
    // Guards against a helper mix-up silently testing blockmirror twice.
    const s = await nbdkitMemory(cleanup).start({ size: 1 * MiB });
    expect(s.proc.spawnargs[0]).toBe('nbdkit');
    const { info } = await nbdinfoJson(s.uri);
    expect(info['export-size']).toBe(1 * MiB);
    expect(info.block_size_maximum).toBeUndefined(); // nbdkit memory advertises no block size; we do
  });
});
