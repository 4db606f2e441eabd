"""Memory-dirtying workloads that guests run on a vCPU thread inside their host actor."""
