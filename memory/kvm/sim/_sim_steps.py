"""Step-wise model of one write fault and one KVM_GET_DIRTY_LOG.

The write fault runs the real fault code of
:class:`memory.kvm.sim.simulated.SimKVM`: the leaf phases of the slow path
(:meth:`SimKVM._leaf_phases`: rmap add, set spte, mark dirty) and the
fast page fault (:meth:`SimKVM._fast_phases`: the cmpxchg, mark dirty) are
generators that the vectorised path runs through and this model steps,
one atomic action per ``next()``, yielding a :class:`SimStep` per action.
The upper-level walk (table links, push-down one level per step, and its
broken ``upper_first`` variant) is stepped here level by level with the
same Mmu primitives (create, spte_write, load_tables) that the vectorised
walk applies a level at a time; GET is stepped word by word with the
same rmap protect primitive.  A test can then run a fault and a GET
under every interleaving of their steps (tests/unit/test_sim_ordering.py).

The model deliberately does not enforce mmu_lock between the two: GET's
rmap walk may interleave with the mapping path, as in the 2013 lockless
write protection.  That is the strongest setting for the ordering rules;
with the lock, the possible interleavings are a subset.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from ._sim_mmu import (
    SPTE_MMU_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    UPPER_LINK,
    get_write_protect_all_gen,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from numpy.typing import NDArray

    from .simulated import SimKVM, _MemSlot

#: the correct order and the broken ones the ordering rules forbid: the
#: dirty bit before the spte is writable (rule 1), before the rmap add
#: (rule 2), and a push-down that makes the upper entry writable before it
#: protects the child table (rule 6)
ORDERS = ("spte_first", "dirty_first", "dirty_before_rmap", "upper_first")
#: the leaf and fast-path phases take the order as the real code's code
#: (memory.kvm.sim._sim_shm.FAULT_ORDERS); upper_first concerns the walk only
_ORDER_CODE = {"spte_first": 0, "dirty_first": 1, "dirty_before_rmap": 2, "upper_first": 0}



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
    ((ms, _, _),) = kvm._resolve(0, np.array([gfn], dtype=np.int64), write=True)
    return _write_fault(kvm, ms, gfn, vcpu, order, value)


def _leaf(kvm: SimKVM, g: NDArray[np.int64]) -> tuple[int, int]:
    mmu = kvm._mmus[0]
    li = int(mmu.leaf_index(g)[0])
    return li, (int(mmu.levels[1].flat[li]) if li >= 0 else 0)


def _write_fault(kvm: SimKVM, ms: _MemSlot, gfn: int, vcpu: int, order: str, value: int | None) -> Iterator[SimStep]:
    actor = f"vcpu{vcpu}"
    mmu = kvm._mmus[0]
    stats = kvm._stats
    g = np.array([gfn], dtype=np.int64)
    one = (gfn,)

    while True:
        if kvm._reload[vcpu] & 1:
            kvm._enter_guest(vcpu, 0)
            yield SimStep(actor, "load_root", one)
        uppers = [int(fl[0]) for fl in mmu.upper_flags(g)]
        slow = any(fl & int(UPPER_LINK) != int(UPPER_LINK) for fl in uppers)
        li, f = _leaf(kvm, g)
        present = bool(f & int(SPTE_PRESENT))
        if not slow and present and f & int(SPTE_WRITABLE):
            pass  # spurious fault (stale TLB): nothing to fix
        elif not slow and present and f & int(SPTE_MMU_WRITABLE):
            # fast_page_fault: the real code's phases (cmpxchg W in, then
            # mark_page_dirty: rule 1), one step each
            out: list = [None]
            for phase in kvm._fast_phases(mmu, [(ms, 0, 1)], g, np.array([li], dtype=np.int64),
                                          np.array([f], dtype=np.uint8), np.zeros(1, dtype=np.int64),
                                          _ORDER_CODE[order], out):
                yield SimStep(actor, phase, one)
        else:
            # the slow path (__direct_map under mmu_lock)
            stats["mmu_lock_acquisitions"] += 1
            indicator = kvm._indicator
            for level in (4, 3, 2):
                lev = mmu.levels[level]
                e = gfn >> lev.shift
                row = int(lev.lookup(np.array([e >> 9]))[0])
                fi = np.array([row * 512 + (e & 511)])
                fl = int(lev.flat[fi[0]])
                child = mmu.levels[level - 1]
                if not fl & int(SPTE_PRESENT):
                    child.create(np.array([e]), get_write_protect_all_gen(indicator))
                    mmu.spte_write(level, fi, np.array([UPPER_LINK]))
                    stats["tables_created"] += 1
                    yield SimStep(actor, f"link_table_l{level}", one)
                elif not fl & int(SPTE_WRITABLE):
                    stats["faults_push_down"] += 1
                    child_rows = child.lookup(np.array([e]))
                    if order == "upper_first":
                        # broken: the entry is writable while its child table
                        # still holds the writable entries of the old generation
                        mmu.spte_write(level, fi, np.array([fl | int(SPTE_WRITABLE)], dtype=np.uint8))
                        yield SimStep(actor, f"push_down_upper_l{level}", one)
                        if mmu.load_tables(level - 1, child_rows, indicator).any():
                            stats["tlb_flushes"] += 1
                        yield SimStep(actor, f"load_child_l{level}", one)
                        continue
                    # rule 6: protect the child, then make this entry writable
                    # (one step: both happen under mmu_lock, and no walker
                    # can use the entry before it is writable)
                    if mmu.load_tables(level - 1, child_rows, indicator).any():
                        stats["tlb_flushes"] += 1
                    mmu.spte_write(level, fi, np.array([fl | int(SPTE_WRITABLE)], dtype=np.uint8))
                    yield SimStep(actor, f"push_down_l{level}", one)
            # the leaf: the real slow path's phases ([rmap add], set spte,
            # mark dirty in the rules' order), one step each
            li, f = _leaf(kvm, g)
            out = [0]
            for phase in kvm._leaf_phases(mmu, ms, g, np.array([li], dtype=np.int64), np.ones(1, dtype=np.bool_),
                                          _ORDER_CODE[order], out):
                yield SimStep(actor, phase, one)
        # the store retires only through a writable translation; a pending
        # reload that will protect the root is served before the guest runs
        li, f = _leaf(kvm, g)
        if f & int(SPTE_WRITABLE) and mmu.path_writable(g)[0] and not kvm._vcpu_root_protected(vcpu, 0):
            page = ms.pages[gfn - ms.base_gfn]
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
    words = ms.dirty
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
