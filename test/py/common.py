"""Helpers shared by the python3-libnbd probe scripts.

Each script prints one JSON document on stdout; the TypeScript tests assert on
it. Errors from the server are reported by errno name ('EINVAL'), successes as
'OK', so results from two servers can be compared as plain lists.
"""
import json
import sys

import nbd


def outcome(fn, *args, **kwargs):
    """'OK' if fn succeeds, else the errno name the server (or libnbd) gave."""
    try:
        fn(*args, **kwargs)
        return 'OK'
    except nbd.Error as e:
        return e.errno or ('errnum %d: %s' % (e.errnum, e.string))


def flags_of(h):
    """The export's transmission flags as libnbd 1.14 exposes them (it has no get_flags)."""
    return {
        'read_only': h.is_read_only(),
        'flush': h.can_flush(),
        'fua': h.can_fua(),
        'rotational': h.is_rotational(),
        'trim': h.can_trim(),
        'zero': h.can_zero(),
        'fast_zero': h.can_fast_zero(),
        'df': h.can_df(),
        'multi_conn': h.can_multi_conn(),
        'cache': h.can_cache(),
    }


def block_sizes(h):
    return [h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED), h.get_block_size(nbd.SIZE_MAXIMUM)]


def emit(obj):
    json.dump(obj, sys.stdout, sort_keys=True)
    sys.stdout.write('\n')


def handle(strict=True):
    h = nbd.NBD()
    if not strict:
        # Send what we ask for, even if libnbd thinks the server will refuse it:
        # the point is to see the server's own answer.
        h.set_strict_mode(0)
    return h
