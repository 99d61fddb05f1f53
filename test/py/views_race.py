"""Concurrent overlapping READs and WRITE/TRIM/ZERO on one connection, with replies left unread.

usage: views_race.py URI ROUNDS

The region is BLOCKS blocks of 16 KiB. A block is only ever written whole, with a version v: every
16-byte word of its page p is (block, v, p, MAGIC). So at every instant a block is all zeroes or
one version throughout, and so must be each block of a READ reply. A block of a reply with pages
of two states is torn (bytes of two instants); a page with another block's or page's tag is a
leak (a page freed and reused by another offset). Each round queues many READs of the whole
region (more than the kernel's socket buffers hold), then trims, zeroes and rewrites the blocks
(small commands, sent at once), and only then reads replies: READ replies sit in the server's
write queue while the commands after them run.
"""
import struct
import sys
import time

import nbd
from common import emit

PAGE = 4096
BLOCK = 4 * PAGE
BLOCKS = 64
REGION = BLOCK * BLOCKS
READS = 16  # whole-region READs per batch: 16 MiB of replies, more than loopback TCP buffers
MAGIC = 0x5EED

uri, rounds = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
ZERO_PAGE = bytes(PAGE)


def content(b, v):
    return b''.join(struct.pack('<IIII', b, v, p, MAGIC) * (PAGE // 16) for p in range(BLOCK // PAGE))


def state_of(b, data):
    """A block's state in a reply: 'zero', a version, or ('torn'|'leak', detail)."""
    states = set()
    for p in range(BLOCK // PAGE):
        page = data[p * PAGE:(p + 1) * PAGE]
        if page == ZERO_PAGE:
            states.add('zero')
            continue
        tb, tv, tp, tm = struct.unpack_from('<IIII', page)
        if (tb, tp, tm) != (b, p, MAGIC):
            return ('leak', 'block %d page %d holds %r' % (b, p, (tb, tv, tp, tm)))
        if page != struct.pack('<IIII', tb, tv, tp, tm) * (PAGE // 16):
            return ('torn', 'block %d page %d is not all one version' % (b, p))
        states.add(tv)
    if len(states) != 1:
        return ('torn', 'block %d mixes %r' % (b, sorted(states, key=str)))
    return states.pop()


version = 0
pending = []  # (cookie, buffer) of READs
keep = []  # WRITE buffers until their commands complete
results = {'replies': 0, 'blocks_checked': 0, 'versions_seen': 0, 'torn': [], 'leak': []}


def issue_reads():
    for _ in range(READS):
        buf = nbd.Buffer(REGION)
        pending.append((h.aio_pread(buf, 0), buf))


def write(b, final):
    global version
    version += 1
    buf = nbd.Buffer.from_bytearray(bytearray(content(b, version)))
    keep.append(buf)
    h.aio_pwrite(buf, b * BLOCK)
    final[b].add(version)


for r in range(rounds):
    final = {b: set() for b in range(BLOCKS)}  # the states this round's commands may leave (they run concurrently)
    issue_reads()
    for b in range(BLOCKS):
        kind = (b + r) % 3
        if kind == 0:
            h.aio_trim(BLOCK, b * BLOCK)
            final[b].add('zero')
        elif kind == 1:
            h.aio_zero(BLOCK, b * BLOCK)
            final[b].add('zero')
        else:
            write(b, final)
    issue_reads()
    # Rewrite every block in another order, so the pages just freed get reused by other offsets.
    for i in range(BLOCKS):
        write((i * 7 + 3) % BLOCKS, final)
    issue_reads()
    time.sleep(0.05)  # a slow client: the replies queue up in the server meanwhile
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie, buf in pending:
        h.aio_command_completed(cookie)
        data = buf.to_bytearray()
        results['replies'] += 1
        for b in range(BLOCKS):
            s = state_of(b, data[b * BLOCK:(b + 1) * BLOCK])
            results['blocks_checked'] += 1
            if isinstance(s, tuple):
                if len(results[s[0]]) < 5:
                    results[s[0]].append(s[1])
            elif s != 'zero':
                results['versions_seen'] += 1
    pending.clear()
    keep.clear()

# The byte-for-byte check at the end: every block holds what one of its last commands left.
results['final_ok'] = all(state_of(b, h.pread(BLOCK, b * BLOCK)) in final[b] for b in range(BLOCKS))
h.shutdown()
emit(results)
