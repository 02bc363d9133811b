"""KVM memslot bookkeeping: ``KVMSlot`` records and the slot-id allocator.

The KVM listener (``memory/kvm/_listener.py``) maps sections to slots; this
module holds the per-slot record (``include/system/kvm_int.h``'s ``KVMSlot``:
guest range, host view, flags, the listener's cached dirty bitmap) and
:class:`SlotIds`, which hands out the lowest free slot number, as
``kvm_get_free_slot`` does, up to ``KVM_CAP_NR_MEMSLOTS``.
"""

from __future__ import annotations

import heapq

import numpy as np
from numpy.typing import NDArray

from .._errors import KVMListenerError

#: QEMU's default when KVM_CAP_NR_MEMSLOTS answers 0
DEFAULT_NR_SLOTS = 32


class KVMSlot:
    """``KVMSlot`` (include/system/kvm_int.h).  ``ram`` is the host view."""

    __slots__ = (
        "slot",
        "as_id",
        "start_addr",
        "memory_size",
        "ram",
        "ram_start_offset",
        "flags",
        "old_flags",
        "dirty_bmap",
    )

    def __init__(self, slot: int, as_id: int) -> None:
        self.slot = slot
        self.as_id = as_id
        self.start_addr = 0
        self.memory_size = 0
        self.ram: NDArray[np.uint8] | None = None
        self.ram_start_offset = 0
        self.flags = 0
        self.old_flags = 0
        self.dirty_bmap: NDArray[np.uint64] | None = None

    @property
    def id(self) -> int:
        """The ioctl slot id, ``slot | as_id << 16``."""
        return self.slot | (self.as_id << 16)

    def __repr__(self) -> str:
        return (
            f"KVMSlot({self.slot}, gpa=[{self.start_addr:#x}, {self.start_addr + self.memory_size:#x}), "
            f"ram_addr={self.ram_start_offset:#x}, flags={self.flags:#x})"
        )


class SlotIds:
    """Slot numbers of one address space: the lowest free one first.

    Raises ``KVMListenerError`` when all ``nr_slots`` are in use.
    """

    __slots__ = ("nr_slots", "_free", "_next")

    def __init__(self, nr_slots: int) -> None:
        self.nr_slots = nr_slots
        self._free: list[int] = []
        self._next = 0

    def alloc(self, as_id: int) -> KVMSlot:
        if self._free:
            return KVMSlot(heapq.heappop(self._free), as_id)
        if self._next >= self.nr_slots:
            raise KVMListenerError("no free slot available", nr_slots=self.nr_slots)
        self._next += 1
        return KVMSlot(self._next - 1, as_id)

    def free(self, mem: KVMSlot) -> None:
        heapq.heappush(self._free, mem.slot)
