"""Root-only tests of the emulated multi-host cluster (bench/cluster.py): network namespaces,
veth links shaped with tc tbf. Every test skips with the reason unless Cluster.available()."""
