"""Experiment, not product code: the ``roomcast-*-gc`` servers put this directory on
PYTHONPATH, so every interpreter of the server (Hypercorn's parent and its spawned worker)
starts with a higher gen-0 GC threshold. Under a 1,000-member fan-out, CPython's cyclic GC
runs often (every ~700 net allocations) and each older-generation pass walks every
connection's tasks, frames and streams; raising the threshold measures what that costs.
"""

import gc

gc.set_threshold(100_000, 50, 1000)
