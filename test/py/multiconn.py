"""CAN_MULTI_CONN: write on A (no flush), FLUSH on B, read on C.

usage: multiconn.py URI
"""
import os
import sys

import nbd
from common import emit

uri = sys.argv[1]
hs = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
a, b, c = hs
data = os.urandom(256 * 1024)
offset = 5 * 1024 * 1024 + 4096
before = c.pread(len(data), offset)  # C reads first, so a caching server would have it cached
a.pwrite(data, offset)
b.flush()
after = c.pread(len(data), offset)
emit({
    'multi_conn': [h.can_multi_conn() for h in hs],
    'changed': before != after,
    'c_sees_a_write': after == data,
})
for h in hs:
    h.shutdown()
