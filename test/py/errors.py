"""Error replies, with libnbd's client-side checks off so the server decides.

usage: errors.py URI (writable|readonly)
"""
import sys

import nbd
from common import emit, handle, outcome

uri, mode = sys.argv[1], sys.argv[2]
h = handle(strict=False)
h.connect_uri(uri)
size = h.get_size()
r = {}
if mode == 'writable':
    r['pread past end'] = outcome(h.pread, 512, size)
    r['pread crossing end'] = outcome(h.pread, 1024, size - 512)
    r['pwrite past end'] = outcome(h.pwrite, bytes(512), size)
    r['pwrite crossing end'] = outcome(h.pwrite, bytes(1024), size - 512)
    r['zero past end'] = outcome(h.zero, 4096, size)
    r['trim past end'] = outcome(h.trim, 4096, size)
    r['cache past end'] = outcome(h.cache, 4096, size)
    r['zero-length pread'] = outcome(h.pread, 0, 0)
    r['pread with unknown flag bit 7'] = outcome(h.pread, 512, 0, 1 << 7)
    r['pwrite with unknown flag bit 9'] = outcome(h.pwrite, bytes(512), 0, 1 << 9)
    r['trim with FAST_ZERO'] = outcome(h.trim, 4096, 0, nbd.CMD_FLAG_FAST_ZERO)
    r['pwrite with NO_HOLE'] = outcome(h.pwrite, bytes(512), 0, nbd.CMD_FLAG_NO_HOLE)
    r['pread with REQ_ONE'] = outcome(h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
    r['flush with FUA'] = outcome(h.flush, nbd.CMD_FLAG_FUA)
    r['pread with DF'] = outcome(h.pread, 65536, 0, nbd.CMD_FLAG_DF)
    r['zero with FAST_ZERO'] = outcome(h.zero, 65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    # The connection is still usable after all of that.
    h.pwrite(b'\x42' * 512, 0)
    r['read after errors'] = 'OK' if h.pread(512, 0) == b'\x42' * 512 else 'MISMATCH'
elif mode == 'readonly':
    r['read_only flag'] = 'OK' if h.is_read_only() else 'NOT READ-ONLY'
    r['pwrite'] = outcome(h.pwrite, bytes(512), 0)
    r['pwrite with FUA'] = outcome(h.pwrite, bytes(512), 0, nbd.CMD_FLAG_FUA)
    r['zero'] = outcome(h.zero, 4096, 0)
    r['trim'] = outcome(h.trim, 4096, 0)
    r['pread'] = outcome(h.pread, 512, 0)
    r['flush'] = outcome(h.flush)
else:
    raise SystemExit('unknown mode ' + mode)
h.shutdown()
emit(r)
