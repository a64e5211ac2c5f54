"""One module per algorithm family. Each one-host module opens with what it does, its steps,
the bytes it moves, its latency terms, where it applies and what it is best for.

    host/allreduce.py  small (all publish, all reduce) and ring (reduce-scatter + all-gather):
                       all-reduce, reduce, reduce-scatter
    host/pairwise.py   pairwise all-to-all through cache-sized shared slots
    host/direct.py     direct reads of peers' buffers (process_vm_readv): broadcast,
                       allgather, gather, scatter, all-to-all
    host/staged.py     staged copies through each rank's data area: broadcast, allgather,
                       gather, scatter, all-to-all
    host/p2p.py        send / recv mailboxes
    hier.py            groups that span hosts: shared memory inside each host, TCP between
"""
