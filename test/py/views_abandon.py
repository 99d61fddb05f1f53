"""A client that queues many READs and a TRIM of the same bytes, then stops reading replies.

usage: views_abandon.py URI LENGTH

It prints 'queued' once everything is sent, then waits for a line on stdin (or its end) and
exits without reading a single reply.
"""
import os
import sys

import nbd

MiB = 1 << 20
uri, length = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.connect_uri(uri)
bufs = []
for _ in range(2):
    for off in range(0, length, MiB):
        b = nbd.Buffer(MiB)
        bufs.append(b)
        h.aio_pread(b, off)
h.aio_trim(length, 0)
while h.aio_get_direction() & nbd.AIO_DIRECTION_WRITE:
    h.aio_notify_write()  # finish sending, never read
print('queued', flush=True)
sys.stdin.readline()
os._exit(0)
