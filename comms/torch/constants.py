"""The torch seam's constants: the backend's name, the devices it registers and serves, the
inline limit and the shutdown grace. Imports nothing, so it loads without torch."""

BACKEND_NAME = "topocomm"
# Devices handed to register_backend (torch's default-device map); "cuda" joins once the
# plan has algorithms for CUDA buffers.
DEVICES: tuple = ("cpu",)
# Devices whose tensors the seam hands to the Communicator. torch sends this group every
# device's tensors (a Python ProcessGroup serves them all), so CUDA tensors come here even
# though "cuda" is not registered yet: the Communicator's plan says which collectives
# have an algorithm for them (comms/plan/select.py check_memory), on every rank alike.
MEMORY_DEVICES: tuple = ("cpu", "cuda")
# Operations whose payload is below this run on the caller's thread when nothing is queued.
INLINE_MAX_BYTES = 256 << 10
# How long shutdown waits for queued work beyond the Communicator's own timeout.
SHUTDOWN_GRACE_S = 5.0
