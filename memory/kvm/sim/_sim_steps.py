"""Step-wise model of one write fault and one KVM_GET_DIRTY_LOG.

The write fault runs the real fault code of
:class:`memory.kvm.sim.simulated.SimKVM`, not a copy: the vectorised write
fault (:meth:`SimKVM._write_phases`: the lockless probe, then the upper
walk of :meth:`memory.kvm.sim._sim_mmu.Mmu.walk_phases` (table links,
push-down one level per step, and its broken ``upper_first`` variant), the
leaf phases of the slow path (:meth:`SimKVM._leaf_phases`: rmap add, set
spte, mark dirty) or the fast page fault (:meth:`SimKVM._fast_phases`: the
cmpxchg, mark dirty)) is a generator that the vectorised path and the vCPU
processes run through and this model steps, one atomic action per
``next()``, yielding a :class:`SimStep` per action.  What only the model
has is the guest around the fault: the root reload at entry, and the
store, which retires only through a writable translation (else the fault
is taken again).  GET is stepped word by word with the same rmap protect
primitive.  A test can then run a fault and a GET under every
interleaving of their steps (tests/unit/test_sim_ordering.py).

The model deliberately does not enforce mmu_lock between the two: GET's
rmap walk may interleave with the mapping path, as in the 2013 lockless
write protection.  That is the strongest setting for the ordering rules;
with the lock, the possible interleavings are a subset.
"""

from __future__ import annotations

import errno
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from ._sim_mmu import SPTE_WRITABLE
from ._sim_shm import FAULT_ORDERS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from numpy.typing import NDArray

    from ._sim_memslot import MemSlot as _MemSlot
    from .simulated import SimKVM

#: the correct order and the broken ones the ordering rules forbid, as the
#: real fault code takes them (:data:`._sim_shm.FAULT_ORDERS`): the dirty
#: bit before the spte is writable (rule 1), before the rmap add (rule 2),
#: and a push-down that makes the upper entry writable before it protects
#: the child table (rule 6)
ORDERS = FAULT_ORDERS


@dataclass(frozen=True, slots=True)
class SimStep:
    """One atomic action: who did it, what, and on which gfns."""

    actor: str
    action: str
    gfns: tuple[int, ...] = ()


def write_fault_steps(kvm: SimKVM, gfn: int, vcpu: int, order: str, value: int | None) -> Iterator[SimStep]:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if kvm.pml:
        raise ValueError("the step model covers write-protection logging, not PML")
    kvm._check_vcpu(vcpu, 0)
    gfn = int(gfn)
    runs = kvm._resolve(0, np.array([gfn], dtype=np.int64), write=True)
    return _write_fault(kvm, runs, gfn, vcpu, order, value)


def _write_fault(kvm: SimKVM, runs: list[tuple[_MemSlot, int, int]], gfn: int, vcpu: int, order: str,
                 value: int | None) -> Iterator[SimStep]:
    actor = f"vcpu{vcpu}"
    mmu = kvm._mmus[0]
    ms = runs[0][0]
    code = FAULT_ORDERS.index(order)
    g = np.array([gfn], dtype=np.int64)
    one = (gfn,)

    while True:
        if kvm._reload[vcpu] & 1:
            kvm._enter_guest(vcpu, 0)
            yield SimStep(actor, "load_root", one)
        # the vectorised write fault itself (probe, walk, leaf or fast
        # phases), stepped without mmu_lock (see the module docstring)
        for phase in kvm._write_phases(0, g, None, runs, code, nullcontext()):
            yield SimStep(actor, phase, one)
        # the store retires only through a writable translation; a pending
        # reload that will protect the root is served before the guest runs
        _, f, pathw = kvm._probe(mmu, g)
        if f[0] & SPTE_WRITABLE and pathw[0] and not kvm._vcpu_root_protected(vcpu, 0):
            page = ms.host_pages[gfn - ms.base_gfn]
            page[0] = (int(page[0]) + 1) & 0xFF if value is None else value
            yield SimStep(actor, "store", one)
            return
        yield SimStep(actor, "store_faulted", one)


def get_dirty_log_steps(kvm: SimKVM, slot: int, bitmap: NDArray[np.uint64], flags: int) -> Iterator[SimStep]:
    if flags & ~K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT or (flags and kvm.pml):
        raise OSError(errno.EINVAL, f"KVM_GET_DIRTY_LOG: bad flags {flags:#x}")
    ms = kvm._logged_slot(slot)
    kvm._check_buffer(bitmap, ms.nwords, "KVM_GET_DIRTY_LOG", exact=True)
    return _get_dirty_log(kvm, ms, bitmap, flags)


def _get_dirty_log(kvm: SimKVM, ms: _MemSlot, bitmap: NDArray[np.uint64], flags: int) -> Iterator[SimStep]:
    actor = "get_dirty_log"
    mmu = kvm._mmus[ms.as_id]
    kvm._stats["dirty_log_calls"] += 1
    words = ms.bitmap  # _logged_slot checked that the slot logs
    buf = np.zeros(words.size, dtype=np.uint64)  # dirty_bitmap_buffer
    if kvm._manual:
        np.copyto(buf, words)
        yield SimStep(actor, "copy_bitmap")
    else:
        write_protect = not flags
        flush = False
        for i in range(words.size):
            mask = int(words[i])  # mask = xchg(&dirty_bitmap[i], 0)
            words[i] = 0
            buf[i] = mask
            pages = np.flatnonzero(np.unpackbits(np.array([mask], dtype=np.uint64).view(np.uint8), bitorder="little"))
            pages = (i << 6) + pages
            yield SimStep(actor, "xchg", tuple(int(p) + ms.base_gfn for p in pages))
            if write_protect and mask:
                flush = True
                pages = pages[ms.rmap[pages]]  # walk the rmap (rule 3)
                mmu.protect_leaves(mmu.leaf_index(ms.base_gfn + pages))
                yield SimStep(actor, "write_protect", tuple(int(p) + ms.base_gfn for p in pages))
        if not write_protect:
            ms.snapshot_at = kvm._wp_all_epoch
        if flush:
            kvm._stats["tlb_flushes"] += 1
            yield SimStep(actor, "flush_tlbs")
    np.copyto(bitmap, buf)
    yield SimStep(actor, "copy_to_user")
