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

The dirty ring is an optional capability, typed as two Protocols the KVM
listener checks with ``isinstance`` once, when it is created with
``dirty_ring=True``: :class:`DirtyRingReaper` (``reap_dirty_rings()``: harvest
and reset in one call, under the backend's own ring lock - real KVM, whose
vCPU threads also reap on ``KVM_EXIT_DIRTY_RING_FULL``) is preferred over
:class:`DirtyRingBackend` (``harvest_dirty_rings()`` then
``reset_dirty_rings()`` - the simulator).

``statistics()`` returns a frozen :class:`KvmStatistics` record: a read-only
mapping of counter names (backend-specific) to integers, with
:meth:`KvmStatistics.to_dict` for JSON (``x-query-accel-stats``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
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


@dataclass(frozen=True, slots=True, eq=False)
class KvmStatistics(Mapping[str, int]):
    """A backend's counters at one instant (``KvmVM.statistics()``).

    A frozen record that reads as a mapping (``stats["faults_fast"]``); the
    names are the backend's (see each backend's ``statistics``).  Two
    records compare equal when they hold the same counters.
    """

    counters: Mapping[str, int]

    def __post_init__(self) -> None:
        # a private copy behind a read-only view: the record never changes
        object.__setattr__(self, "counters", MappingProxyType({str(k): int(v) for k, v in self.counters.items()}))

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.counters)

    def __len__(self) -> int:
        return len(self.counters)

    def __repr__(self) -> str:
        return f"KvmStatistics({dict(self.counters)!r})"

    def to_dict(self) -> dict[str, int]:
        """A plain ``dict`` copy (JSON, ``x-query-accel-stats``' ``"kvm"``)."""
        return dict(self.counters)

    def delta(self, earlier: Mapping[str, int]) -> dict[str, int]:
        """``self - earlier`` for every counter of ``self`` (missing in ``earlier``: 0)."""
        return {k: v - earlier.get(k, 0) for k, v in self.counters.items()}


def kvm_statistics_dict(stats: Mapping[str, int]) -> dict[str, int]:
    """``statistics()`` of any backend (a record, or a test fake's dict) as a dict."""
    return stats.to_dict() if isinstance(stats, KvmStatistics) else {str(k): int(v) for k, v in stats.items()}


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

    def statistics(self) -> Mapping[str, int]:
        """Counters (names are backend-specific; see each backend); the
        backends return a :class:`KvmStatistics`."""


@runtime_checkable
class DirtyRingBackend(Protocol):
    """A VM whose dirty ring userspace harvests and resets in two steps."""

    def harvest_dirty_rings(self) -> tuple[np.ndarray, np.ndarray]:
        """Every vCPU's published entries, marked RESET: ``(slots, offsets)``
        (uint32 ``slot | as_id << 16``, uint64 page offsets in the slot).
        The caller must :meth:`reset_dirty_rings` before it reads the pages."""
        ...

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-protect the harvested pages, recycle
        the entries; returns the number reset."""
        ...


@runtime_checkable
class DirtyRingReaper(Protocol):
    """A VM that harvests and resets its dirty rings in one call."""

    def reap_dirty_rings(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Harvest then reset, atomically with respect to other reapers:
        ``(slots, offsets, reset_count)``."""
        ...
