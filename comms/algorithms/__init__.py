"""One module per algorithm family. Each opens with what it does, its steps, the bytes it
moves, its latency terms and where it applies.

    allreduce.py   small (all publish, all reduce) and ring (reduce-scatter + all-gather)
    staged.py      staged copies through each rank's data area: broadcast, allgather,
                   gather, scatter, all-to-all
    p2p.py         send / recv mailboxes
"""
