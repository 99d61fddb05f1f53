# One client of the history test (test/cluster-history.test.ts), with python3-libnbd: until the
# stop file appears, write a value no other write uses to a random block (4 KiB of one 8-byte
# value), or read a block. One line per completed operation, on CLOCK_MONOTONIC in microseconds
# (the same clock in every process of the machine):
#
#   w BLOCK VALUE INV END ok|err [message]
#   r BLOCK VALUE INV END ok|torn|err [message]
#
# With --final, read every block once and print `r BLOCK VALUE 0 0 ok|torn`.
import os
import random
import sys
import time

import nbd

BS = 4096


def now():
    return time.monotonic_ns() // 1000


def value_of(data):
    v = int.from_bytes(data[:8], 'little')
    return v, data == data[:8] * (BS // 8)


def main():
    uri, client, seed, blocks, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    h = nbd.NBD()
    h.connect_uri(uri)
    if stop == '--final':
        for b in range(blocks):
            v, whole = value_of(h.pread(BS, b * BS))
            print('r', b, v, 0, 0, 'ok' if whole else 'torn', flush=True)
        return
    rng = random.Random(seed)
    seq = 0
    while not os.path.exists(stop):
        b = rng.randrange(blocks)
        if rng.random() < 0.7:
            seq += 1
            v = client * 2**32 + seq
            t0 = now()
            try:
                h.pwrite(v.to_bytes(8, 'little') * (BS // 8), b * BS)
                print('w', b, v, t0, now(), 'ok', flush=True)
            except nbd.Error as e:
                print('w', b, v, t0, now(), 'err', str(e).replace('\n', ' '), flush=True)
        else:
            t0 = now()
            try:
                v, whole = value_of(h.pread(BS, b * BS))
                print('r', b, v, t0, now(), 'ok' if whole else 'torn', flush=True)
            except nbd.Error as e:
                print('r', b, 0, t0, now(), 'err', str(e).replace('\n', ' '), flush=True)


main()
