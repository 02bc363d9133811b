"""Memslots of the simulated KVM: ``struct kvm_memory_slot`` with its rmap and
dirty bitmap, what a flags change or a delete does to the MMU, and small
helpers shared by :mod:`memory.kvm.simulated`."""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

import numpy as np

from . import linux_kvm as K

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from .simulated import SimKVM


def err(code: int, msg: str) -> OSError:
    return OSError(code, f"{errno.errorcode.get(code, code)}: {msg}")


class MemSlot:
    """struct kvm_memory_slot (+ its per-slot rmap, as on x86)."""

    __slots__ = ("as_id", "id", "base_gfn", "npages", "flags", "userspace_addr", "pages", "dirty", "rmap", "snapshot_at")

    def __init__(self, as_id: int, id_: int, base_gfn: int, npages: int, flags: int, hva: int, pages) -> None:  # noqa: ANN001
        self.as_id = as_id
        self.id = id_
        self.base_gfn = base_gfn
        self.npages = npages
        self.flags = flags
        self.userspace_addr = hva
        #: (npages, 4096) uint8 view of the host memory, or None
        self.pages: NDArray[np.uint8] | None = pages
        #: memslot->dirty_bitmap (uint64 words) or None when not logging
        self.dirty: NDArray[np.uint64] | None = None
        #: memslot->arch.rmap: whether the page's leaf spte is in the rmap
        self.rmap: NDArray[np.bool_] = np.zeros(npages, dtype=np.bool_)
        #: write_protect_all(True) count at the last GET without write protect
        self.snapshot_at = -1

    @property
    def nwords(self) -> int:
        return (self.npages + 63) >> 6

    @property
    def logging(self) -> bool:
        return self.dirty is not None


def as_gfns(gfns) -> NDArray[np.int64]:  # noqa: ANN001
    g = np.asarray(gfns)
    if g.dtype.kind not in "iu":
        raise TypeError(f"gfns must be integers, not {g.dtype}")
    return g.astype(np.int64, copy=False).reshape(-1)


def unique_first(g: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64] | None]:
    """Sorted unique gfns and each one's first position in the batch (None: identity)."""
    if g.size == 1 or bool((g[1:] > g[:-1]).all()):
        return g, None
    # a stable argsort keeps equal gfns in batch order, so the first of each
    # run is the first occurrence (np.unique(return_index=True) does the
    # same, 1.5-3x slower on numpy 2.4)
    order = np.argsort(g, kind="stable")
    gs = g[order]
    keep = np.empty(gs.size, dtype=np.bool_)
    keep[0] = True
    np.not_equal(gs[1:], gs[:-1], out=keep[1:])
    return gs[keep], order[keep].astype(np.int64, copy=False)


def bitmap_pages(words: NDArray[np.uint64], word_idx: NDArray[np.int64]) -> NDArray[np.int64]:
    """Page indices of the set bits of ``words[word_idx]`` (little-endian bit order)."""
    pos = np.flatnonzero(np.unpackbits(words[word_idx].view(np.uint8), bitorder="little"))
    return (word_idx[pos >> 6] << 6) + (pos & 63)


def apply_flags(kvm: SimKVM, ms: MemSlot, flags: int) -> None:
    """kvm_prepare_memory_region's bitmap + kvm_mmu_slot_apply_flags."""
    was_logging = ms.logging
    ms.flags = flags
    if not flags & K.KVM_MEM_LOG_DIRTY_PAGES:
        ms.dirty = None
        return
    if was_logging:
        return
    ms.dirty = np.zeros(ms.nwords, dtype=np.uint64)
    if kvm._manual & K.KVM_DIRTY_LOG_INITIALLY_SET:
        # all ones, and nothing write-protected until CLEARed
        ms.dirty.fill(np.uint64(0xFFFFFFFFFFFFFFFF))
        if ms.npages & 63:
            ms.dirty[-1] = np.uint64((1 << (ms.npages & 63)) - 1)
        return
    # kvm_mmu_slot_remove_write_access (or, with PML,
    # kvm_mmu_slot_leaf_clear_dirty) on every leaf through the rmap
    pages = np.flatnonzero(ms.rmap)
    if pages.size == 0:
        return
    t0 = time.perf_counter_ns()
    mmu = kvm._mmus[ms.as_id]
    leaves = mmu.leaf_index(ms.base_gfn + pages)
    n = mmu.clear_dirty_leaves(leaves) if kvm.pml else mmu.protect_leaves(leaves)
    kvm._unlock(t0)
    if n:
        kvm._stats["tlb_flushes"] += 1

def zap_slot(kvm: SimKVM, ms: MemSlot) -> None:
    """kvm_arch_flush_shadow_memslot: drop every leaf of the slot."""
    pages = np.flatnonzero(ms.rmap)
    if pages.size == 0:
        return
    t0 = time.perf_counter_ns()
    mmu = kvm._mmus[ms.as_id]
    # rule 7: clear the spte, then drop it from the rmap
    mmu.zap_leaves(mmu.leaf_index(ms.base_gfn + pages))
    ms.rmap[pages] = False
    kvm._unlock(t0)
    kvm._stats["tlb_flushes"] += 1
