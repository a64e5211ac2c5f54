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
