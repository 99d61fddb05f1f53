// The server as libnbd 1.14 (python3-libnbd) sees it: option negotiation in
// opt mode, handshake variants, and the errno of every error reply with
// libnbd's own client-side checks switched off (strict mode 0), so that what
// is asserted is the server's answer, not the library's.
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD, State } from '../src/protocol/constants.js';
import { startTarget, assertHealthy, requireLibnbdPython, runPy, type Target } from './helpers/raw.js';

const MiB = 1024 * 1024;

interface Snapshot {
  size: number;
  flags: Record<string, boolean>;
  block_sizes: number[];
  description: string;
  canonical_name: string;
}

let rw: Target;
let ro: Target;

beforeAll(async () => {
  await requireLibnbdPython();
  [rw, ro] = await Promise.all([
    startTarget({ sizeMiB: 64, description: 'libnbd probe volume' }),
    startTarget({ sizeMiB: 16, readOnly: true }),
  ]);
});

afterAll(async () => {
  await Promise.all([rw?.stop(), ro?.stop()]);
});

describe('option negotiation (opt mode)', () => {
  let neg: {
    protocol: string; sr: boolean; list: [string, string][];
    list_meta_all: string[]; list_meta_base: string[]; list_meta_base_count: number;
    list_meta_unknown: string[]; list_meta_unknown_count: number;
    info_unknown: string; info: Snapshot; go: Snapshot; read_after_go: number;
  };

  beforeAll(async () => {
    neg = await runPy('negotiate.py', [rw.uri]);
  });

  it('negotiates fixed newstyle with structured replies', () => {
    expect([neg.protocol, neg.sr]).toEqual(['newstyle-fixed', true]);
  });

  it('lists exactly one export, with its description', () => {
    expect(neg.list).toEqual([['disk', 'libnbd probe volume']]);
  });

  it('lists base:allocation for no query and for the query "base:", and nothing for an unknown namespace', () => {
    expect(neg.list_meta_all).toContain('base:allocation');
    expect([neg.list_meta_base, neg.list_meta_base_count]).toEqual([['base:allocation'], 1]);
    expect([neg.list_meta_unknown, neg.list_meta_unknown_count]).toEqual([[], 0]);
  });

  it('refuses INFO for an unknown export (libnbd maps ERR_UNKNOWN to ENOENT) and then still answers INFO for the right one', () => {
    expect(neg.info_unknown).toBe('ENOENT');
    expect(neg.info.size).toBe(64 * MiB);
  });

  it('gives identical size, flags, block sizes, description and name to INFO and to GO', () => {
    expect(neg.go).toEqual(neg.info);
    expect(neg.go).toEqual({
      size: 64 * MiB,
      flags: {
        read_only: false, flush: true, fua: true, rotational: false, trim: true, zero: true,
        fast_zero: true, df: true, multi_conn: true, cache: true,
      },
      block_sizes: [MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD],
      description: 'libnbd probe volume',
      canonical_name: 'disk',
    });
    expect(neg.read_after_go).toBe(512);
  });
});

describe('handshake variants', () => {
  it('serves a non-fixed newstyle client (handshake flags 0, EXPORT_NAME with the 124 zeroes)', async () => {
    const r = await runPy<Record<string, unknown>>('variants.py', [rw.uri, 'nonfixed']);
    expect(r).toMatchObject({ protocol: 'newstyle', sr: false, size: 64 * MiB, read_back_equal: true, mixed_equal: true });
  });

  it('serves reads and writes with simple replies when structured replies are not requested, without offering DF', async () => {
    const r = await runPy<{ flags: Record<string, boolean> } & Record<string, unknown>>('variants.py', [rw.uri, 'nosr']);
    expect(r).toMatchObject({ protocol: 'newstyle-fixed', sr: false, read_back_equal: true, mixed_equal: true });
    expect(r.flags.df, 'SEND_DF needs structured replies').toBe(false);
  });
});

describe('error replies (strict mode off)', () => {
  it('answers each out-of-range, zero-length or badly flagged request with the right errno and keeps the connection', async () => {
    const r = await runPy<Record<string, string>>('errors.py', [rw.uri, 'writable']);
    expect(r).toEqual({
      'pread past end': 'EINVAL',
      'pread crossing end': 'EINVAL',
      'pwrite past end': 'ENOSPC',
      'pwrite crossing end': 'ENOSPC',
      'zero past end': 'ENOSPC',
      'trim past end': 'EINVAL',
      'cache past end': 'EINVAL',
      'zero-length pread': 'EINVAL',
      'pread with unknown flag bit 7': 'EINVAL',
      'pwrite with unknown flag bit 9': 'EINVAL',
      'trim with FAST_ZERO': 'EINVAL',
      'pwrite with NO_HOLE': 'EINVAL',
      'pread with REQ_ONE': 'EINVAL',
      'flush with FUA': 'OK',
      'pread with DF': 'OK',
      'zero with FAST_ZERO': 'OK',
      'read after errors': 'OK',
    });
  });

  it('refuses writes, zeroes and trims on a --read-only export with EPERM, and still reads and flushes', async () => {
    const r = await runPy<Record<string, string>>('errors.py', [ro.uri, 'readonly']);
    expect(r).toEqual({
      'read_only flag': 'OK',
      pwrite: 'EPERM',
      'pwrite with FUA': 'EPERM',
      zero: 'EPERM',
      trim: 'EPERM',
      pread: 'OK',
      flush: 'OK',
    });
    await assertHealthy(ro);
  });
});

describe('block status on base:allocation', () => {
  type Ext = [number, number];
  interface Status { q: [number, number]; result: string; replies: { context: string; offset: number; extents: Ext[] }[] }
  let bs: { can_meta_context: boolean; size: number; plain: Status[]; req_one: Status[]; past_end: string; zero_violations: unknown[] };
  const dataStart = 1 * MiB;
  const dataEnd = dataStart + 64 * 1024;

  beforeAll(async () => {
    bs = await runPy('block_status.py', [rw.uri]);
  });

  /** Extents overlapping the written (random, non-zero) bytes must not claim ZERO. */
  function zeroClaimsOverData(s: Status): Ext[] {
    const bad: Ext[] = [];
    let at = s.q[1];
    for (const [len, flags] of s.replies[0].extents) {
      if (at < dataEnd && at + len > dataStart && flags & State.ZERO) bad.push([at, flags]);
      at += len;
    }
    return bad;
  }

  it('negotiates base:allocation via SET_META_CONTEXT and refuses a range past the end with EINVAL', () => {
    expect(bs.can_meta_context).toBe(true);
    expect(bs.past_end).toBe('EINVAL');
  });

  it('returns one base:allocation chunk of contiguous, non-empty extents from the requested offset', () => {
    for (const s of bs.plain) {
      const where = `block_status(${s.q[0]}, ${s.q[1]})`;
      expect(s.result, where).toBe('OK');
      expect(s.replies.map((r) => [r.context, r.offset]), where).toEqual([['base:allocation', s.q[1]]]);
      const ext = s.replies[0].extents;
      expect(ext.length, where).toBeGreaterThan(0);
      expect(ext.every(([len]) => len > 0), `${where}: ${JSON.stringify(ext)}`).toBe(true);
      const total = ext.reduce((a, [len]) => a + len, 0);
      expect(total, `${where} runs past the end of the export`).toBeLessThanOrEqual(bs.size - s.q[1]);
      expect(zeroClaimsOverData(s), `${where} claims ZERO over written data`).toEqual([]);
    }
  });

  it('reports ZERO only for extents that read back as zeroes', () => {
    expect(bs.plain.length + bs.req_one.length).toBeGreaterThan(10);
    expect(bs.zero_violations).toEqual([]);
  });

  it('returns exactly one extent, within the request, with REQ_ONE', () => {
    for (const s of bs.req_one) {
      const where = `block_status(${s.q[0]}, ${s.q[1]}, REQ_ONE)`;
      expect(s.result, where).toBe('OK');
      expect(s.replies.map((r) => [r.context, r.offset]), where).toEqual([['base:allocation', s.q[1]]]);
      const ext = s.replies[0].extents;
      expect(ext.length, `${where}: ${JSON.stringify(ext)}`).toBe(1);
      expect(ext[0][0], where).toBeGreaterThan(0);
      expect(ext[0][0], where).toBeLessThanOrEqual(s.q[0]);
      expect(zeroClaimsOverData(s), `${where} claims ZERO over written data`).toEqual([]);
    }
  });
});

describe('multiple connections', () => {
  it('advertises CAN_MULTI_CONN and makes a write on A, flushed on B, visible on C', async () => {
    const r = await runPy('multiconn.py', [rw.uri]);
    expect(r).toEqual({ multi_conn: [true, true, true], changed: true, c_sees_a_write: true });
  });
});
