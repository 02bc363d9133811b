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

The vCPU controllers (the simulator's vCPU processes, real KVM's vCPU
threads) report frozen records too: :class:`VCPUControllerStatistics`, the
controller's totals and one :class:`VCPUCounters` per vCPU.  The fields every
accelerator has are typed (``pages_written``, ``run_ns``,
``mmu_lock_wait_ns``, which are ``None`` where the accelerator cannot tell);
the rest are read-only mappings with the backend's names.  Each backend
subclasses both to add its own fields and its ``x-query-accel-stats`` JSON
layout (``to_json``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable

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


def _frozen_counts(counts: Mapping[str, int]) -> Mapping[str, int]:
    """A private copy of ``counts`` behind a read-only view."""
    return MappingProxyType({str(k): int(v) for k, v in counts.items()})


def _json_name(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True, slots=True, kw_only=True)
class VCPUCounters:
    """One vCPU's counters at one instant (an element of
    :attr:`VCPUControllerStatistics.vcpus`).

    ``pages_written``: the pages the guest program wrote (``None``: the
    program does not count, e.g. a real-KVM guest other than ``ab``);
    ``run_ns``: time in the guest (``None``: not measured);
    ``mmu_lock_wait_ns``: time the vCPU waited for the MMU lock (``None``:
    real KVM exposes no such counter); ``faults`` by kind, ``exits`` by exit
    reason and the other ``counters``: read-only, the backend's names.
    """

    index: int
    pages_written: int | None
    run_ns: int | None = None
    mmu_lock_wait_ns: int | None = None
    throttle_sleep_ns: int = 0
    faults: Mapping[str, int] = field(default_factory=dict)
    exits: Mapping[str, int] = field(default_factory=dict)
    counters: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("faults", "exits", "counters"):
            object.__setattr__(self, name, _frozen_counts(getattr(self, name)))

    def to_json(self) -> dict[str, Any]:
        """This vCPU's ``x-query-accel-stats`` object.  The neutral layout
        here; each backend's subclass gives its own."""
        out: dict[str, Any] = {
            "cpu-index": self.index, "pages-written": self.pages_written, "run-ns": self.run_ns,
            "mmu-lock-wait-ns": self.mmu_lock_wait_ns, "throttle-sleep-ns": self.throttle_sleep_ns,
            "faults": dict(self.faults), "exits": dict(self.exits),
        }
        out.update((_json_name(k), v) for k, v in self.counters.items())
        return out


def _total(values: Iterator[int | None]) -> int | None:
    total = 0
    for v in values:
        if v is None:
            return None
        total += v
    return total


@dataclass(frozen=True, slots=True, kw_only=True)
class VCPUControllerStatistics:
    """A vCPU controller's counters at one instant (its ``statistics()``).

    ``vcpus``: one :class:`VCPUCounters` per vCPU, in index order;
    ``throttle_pct``: the cpu-throttle in force; ``counters``: the
    controller's own totals (backend names: e.g. ``stops``,
    ``stop_ns_total``/``_max``/``_last``), ``exits`` summed over the vCPUs.
    """

    vcpus: tuple[VCPUCounters, ...]
    throttle_pct: int = 0
    counters: Mapping[str, int] = field(default_factory=dict)
    exits: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vcpus", tuple(self.vcpus))
        for name in ("counters", "exits"):
            object.__setattr__(self, name, _frozen_counts(getattr(self, name)))

    @property
    def pages_written(self) -> int | None:
        """Pages written by every vCPU (``None`` if one does not count)."""
        return _total(v.pages_written for v in self.vcpus)

    @property
    def run_ns(self) -> int | None:
        """Guest time of every vCPU summed (``None`` if one is not measured)."""
        return _total(v.run_ns for v in self.vcpus)

    @property
    def stops(self) -> int:
        """How many ``vm_stop`` the controller counted (0 if it does not count)."""
        return self.counters.get("stops", 0)

    def controller_json(self) -> dict[str, Any] | None:
        """The controller's totals as JSON (``x-query-accel-stats``'
        ``"vcpu-controller"``), ``None`` for a controller that reports only
        its vCPUs."""
        out: dict[str, Any] = dict(self.counters)
        out["exits"] = dict(self.exits)
        out["throttle_pct"] = self.throttle_pct
        out["smp"] = len(self.vcpus)
        return out

    def to_json(self) -> Any:
        """The whole record as JSON: the totals with the vCPUs' objects
        under ``"vcpus"`` (each backend's subclass may lay it out its own way)."""
        out = self.controller_json() or {}
        out["vcpus"] = [v.to_json() for v in self.vcpus]
        return out


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
