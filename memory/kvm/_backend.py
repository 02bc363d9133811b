"""The small interface between QEMU's KVM glue and a KVM implementation.

Two backends implement :class:`KvmVM`: the simulated KVM
(:mod:`memory.kvm.sim.simulated`) and real KVM through ioctls on ``/dev/kvm``
(:mod:`memory.kvm.real`).  Both raise :class:`OSError` with the errno the
kernel would return (``EINVAL``, ``ENOENT``, ``EEXIST``, ``ENXIO``,
``ENOTTY``...), so the KVM listener handles them exactly as ``kvm-all.c``
handles ``-errno``.

The methods mirror ioctls one to one:

=============================  ==============================================
method                         ioctl
=============================  ==============================================
``check_extension(cap)``       ``KVM_CHECK_EXTENSION`` on the VM fd
``enable_cap(cap, *args)``     ``KVM_ENABLE_CAP``
``set_user_memory_region(r)``  ``KVM_SET_USER_MEMORY_REGION``
``get_dirty_log(slot, bm, f)`` ``KVM_GET_DIRTY_LOG`` (``flags`` = the 2017
                               series' ``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT``)
``clear_dirty_log(...)``       ``KVM_CLEAR_DIRTY_LOG`` (manual protect)
``write_protect_all(enable)``  ``KVM_WRITE_PROTECT_ALL_MEM`` (2017 series;
                               ``ENOTTY`` where absent, as on real KVM)
``reset_dirty_rings()``        ``KVM_RESET_DIRTY_RINGS``
``harvest_dirty_rings()``      reading every vCPU's dirty ring (user space)
=============================  ==============================================

Slot ids are ``slot | as_id << 16`` as in the uapi.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class UserMemoryRegion:
    """``struct kvm_userspace_memory_region``.

    ``host`` is the uint8 numpy view of the backing memory (its address is
    ``userspace_addr``); ``memory_size == 0`` deletes the slot.
    """

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    host: np.ndarray | None = None

    @property
    def userspace_addr(self) -> int:
        return 0 if self.host is None else int(self.host.ctypes.data)


@runtime_checkable
class KvmVM(Protocol):
    """A VM as the memory listener sees it.  See the module docstring."""

    #: host page size used for dirty bitmaps (4096 on x86)
    page_size: int

    def check_extension(self, cap: int) -> int: ...

    def enable_cap(self, cap: int, *args: int) -> None: ...

    def set_user_memory_region(self, region: UserMemoryRegion) -> None: ...

    def get_dirty_log(self, slot: int, bitmap: np.ndarray, flags: int = 0) -> None:
        """Fill ``bitmap`` (uint64 words, ALIGN(npages, 64) bits, little-endian)."""

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: np.ndarray) -> None:
        """``bitmap`` bit 0 is ``first_page``; only set bits are cleared and re-protected."""

    def write_protect_all(self, enable: bool) -> None: ...

    def statistics(self) -> dict[str, int]:
        """Counters (names are backend-specific; see each backend)."""
