"""Introspection and invariant checks for :class:`memory.kvm.sim.SimKVM` (test-only).

Used by the unit and property tests: call ``check_invariants(kvm)`` after
any operation.  They read the simulator's private state (its MMU tables,
memslots and write-protect-all indicator), which is why they live with the
tests and not in the shipped package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from memory.kvm.sim._sim_mmu import (
    ROOT_LEVEL,
    SPTE_DIRTY,
    SPTE_ENT_NR,
    SPTE_MMU_WRITABLE,
    SPTE_POSSIBLY_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    Mmu,
    get_write_protect_all_gen,
    is_write_protect_all_enabled,
)

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from memory.kvm.sim import SimKVM

_ONE64 = np.uint64(1)


@dataclass(frozen=True, slots=True)
class SpteInfo:
    """The state of one gfn's leaf spte (debugging and tests)."""

    present: bool
    writable: bool
    mmu_writable: bool
    dirty_bit: bool
    possibly_writable: bool
    in_rmap: bool
    #: every upper entry on the path is present and writable
    path_writable: bool
    #: some vCPU could store without faulting (leaf and path writable, and
    #: not every vCPU has to reload a root that the reload will protect)
    effectively_writable: bool
    #: the page's bit in the slot's live dirty bitmap (False if not logging)
    dirty_logged: bool


def _root_protected_for_all(kvm: SimKVM, as_id: int) -> bool:
    """Every vCPU must reload a root that the reload will protect."""
    return all(kvm._vcpu_root_protected(v, as_id) for v in range(kvm.nr_vcpus))


def inspect_spte(kvm: SimKVM, gfn: int, *, as_id: int = 0) -> SpteInfo:
    """The state of ``gfn``'s leaf spte, rmap entry and dirty bit."""
    mmu = kvm._mmus[as_id]
    g = np.array([gfn], dtype=np.int64)
    li = int(mmu.leaf_index(g)[0])
    f = int(mmu.levels[1].flat[li]) if li >= 0 else 0
    path = bool(mmu.path_writable(g)[0])
    ms = None
    bases, ends, objs = kvm._layout[as_id]
    k = int(np.searchsorted(bases, gfn, side="right")) - 1
    if k >= 0 and gfn < ends[k]:
        ms = objs[k]
    idx = gfn - ms.base_gfn if ms is not None else 0
    w = bool(f & int(SPTE_WRITABLE))
    return SpteInfo(
        present=bool(f & int(SPTE_PRESENT)),
        writable=w,
        mmu_writable=bool(f & int(SPTE_MMU_WRITABLE)),
        dirty_bit=bool(f & int(SPTE_DIRTY)),
        possibly_writable=bool(f & int(SPTE_POSSIBLY_WRITABLE)),
        in_rmap=bool(ms is not None and ms.rmap[idx]),
        path_writable=path,
        effectively_writable=w and path and not _root_protected_for_all(kvm, as_id),
        dirty_logged=bool(ms is not None and ms.dirty is not None and (int(ms.dirty[idx >> 6]) >> (idx & 63)) & 1),
    )


def sim_state(kvm: SimKVM) -> dict[str, Any]:
    """Canonical state: tables by id (so creation order does not matter),
    rmaps, bitmaps, the write-protect-all indicator, reload requests."""
    return {
        "mmu": [mmu_snapshot(m) for m in kvm._mmus],
        "slots": {
            k: (s.base_gfn, s.flags, s.rmap.copy(), None if s.dirty is None else s.dirty.copy())
            for k, s in sorted(kvm._slots.items())
        },
        "indicator": kvm._indicator,
        "reload": list(kvm._reload),
    }


def check_invariants(kvm: SimKVM, *, dirty_log: bool = True) -> None:
    """Raise AssertionError (with evidence) if the simulated state is inconsistent.

    Structural: the table invariants of :func:`check_mmu` (possible-writable
    bitmaps and counters match the entries, W implies mmu-writable, tables
    exist exactly under present entries); a leaf is present iff it is in its
    slot's rmap, and only inside slots; no dirty bit past a slot's end.

    ``dirty_log``: Marcelo's rule at rest (the vectorised paths leave no
    fault in flight): every page of a logged slot that some vCPU could write
    without faulting has its bit set, unless its slot has an outstanding
    snapshot (a GET without write protect not yet followed by
    write_protect_all(True): those pages are in the snapshot, rule 4).  With
    PML: every leaf whose D bit is set has its bit set.  Not checked after
    write_protect_all(False): disabling stops loads from protecting stale
    tables, so pages that relied on it are no longer tracked (QEMU's draft
    disables it only when logging stops).
    """
    wp_all_off = not is_write_protect_all_enabled(kvm._indicator) and get_write_protect_all_gen(kvm._indicator) > 0
    dirty_log = dirty_log and not wp_all_off
    for as_id, mmu in enumerate(kvm._mmus):
        check_mmu(mmu)
        gfns, flags = present_leaves(mmu)
        bases, ends, objs = kvm._layout[as_id]
        if objs:
            k = np.searchsorted(bases, gfns, side="right") - 1
            inside = (k >= 0) & (gfns < ends[np.maximum(k, 0)])
        else:
            k = np.full(gfns.size, -1, dtype=np.int64)
            inside = np.zeros(gfns.size, dtype=np.bool_)
        if not inside.all():
            raise AssertionError(f"as {as_id}: leaf for gfn {int(gfns[~inside][0]):#x} outside every slot")
        pending = _root_protected_for_all(kvm, as_id)
        for j, ms in enumerate(objs):
            sel = k == j
            idx = gfns[sel] - ms.base_gfn
            if not ms.rmap[idx].all() or int(ms.rmap.sum()) != idx.size:
                raise AssertionError(
                    f"slot {ms.id} (as {as_id}): rmap has {int(ms.rmap.sum())} pages, {idx.size} leaves present"
                )
            if ms.dirty is not None and ms.npages & 63 and int(ms.dirty[-1]) >> (ms.npages & 63):
                raise AssertionError(f"slot {ms.id}: dirty bits past npages {ms.npages}")
            if not dirty_log or ms.dirty is None or ms.snapshot_at == kvm._wp_all_epoch:
                continue
            fl = flags[sel]
            bits = (ms.dirty[idx >> 6] >> (idx & 63).astype(np.uint64)) & _ONE64
            if kvm.pml:
                exposed = (fl & SPTE_DIRTY) != 0
            elif pending:
                continue
            else:
                exposed = ((fl & SPTE_WRITABLE) != 0) & mmu.path_writable(gfns[sel])
            lost = exposed & (bits == 0)
            if lost.any():
                raise AssertionError(
                    f"slot {ms.id} page {int(idx[lost][0])} (gfn {int(gfns[sel][lost][0]):#x}): "
                    f"writable (spte {int(fl[lost][0]):#x}) but not dirty in the bitmap"
                )


def peek_dirty_log(kvm: SimKVM, slot: int) -> NDArray[np.uint64]:
    """A copy of the slot's live dirty bitmap (no ioctl does this)."""
    words = kvm._logged_slot(slot).dirty
    assert words is not None  # _logged_slot raised ENOENT otherwise
    return words.copy()


def present_leaves(mmu: Mmu) -> tuple[NDArray[np.int64], NDArray[np.uint8]]:
    """(sorted gfns, flags) of every present leaf."""
    lev = mmu.levels[1]
    ent = lev.ent[: lev.n]
    r, c = np.nonzero(ent & SPTE_PRESENT)
    gfns = lev.tid[r] * SPTE_ENT_NR + c
    flags = ent[r, c]
    order = np.argsort(gfns, kind="stable")
    return gfns[order], flags[order]


def mmu_snapshot(mmu: Mmu) -> dict[int, tuple[NDArray[np.int64], NDArray[np.uint8], NDArray[np.int64], NDArray[np.int64]]]:
    """Canonical state per level: (table ids, entries, gens, counters), by table id."""
    out = {}
    for level in range(1, ROOT_LEVEL + 1):
        lev = mmu.levels[level]
        rows = lev.rows_of
        out[level] = (lev.ids.copy(), lev.ent[rows].copy(), lev.gen[rows].copy(), lev.pwc[rows].copy())
    return out


def check_mmu(mmu: Mmu) -> None:
    """Structural invariants of the tables (AssertionError with evidence)."""
    for level in range(1, ROOT_LEVEL + 1):
        lev = mmu.levels[level]
        n = lev.n
        ent = lev.ent[:n]
        tid = lev.tid[:n]
        if not np.array_equal(lev.ids, np.sort(tid)) or not np.array_equal(lev.tid[lev.rows_of], lev.ids):
            raise AssertionError(f"level {level}: table directory inconsistent")
        p = (ent & SPTE_PRESENT) != 0
        w = (ent & SPTE_WRITABLE) != 0
        mw = (ent & SPTE_MMU_WRITABLE) != 0
        d = (ent & SPTE_DIRTY) != 0
        pw = (ent & SPTE_POSSIBLY_WRITABLE) != 0
        bad = (w | mw | d | pw) & ~p
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise AssertionError(f"level {level} table {tid[r]:#x} entry {c}: bits {ent[r, c]:#x} on a non-present spte")
        if level == 1:
            bad = w & ~mw
            if bad.any():
                r, c = np.argwhere(bad)[0]
                raise AssertionError(f"leaf gfn {tid[r] * 512 + c:#x}: writable but not mmu-writable ({ent[r, c]:#x})")
        elif (mw | d).any():
            r, c = np.argwhere(mw | d)[0]
            raise AssertionError(f"level {level} table {tid[r]:#x} entry {c}: leaf-only bits on an upper entry")
        expect = p & (w | mw)
        if not np.array_equal(expect, pw):
            r, c = np.argwhere(expect != pw)[0]
            raise AssertionError(
                f"level {level} table {tid[r]:#x} entry {c}: possible_writable bit {bool(pw[r, c])} "
                f"but spte {ent[r, c]:#x} is {'possibly' if expect[r, c] else 'not'} writable"
            )
        counts = pw.sum(axis=1)
        if not np.array_equal(counts, lev.pwc[:n]):
            r = int(np.flatnonzero(counts != lev.pwc[:n])[0])
            raise AssertionError(
                f"level {level} table {tid[r]:#x}: possiable_writable_sptes={lev.pwc[r]} but bitmap has {counts[r]}"
            )
        if level > 1:
            r, c = np.nonzero(p)
            children = np.sort(tid[r] * SPTE_ENT_NR + c)
            if not np.array_equal(children, mmu.levels[level - 1].ids):
                raise AssertionError(f"level {level}: present entries do not match the level {level - 1} tables")
    if mmu.levels[ROOT_LEVEL].n != 1:
        raise AssertionError("more than one root")
