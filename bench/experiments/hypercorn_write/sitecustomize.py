"""Experiment, not product code: the ``roomcast-trio*-hypercorn-write`` servers put this
directory on PYTHONPATH, so the Trio worker of ``python -m roomcast`` (master and spawned
worker alike) keeps Hypercorn's own write path (``TCPServer.protocol_send``: a lock, a
shield and two passes of the scheduler per frame) instead of ``roomcast.launcher.trio_write``.
It measures, in the same run, what the direct write path is worth.
"""

from roomcast.launcher import trio_write

trio_write.SUPPORTED = False
