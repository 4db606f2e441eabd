"""Emulated hosts: machine memory, a frame allocator, a Xen-style hypervisor and its domains.

Everything here except `nodes.host.service` (the Ray actor wrapper) is pure Python + numpy, so the
model is fast to test without Ray.
"""
