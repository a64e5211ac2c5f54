"""The torch seam's constants: the backend's name, the devices it registers and serves, the
inline limit and the shutdown grace. Imports nothing, so it loads without torch."""

BACKEND_NAME = "topocomm"
# Devices handed to register_backend (torch's default-device map).
DEVICES: tuple = ("cpu", "cuda")
# Devices whose tensors the seam hands to the Communicator. torch sends this group every
# device's tensors (a Python ProcessGroup serves them all); the Communicator's plan says
# how each collective moves them, or refuses them by name on every rank alike
# (comms/plan/select.py check_memory).
MEMORY_DEVICES: tuple = ("cpu", "cuda")
# Operations whose payload is below this run on the caller's thread when nothing is queued.
INLINE_MAX_BYTES = 256 << 10
# How long shutdown waits for queued work beyond the Communicator's own timeout.
SHUTDOWN_GRACE_S = 5.0
