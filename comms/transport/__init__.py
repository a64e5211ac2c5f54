"""Transports move bytes between ranks. Each one gives every rank of a group a mapped
segment per peer (same layout, comms/core/layout.py); algorithms read peers' segments
directly and synchronize through the counters in them.

    threads.py   ranks are threads of one process (unit tests)
    shm.py       ranks are processes on one host (POSIX shared memory)
"""
