"""Large overlapping WRITEs, TRIMs, ZEROes and READs on one connection, all in flight at once.

usage: writes_race.py URI ROUNDS SEED

Every 16-byte word a WRITE puts down is (MAGIC, write id, the word's own index on the volume), so
a word in any READ reply is either zero or a tag naming its own index and a write that covered it;
anything else is a leak (a page of another offset, or bytes of a payload that never committed).
The WRITEs are 192 KiB to 1 MiB (each misses 64 KiB or more after the 128 KiB read that brings
its header, so it asks the store for a write target), at offsets and lengths that are multiples of
16 but not of the page, so their first and last pages are shared with what was there before. Each round queues
whole-region READs first (their replies wait in the server, holding pages), then the random
commands, then more READs, and reads no reply until all are sent. After each round the region
must equal a model that applies the commands in the order they were sent: the server applies
overlapping commands in arrival order.
"""
import random
import sys
import time
from array import array

import nbd
from common import emit

MAGIC = 0x5EEDF00D
WORD = 16
REGION = 2 * 1024 * 1024
READS = 4  # whole-region READs before and after the commands: 16 MiB of replies a round
COMMANDS = 24

uri, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
h.trim(REGION, 0)  # what an earlier run left would carry tags of its own writes
model = bytearray(REGION)
writes = {}  # write id -> (first word, end word)
results = {'replies': 0, 'words_checked': 0, 'tagged_words': 0, 'writes': 0, 'leak': [], 'final_ok': True}


def content(wid, offset, length):
    first = offset // WORD
    words = array('Q', [MAGIC | (wid << 32)]) * (2 * (length // WORD))
    words[1::2] = array('Q', range(first, first + length // WORD))
    return words.tobytes()


def span(lo, hi):
    """A 16-byte-aligned range of lo..hi bytes inside the region, at a random 16-byte offset."""
    length = rng.randrange(lo // WORD, hi // WORD + 1) * WORD
    offset = rng.randrange(0, (REGION - length) // WORD + 1) * WORD
    return offset, length


def check(offset, data):
    words = array('Q')
    words.frombytes(bytes(data))
    first = offset // WORD
    for k, (lo, idx) in enumerate(zip(words[0::2], words[1::2])):
        if lo == 0 and idx == 0:
            continue
        wid = lo >> 32
        where = writes.get(wid)
        if (lo & 0xFFFFFFFF) != MAGIC or idx != first + k or where is None or not where[0] <= idx < where[1]:
            if len(results['leak']) < 5:
                results['leak'].append('byte %d holds %r' % (offset + k * WORD, (lo & 0xFFFFFFFF, wid, idx)))
            return
        results['tagged_words'] += 1
    results['words_checked'] += len(words) // 2


wid = 0
for r in range(rounds):
    pending = []  # (cookie, offset, buffer) of READs
    keep = []  # WRITE buffers until their commands complete
    changes = []  # cookies of WRITEs, TRIMs and ZEROes: each must succeed

    def read(offset, length):
        buf = nbd.Buffer(length)
        pending.append((h.aio_pread(buf, offset), offset, buf))

    for _ in range(READS):
        read(0, REGION)
    for _ in range(COMMANDS):
        kind = rng.choice(['write', 'write', 'write', 'trim', 'zero', 'read'])
        if kind == 'write':
            wid += 1
            offset, length = span(192 * 1024, 1024 * 1024)
            data = content(wid, offset, length)
            writes[wid] = (offset // WORD, (offset + length) // WORD)
            buf = nbd.Buffer.from_bytearray(bytearray(data))
            keep.append(buf)
            changes.append(h.aio_pwrite(buf, offset))
            model[offset:offset + length] = data
            results['writes'] += 1
        elif kind == 'read':
            read(*span(WORD, 512 * 1024))
        else:
            offset, length = span(WORD, 512 * 1024)
            changes.append((h.aio_trim if kind == 'trim' else h.aio_zero)(length, offset))
            model[offset:offset + length] = bytes(length)
    for _ in range(READS):
        read(0, REGION)
    time.sleep(0.05)  # a slow client: the replies queue up in the server meanwhile
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for cookie in changes:
        h.aio_command_completed(cookie)  # raises the server's error, if any
    for cookie, offset, buf in pending:
        h.aio_command_completed(cookie)
        check(offset, buf.to_bytearray())
        results['replies'] += 1
    if h.pread(REGION, 0) != bytes(model):
        results['final_ok'] = False

h.shutdown()
emit(results)
