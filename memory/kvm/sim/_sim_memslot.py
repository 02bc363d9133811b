"""Memslots of the simulated KVM: ``struct kvm_memory_slot`` with its rmap and
dirty bitmap, what a flags change or a delete does to the MMU, and small
helpers shared by :mod:`memory.kvm.sim.simulated`."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from . import _sim_shm as S
from .. import linux_kvm as K

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from ._sim_vm import SimVMCore


def err(code: int, msg: str) -> OSError:
    return OSError(code, f"{errno.errorcode.get(code, code)}: {msg}")


class MemSlot:
    """struct kvm_memory_slot (+ its per-slot rmap, as on x86), as one row of
    the shared memslot table (:mod:`._sim_shm`): every process that maps the
    VM sees the same base, flags, rmap and dirty bitmap.

    The VMM changes a row only as :meth:`SimKVM.set_user_memory_region`
    does (the memslot update protocol there); vCPU processes only read the
    row, and set rmap entries / dirty bits as the fault path does.
    """

    __slots__ = ("row", "_t", "e", "as_id", "id", "npages", "pages", "rmap", "_dirty")

    def __init__(self, table: NDArray[np.int64], e: int, pages: NDArray[np.uint8] | None, rmap: NDArray[np.bool_],
                 dirty: NDArray[np.uint64]) -> None:
        self._t = table
        self.e = e
        self.row = table[e]
        slot = int(self.row[S.S_SLOT])
        self.as_id = slot >> 16
        self.id = slot & 0xFFFF
        self.npages = int(self.row[S.S_NPAGES])
        #: (npages, 4096) uint8 view of the host memory, or None
        self.pages: NDArray[np.uint8] | None = pages
        #: memslot->arch.rmap: whether the page's leaf spte is in the rmap
        self.rmap: NDArray[np.bool_] = rmap
        #: memslot->dirty_bitmap (uint64 words); see :attr:`dirty`
        self._dirty: NDArray[np.uint64] = dirty

    base_gfn = S.SharedWord("row", S.S_BASE)
    flags = S.SharedWord("row", S.S_FLAGS)
    userspace_addr = S.SharedWord("row", S.S_HVA)
    snapshot_at = S.SharedWord("row", S.S_SNAPSHOT_AT,
                               "write_protect_all(True) count at the last GET without write protect")

    @property
    def dirty(self) -> NDArray[np.uint64] | None:
        """memslot->dirty_bitmap, or None when the slot does not log."""
        return self._dirty if self.row[S.S_LOGGING] else None

    @property
    def host_pages(self) -> NDArray[np.uint8]:
        """:attr:`pages` of a slot that has host memory (EFAULT otherwise)."""
        if self.pages is None:
            raise err(errno.EFAULT, f"slot {self.id} has no host memory")
        return self.pages

    @property
    def bitmap(self) -> NDArray[np.uint64]:
        """The dirty bitmap's words whether or not the slot logs: for callers
        that checked :attr:`dirty` (KVM_GET_DIRTY_LOG on a logging slot)."""
        return self._dirty

    @property
    def dirty_addr(self) -> int:
        return int(self._dirty.ctypes.data)

    @property
    def nwords(self) -> int:
        return (self.npages + 63) >> 6

    @property
    def logging(self) -> bool:
        return bool(self.row[S.S_LOGGING])


def as_gfns(gfns: ArrayLike) -> NDArray[np.int64]:
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
    out: NDArray[np.int64] = (word_idx[pos >> 6] << 6) + (pos & 63)
    return out


def apply_flags(kvm: SimVMCore, ms: MemSlot, flags: int) -> None:
    """kvm_prepare_memory_region's bitmap + kvm_mmu_slot_apply_flags.

    Order (the memslot update protocol): the new flags and bitmap are
    published and every vCPU has left any access that used the old ones
    (``synchronize_srcu``) BEFORE leaves are write-protected under
    mmu_lock; so no vCPU can make a leaf writable afterwards without seeing
    that the slot logs.
    """
    was_logging = ms.logging
    ms.flags = flags
    if not flags & K.KVM_MEM_LOG_DIRTY_PAGES:
        ms.row[S.S_LOGGING] = 0
        kvm._publish_slots()
        return
    if was_logging:
        kvm._publish_slots()
        return
    d = ms._dirty
    d.fill(0)
    initially_set = bool(kvm._manual & K.KVM_DIRTY_LOG_INITIALLY_SET)
    if initially_set:
        # all ones, and nothing write-protected until CLEARed
        d.fill(np.uint64(0xFFFFFFFFFFFFFFFF))
        if ms.npages & 63:
            d[-1] = np.uint64((1 << (ms.npages & 63)) - 1)
    ms.row[S.S_LOGGING] = 1
    kvm._publish_slots()
    if initially_set:
        return
    # kvm_mmu_slot_remove_write_access (or, with PML,
    # kvm_mmu_slot_leaf_clear_dirty) on every leaf through the rmap
    with kvm._mmu_lock:
        pages = np.flatnonzero(ms.rmap)
        if pages.size == 0:
            return
        mmu = kvm._mmus[ms.as_id]
        leaves = mmu.leaf_index(ms.base_gfn + pages)
        n = mmu.clear_dirty_leaves(leaves) if kvm.pml else mmu.protect_leaves(leaves)
        if n:
            kvm._flush_remote_tlbs()


def zap_slot(kvm: SimVMCore, ms: MemSlot) -> None:
    """kvm_arch_flush_shadow_memslot: drop every leaf of the slot (mmu_lock)."""
    with kvm._mmu_lock:
        pages = np.flatnonzero(ms.rmap)
        if pages.size == 0:
            return
        mmu = kvm._mmus[ms.as_id]
        # rule 7: clear the spte, then drop it from the rmap
        mmu.zap_leaves(mmu.leaf_index(ms.base_gfn + pages))
        ms.rmap[pages] = False
        kvm._flush_remote_tlbs()
