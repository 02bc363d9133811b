"""The KVM listener's dirty-ring path: reaping every vCPU's ring into the slots.

Dirty ring
==========

With ``dirty_ring=True`` (the VM has the ring enabled before any vCPU) the
listener has ``log_sync_global`` instead of ``log_sync``/``log_clear``:
every sync, even one requested for a single region, reaps every vCPU's ring
(harvest, then ``KVM_RESET_DIRTY_RINGS`` re-protects the pages), marks the
entries in the slots' ``dirty_bmap`` and only then publishes and zeroes each
logged slot's ``dirty_bmap`` - bits are never published before their pages are
re-protected.  ``KVM_GET_DIRTY_LOG`` is never used (ENXIO on a ring VM).

The backend is typed by two Protocols (``memory/kvm/_backend.py``), checked
once when the :class:`RingReaper` is made: a :class:`DirtyRingReaper`
harvests and resets in one call under its own ring lock (real KVM, whose
vCPU threads reap too on ``KVM_EXIT_DIRTY_RING_FULL``); a
:class:`DirtyRingBackend` is harvested, then reset, by us.  Entries are
harvested in ring order, and the reset (re-protection) always precedes
marking the pages in ``dirty_bmap``.

Metered (``memory/_cost.py``): ``Cause.RING_REAP`` around ``reap_dirty_rings``,
or ``Cause.RING_HARVEST`` and ``Cause.RING_RESET`` around the two steps.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from numpy.typing import NDArray

from .._cost import Cause, CostMeter
from .._errors import KVMListenerError
from ._backend import DirtyRingBackend, DirtyRingReaper, KvmVM
from ._slot import KVMSlot


class RingReaper:
    """``kvm_dirty_ring_reap_locked`` over one VM: harvest, then reset.

    Raises:
        KVMListenerError: the VM implements neither ring Protocol.
    """

    __slots__ = ("_reaper", "_backend")

    def __init__(self, kvm: KvmVM) -> None:
        self._reaper: DirtyRingReaper | None = None
        self._backend: DirtyRingBackend | None = None
        if isinstance(kvm, DirtyRingReaper):
            self._reaper = kvm
        elif isinstance(kvm, DirtyRingBackend):
            self._backend = kvm
        else:
            raise KVMListenerError(
                "dirty_ring=True needs a VM with reap_dirty_rings() or harvest_dirty_rings() + "
                "reset_dirty_rings()",
                vm=type(kvm).__name__,
            )

    def __call__(self, meter: CostMeter) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Every vCPU's entries, their pages already re-protected: ``(slots, offsets)``."""
        if self._reaper is not None:
            token = meter.begin(Cause.RING_REAP)
            n = 0
            try:
                slots, offsets, _ = self._reaper.reap_dirty_rings()
                n = len(offsets)
            finally:
                meter.end(Cause.RING_REAP, token, n)
        else:
            assert self._backend is not None
            token = meter.begin(Cause.RING_HARVEST)
            n = 0
            try:
                slots, offsets = self._backend.harvest_dirty_rings()
                n = len(offsets)
            finally:
                meter.end(Cause.RING_HARVEST, token, n)
            if n:
                token = meter.begin(Cause.RING_RESET)
                reset = 0
                try:
                    reset = self._backend.reset_dirty_rings()
                finally:
                    meter.end(Cause.RING_RESET, token, reset)
        return np.asarray(slots, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


def mark_ring_entries(
    slots_of_vm: Iterable[KVMSlot], slots: NDArray[np.int64], offsets: NDArray[np.int64], page_size: int
) -> None:
    """Set each entry's bit in its slot's ``dirty_bmap``; entries for a slot
    that is not ours (another address space, or gone) or past its end are
    dropped.  O(entries), not O(slot size): one OR per word of entries."""
    if not len(offsets):
        return
    by_id = {mem.id: mem for mem in slots_of_vm}
    ids = np.sort(slots)  # (np.unique is ~10x slower than a sort here)
    for sid in ids[np.r_[True, ids[1:] != ids[:-1]]].tolist():
        mem = by_id.get(sid)
        if mem is None or mem.dirty_bmap is None:
            continue  # another address space, or a slot already gone
        offs = offsets[slots == sid]
        offs = np.sort(offs[offs < mem.memory_size // page_size])
        if not offs.size:
            continue
        # repeats are harmless to an OR
        words = offs >> 6
        bits = np.left_shift(np.uint64(1), (offs & 63).astype(np.uint64))
        starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
        mem.dirty_bmap[words[starts]] |= np.bitwise_or.reduceat(bits, starts)
