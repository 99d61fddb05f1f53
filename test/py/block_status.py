"""BLOCK_STATUS on base:allocation, with and without REQ_ONE.

usage: block_status.py URI
Writes data at [1 MiB, +64 KiB) and one byte at 5 MiB+7, zeroes
[2 MiB, +64 KiB), trims [3 MiB, +64 KiB), then asks for the status of various
ranges; prints every reply's extents as [length, flags] pairs, and every
extent that claims ZERO but does not read back as zeroes.
"""
import os
import sys

import nbd
from common import emit, handle

MiB = 1024 * 1024
uri = sys.argv[1]
h = handle(strict=False)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
out = {'can_meta_context': h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)}
data = os.urandom(64 * 1024)
h.pwrite(data, 1 * MiB)
h.zero(64 * 1024, 2 * MiB)
h.pwrite(os.urandom(64 * 1024), 3 * MiB)
h.trim(64 * 1024, 3 * MiB)
h.pwrite(b'\x01', 5 * MiB + 7)


def status(count, offset, flags=0):
    replies = []

    def cb(metacontext, off, entries, err):
        replies.append({'context': metacontext, 'offset': off,
                        'extents': [[entries[i], entries[i + 1]] for i in range(0, len(entries), 2)]})
        return 0

    try:
        h.block_status(count, offset, cb, flags)
        return {'result': 'OK', 'replies': replies}
    except nbd.Error as e:
        return {'result': e.errno or str(e), 'replies': replies}


size = h.get_size()
queries = [
    [4 * MiB, 0], [64 * 1024, 1 * MiB], [64 * 1024, 2 * MiB], [1 * MiB, 512 * 1024], [4096, size - 4096],
    [128 * 1024, 3 * MiB - 4096], [65536, 5 * MiB], [1, 5 * MiB + 7], [8 * MiB, 0],
]
out['size'] = size
out['plain'] = [dict(q=q, **status(q[0], q[1])) for q in queries]
out['req_one'] = [dict(q=q, **status(q[0], q[1], nbd.CMD_FLAG_REQ_ONE)) for q in queries]
out['past_end'] = status(4096, size)['result']

# Whatever the server says is ZERO must read back as zeroes.
violations = []
for s in out['plain'] + out['req_one']:
    for r in s['replies']:
        at = r['offset']
        for length, flags in r['extents']:
            if flags & nbd.STATE_ZERO:
                end = min(at + length, size)
                pos = at
                while pos < end:
                    n = min(end - pos, 4 * MiB)
                    if h.pread(n, pos) != bytes(n):
                        violations.append([s['q'], at, length, flags])
                        break
                    pos += n
            at += length
out['zero_violations'] = violations
h.shutdown()
emit(out)
