"""Exceptions raised by topocomm."""


class CommError(RuntimeError):
    """A peer died, aborted or did not answer within the timeout, or the group is broken.

    After a CommError raised mid-collective the group cannot be trusted (peers may be at
    different steps): every later call raises at once. Create a new group.
    """


class PeerAbortedError(CommError):
    pass


class PeerDeadError(CommError):
    pass


class CommTimeoutError(CommError, TimeoutError):
    pass


class MessageMismatch(CommError, ValueError):
    """A recv met a message of another size or tag. Messages between a pair are matched in
    order, so the pair is out of step: the group is broken (a CommError), and the cause is
    an argument (a ValueError)."""


def check_tag(tag) -> int:
    """send/recv tags: ints in the range of a C int (torch's), the same on every transport."""
    import operator
    try:
        t = operator.index(tag)
    except TypeError:
        raise TypeError(f"tag: expected an int, got {type(tag).__name__}") from None
    if not -(1 << 31) <= t < (1 << 31):
        raise ValueError(f"tag: must be in [-2**31, 2**31), got {t}")
    return t


class ArgumentMismatch(ValueError):
    """Raised on every rank, before data moves, when ranks' arguments (or the settings that
    decide their algorithms) disagree; the group stays usable."""


class NoAlgorithm(TypeError):
    """No algorithm of this build can run the request on the memory it names (say, CUDA
    buffers before the GPU path exists). Raised before data moves; a TypeError naming the
    argument, like every bad argument."""
