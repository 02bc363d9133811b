"""KVM behind one small interface (:class:`KvmVM`), with two backends."""

from ._backend import KvmVM, UserMemoryRegion
from . import linux_kvm

__all__ = ["KvmVM", "UserMemoryRegion", "linux_kvm"]
