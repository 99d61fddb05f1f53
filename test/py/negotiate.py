"""Option negotiation in libnbd's opt mode: LIST, INFO vs GO, LIST_META_CONTEXT.

usage: negotiate.py URI
"""
import sys

import nbd
from common import block_sizes, emit, flags_of, outcome

uri = sys.argv[1]
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)  # ask for NAME and DESCRIPTION in INFO/GO
h.connect_uri(uri)
out = {'protocol': h.get_protocol(), 'sr': h.get_structured_replies_negotiated()}

exports = []
h.opt_list(lambda name, desc: exports.append([name, desc]) or 0)
out['list'] = exports

meta_all = []
out['list_meta_all_count'] = h.opt_list_meta_context(lambda name: meta_all.append(name) or 0)
out['list_meta_all'] = meta_all

h.add_meta_context('base:')
meta_base = []
out['list_meta_base_count'] = h.opt_list_meta_context(lambda name: meta_base.append(name) or 0)
out['list_meta_base'] = meta_base
h.clear_meta_contexts()
h.add_meta_context('x-no-such-namespace:thing')
meta_none = []
out['list_meta_unknown_count'] = h.opt_list_meta_context(lambda name: meta_none.append(name) or 0)
out['list_meta_unknown'] = meta_none
h.clear_meta_contexts()


def snapshot():
    return {
        'size': h.get_size(),
        'flags': flags_of(h),
        'block_sizes': block_sizes(h),
        'description': h.get_export_description(),
        'canonical_name': h.get_canonical_export_name(),
    }


wanted = h.get_export_name()
h.set_export_name('no-such-export')
out['info_unknown'] = outcome(h.opt_info)
h.set_export_name(wanted)
h.opt_info()
out['info'] = snapshot()
h.opt_go()
out['go'] = snapshot()
out['read_after_go'] = len(h.pread(512, 0))
h.shutdown()
emit(out)
