"""What is connected to what. For now: host identity and local facts (topology/host.py)."""
from .host import host_id, local_facts  # noqa: F401
