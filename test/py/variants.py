"""Handshake variants a real client may choose.

usage: variants.py URI (nonfixed|nosr)
  nonfixed: set_handshake_flags(0): no FIXED_NEWSTYLE, no NO_ZEROES, so only
            EXPORT_NAME is possible and the server must send the 124 zeroes.
  nosr:     set_request_structured_replies(False): simple replies only.
"""
import os
import sys

import nbd
from common import emit, flags_of

uri, mode = sys.argv[1], sys.argv[2]
h = nbd.NBD()
if mode == 'nonfixed':
    h.set_handshake_flags(0)
elif mode == 'nosr':
    h.set_request_structured_replies(False)
else:
    raise SystemExit('unknown mode ' + mode)
h.connect_uri(uri)
data = os.urandom(65536)
offset = 3 * 1024 * 1024 + 512
h.pwrite(data, offset)
back = h.pread(len(data), offset)
# A read that spans written data and never-written space: the latter reads as zeroes.
mixed = h.pread(131072, offset)
emit({
    'protocol': h.get_protocol(),
    'sr': h.get_structured_replies_negotiated(),
    'size': h.get_size(),
    'flags': flags_of(h),
    'read_back_equal': back == data,
    'mixed_equal': mixed == data + bytes(131072 - len(data)),
})
h.shutdown()
