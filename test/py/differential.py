"""A fixed sequence of writes, zeroes, trims and bad requests, for diffing servers.

usage: differential.py URI (sr|nosr)
Prints {"steps": [[label, outcome]...], "hashes": [[mib, sha256]...]}. Run it
against nbdkit memory and against blockmirror: the outputs must be equal.

Bytes that were trimmed and not rewritten afterwards are left out of the
hashes (replaced by 0xEE before hashing): after TRIM their contents are
undefined (proto.md), so servers may legitimately differ there. Everything
else -- written data, zeroed ranges, never-touched space, and the bytes
around each trim -- must match exactly.
"""
import hashlib
import json
import random
import sys

import nbd

MiB = 1024 * 1024
uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_strict_mode(0)  # let the server, not libnbd, judge every request
if mode == 'nosr':
    h.set_request_structured_replies(False)
h.connect_uri(uri)
S = h.get_size()
rng = random.Random(20240601)
undefined = bytearray(S)  # 1 where a trim left the contents undefined
steps = []


def step(label, fn, *args):
    try:
        r = fn(*args)
        out = 'OK'
        if isinstance(r, (bytes, bytearray)):
            out = 'OK ' + hashlib.sha256(r).hexdigest()[:16]
        steps.append([label, out])
    except nbd.Error as e:
        steps.append([label, e.errno or 'errnum %d' % e.errnum])


def write(label, count, offset, flags=0):
    step(label, h.pwrite, rng.randbytes(count), offset, flags)
    if offset + count <= S:
        undefined[offset:offset + count] = bytes(count)


def zero(label, count, offset, flags=0):
    step(label, h.zero, count, offset, flags)
    if offset + count <= S:
        undefined[offset:offset + count] = bytes(count)


def trim(label, count, offset, flags=0):
    step(label, h.trim, count, offset, flags)
    if offset + count <= S:
        undefined[offset:offset + count] = b'\x01' * count


# -- data ------------------------------------------------------------------
write('write 1 MiB at 0', MiB, 0)
write('write 4096 at 511', 4096, 511)
write('write 100 at end-100', 100, S - 100)
write('write 64 KiB at 3 MiB+1', 65536, 3 * MiB + 1)
write('write 1 byte at 5 MiB+7', 1, 5 * MiB + 7)
write('write 2 MiB+28 at 8 MiB-14', 2 * MiB + 28, 8 * MiB - 14)
write('write 4096 at 10 MiB with FUA', 4096, 10 * MiB, nbd.CMD_FLAG_FUA)
write('write 8 MiB at 4 MiB+3', 8 * MiB, 4 * MiB + 3)
zero('zero 4096 at 4096', 4096, 4096)
zero('zero 100000 at 3 MiB+1000 NO_HOLE', 100000, 3 * MiB + 1000, nbd.CMD_FLAG_NO_HOLE)
zero('zero 1 at end-50', 1, S - 50)
zero('zero 1 MiB at 12 MiB FAST_ZERO (never written)', MiB, 12 * MiB, nbd.CMD_FLAG_FAST_ZERO)
zero('zero 3 MiB at 6 MiB+5 (across writes)', 3 * MiB, 6 * MiB + 5)
trim('trim 64 KiB at 256 KiB', 65536, 256 * 1024)
trim('trim 5000 at 3 MiB+10', 5000, 3 * MiB + 10)
trim('trim 1 MiB at 9 MiB+512 with FUA', MiB, 9 * MiB + 512, nbd.CMD_FLAG_FUA)
write('write 1000 over the end of the first trim', 1000, 256 * 1024 + 65000)
zero('zero 4096 inside the second trim', 4096, 3 * MiB + 512)
step('flush', h.flush)
step('flush with FUA', h.flush, nbd.CMD_FLAG_FUA)
step('cache 1 MiB at 0', h.cache, MiB, 0)
step('read 1 MiB at 0 with FUA', h.pread, MiB, 0, nbd.CMD_FLAG_FUA)
step('read 12345 at 3 MiB-100', h.pread, 12345, 3 * MiB - 100)
step('read 1 at end-1', h.pread, 1, S - 1)
if mode == 'sr':
    step('read 1 MiB at 11 MiB with DF (holes)', h.pread, MiB, 11 * MiB, nbd.CMD_FLAG_DF)

# -- errors ------------------------------------------------------------------
step('read past end', h.pread, 512, S)
step('read crossing end', h.pread, 1024, S - 512)
step('read 32 MiB+1 (over max payload and past end)', h.pread, 32 * MiB + 1, 0)
# Left out: reads over 64 MiB (nbdkit answers ENOMEM, blockmirror EINVAL) and
# writes over 32 MiB (nbdkit accepts up to 64 MiB, so on this 16 MiB export it
# says ENOSPC where blockmirror says EINVAL for exceeding its advertised
# maximum payload). Both are legitimate.
write('write past end', 512, S)
write('write crossing end', 1024, S - 512)
zero('zero past end', 4096, S)
zero('zero crossing end', 4096, S - 2048)
step('trim past end', h.trim, 4096, S)
step('cache past end', h.cache, 4096, S)
step('zero-length read', h.pread, 0, 0)
# Left out: zero-length WRITE, WRITE_ZEROES, TRIM and CACHE. Their meaning is
# unspecified (proto.md) and nbdkit 1.32 gives odd answers (ENOSPC for a
# 0-byte write at offset 0), so any answer from blockmirror is legitimate.
step('read with unknown flag bit 7', h.pread, 512, 0, 1 << 7)
write('write with unknown flag bit 9', 512, 14 * MiB, 1 << 9)
write('write with NO_HOLE', 512, 14 * MiB, nbd.CMD_FLAG_NO_HOLE)
write('write with FAST_ZERO', 512, 14 * MiB, nbd.CMD_FLAG_FAST_ZERO)
write('write with DF', 512, 14 * MiB, nbd.CMD_FLAG_DF)
step('read with REQ_ONE', h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
step('read with FAST_ZERO', h.pread, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
step('trim with FAST_ZERO', h.trim, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
step('trim with NO_HOLE', h.trim, 4096, 0, nbd.CMD_FLAG_NO_HOLE)
step('flush with FAST_ZERO', h.flush, nbd.CMD_FLAG_FAST_ZERO)
step('cache with FAST_ZERO', h.cache, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
step('zero with DF', h.zero, 4096, 0, nbd.CMD_FLAG_DF)
if mode == 'nosr':
    step('read with DF without structured replies', h.pread, 512, 0, nbd.CMD_FLAG_DF)
# The refused writes above carried payloads; the stream is still in sync:
write('write 512 at 14 MiB after refused writes', 512, 14 * MiB)

# -- final image -------------------------------------------------------------
hashes = []
for mib in range(S // MiB):
    data = bytearray(h.pread(MiB, mib * MiB))
    mask = undefined[mib * MiB:(mib + 1) * MiB]
    i = mask.find(1)
    while i != -1:
        j = mask.find(0, i)
        j = len(mask) if j == -1 else j
        data[i:j] = b'\xee' * (j - i)
        i = mask.find(1, j)
    hashes.append([mib, hashlib.sha256(data).hexdigest()[:16]])
h.shutdown()
print(json.dumps({'steps': steps, 'hashes': hashes, 'undefined_bytes': undefined.count(1)}))
