"""Errors of the ``memory`` package.

Hierarchy::

    MemoryAPIError                 root: misuse of the memory API or listener
     +-- MemoryRegionError         region tree / transaction misuse (QEMU asserts)
     +-- KVMListenerError          KVM listener configuration or slot exhaustion

Failures of KVM itself are **not** wrapped: they propagate as the ``OSError``
the ioctl raised (errno as the kernel returns it), with a note naming the
slot and range, so callers handle them exactly as kvm-all.c handles ``-errno``.
"""

from __future__ import annotations


class MemoryAPIError(Exception):
    """Root of the memory package's own errors."""


class MemoryRegionError(MemoryAPIError, ValueError):
    """Misuse of the region tree.  ``region`` names the region involved."""

    def __init__(self, msg: str, *, region: str) -> None:
        super().__init__(f"{region}: {msg}")
        self.region = region


class KVMListenerError(MemoryAPIError):
    """A KVM listener cannot do what was asked (mode unavailable, no free
    slot).  ``detail`` carries the evidence (caps, slot counts)."""

    def __init__(self, msg: str, **detail: object) -> None:
        super().__init__(f"{msg} {detail}" if detail else msg)
        self.detail = detail
