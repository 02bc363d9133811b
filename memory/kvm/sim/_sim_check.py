"""Introspection and invariant checks for :class:`memory.kvm.sim.simulated.SimKVM`.

Used by the unit tests, and meant for property tests: call
``kvm._check_invariants()`` after any operation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._sim_mmu import (
    SPTE_DIRTY,
    SPTE_MMU_WRITABLE,
    SPTE_POSSIBLY_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    get_write_protect_all_gen,
    is_write_protect_all_enabled,
)

if TYPE_CHECKING:
    from .simulated import SimKVM

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


def inspect_spte(kvm: SimKVM, gfn: int, as_id: int) -> SpteInfo:
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
        effectively_writable=w and path and not kvm._root_protected_for_all(as_id),
        dirty_logged=bool(ms is not None and ms.dirty is not None and (int(ms.dirty[idx >> 6]) >> (idx & 63)) & 1),
    )


def state(kvm: SimKVM) -> dict[str, Any]:
    """Canonical state: tables by id (so creation order does not matter),
    rmaps, bitmaps, the write-protect-all indicator, reload requests."""
    return {
        "mmu": [m.snapshot() for m in kvm._mmus],
        "slots": {
            k: (s.base_gfn, s.flags, s.rmap.copy(), None if s.dirty is None else s.dirty.copy())
            for k, s in sorted(kvm._slots.items())
        },
        "indicator": kvm._indicator,
        "reload": list(kvm._reload),
    }


def check_invariants(kvm: SimKVM, *, dirty_log: bool = True) -> None:
    """Raise AssertionError (with evidence) if the simulated state is inconsistent.

    Structural: the table invariants of :meth:`Mmu.check` (possible-writable
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
        mmu.check()
        gfns, flags = mmu.present_leaves()
        bases, ends, objs = kvm._layout[as_id]
        if objs:
            k = np.searchsorted(bases, gfns, side="right") - 1
            inside = (k >= 0) & (gfns < ends[np.maximum(k, 0)])
        else:
            k = np.full(gfns.size, -1, dtype=np.int64)
            inside = np.zeros(gfns.size, dtype=np.bool_)
        if not inside.all():
            raise AssertionError(f"as {as_id}: leaf for gfn {int(gfns[~inside][0]):#x} outside every slot")
        pending = kvm._root_protected_for_all(as_id)
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
