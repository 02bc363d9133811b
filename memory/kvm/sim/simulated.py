"""A simulated KVM: memslots, a 4-level direct-map MMU, dirty logging, and the
2017 "KVM: MMU: fast write protect" series (never merged upstream).

Some facts about KVM's dirty logging, and the ordering rules
============================================================

What is simulated.  x86 KVM maps guest-physical pages with a direct-map
(TDP-like) page table of 4 levels of 512 entries; the leaves are *sptes*.
All vCPUs share one root per address space (roots are shared by role).
Dirty logging without PML works by write protection: a page of a logged
slot is mapped read-only, the guest's first write faults, the fault makes
the spte writable and sets the page's bit in the slot's dirty bitmap
(``mark_page_dirty``).  ``KVM_GET_DIRTY_LOG`` takes the bits
(``mask = xchg(&word, 0)`` per word) and write-protects the returned pages
again by walking the *rmap* (gfn -> sptes; the direct map has at most one
leaf per gfn), then flushes TLBs.  That walk is O(dirty pages), under
``mmu_lock``, which every vCPU faulting a page in also needs.

Two fault paths fix a write.  The *fast page fault* (lockless) handles a
present leaf that is read-only but mmu-writable (SPTE_HOST_WRITEABLE |
SPTE_MMU_WRITEABLE): cmpxchg W into it, then ``mark_page_dirty``.  The slow
path (``__direct_map`` under ``mmu_lock``) creates missing tables, maps a
missing leaf (adds it to the rmap, installs the spte, marks the page dirty),
and, with the series, pushes write protection down (below).

The series (patches 2, 3, 5, 6 matter here):

* 2/7 ``possible_writable_spte_bitmap`` + ``possiable_writable_sptes``: per
  table, which entries are *possibly writable* (present and writable, or
  locklessly made writable), kept in step by every spte store.
* 3/7 ``kvm_mmu_write_protect_all_pages``: a global indicator (bit 63 =
  enabled, the rest a generation) and a generation per table.  Enabling
  bumps the generation and asks every vCPU to reload its root: O(1), out of
  ``mmu_lock``.  Loading a table whose generation is stale
  (``mmu_load_shadow_page``) makes its possibly-writable entries read-only:
  upper entries lose W; leaves lose W but keep mmu-writable.  Reads then go
  on untouched; a write meets a read-only *upper* entry, which the fast
  path cannot fix, so the slow path runs ``handle_readonly_upper_spte``:
  load the child table (protecting its entries), THEN make the upper entry
  writable, one level per step down to the leaf.  Tables created meanwhile
  get the current generation (they are empty).  A table with no
  possibly-writable entry is skipped with its generation left stale, so
  after one vCPU loaded an empty root the others still reload it later:
  whether a page is protected by a pending reload is per vCPU.  Disabling
  only clears the enable bit: stale tables stop being protected when
  loaded, so pages that relied on it are no longer tracked.
* 5/7 ``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT``: GET only snapshots and
  clears the bitmap.  Userspace (Paolo, 2017-05-03) does 1) GET without
  write protect for every slot, 2) ``KVM_WRITE_PROTECT_ALL_MEM``, 3) only
  then reads pages named by the snapshot.  A write between 1 and 2 is not
  in the live bitmap, but its page is in the snapshot and is read after 2.
  With PML, 4 KiB tracking uses the spte D bit, not write protection, so the
  capabilities answer 0 (the review's agreement) and the ioctl is ENOTTY.
* 6/7: the fast path only ever fixes a read-only spte, and logs every spte
  it makes writable: no writable spte escapes the log.

The ordering rules (Xiao/Marcelo, 2013-08; Paolo/Xiao, 2017-05).  Marcelo's
rule: *every page is either dirty in the current bitmap or write-protected*.
Xiao's amendment: there is a third case, the window inside a fault between
making the spte writable and setting the dirty bit; it is harmless because
the final, stopped sync happens after every fault has finished.  Stated as
the invariant checked by tests/unit/test_sim_ordering.py, for every page P
of a logged slot, at every instant::

    writable(P)  =>  dirty(P) or in_snapshot(P) or in_fault_window(P)

where writable means the vCPU can store to P without faulting (leaf and all
upper entries writable), in_snapshot means P's bit was taken by a GET whose
pages userspace has not yet copied, and in_fault_window means a vCPU has
made P's spte writable and not yet set P's bit.  The code keeps it with
these rules:

1. Fault paths make the spte writable BEFORE setting the dirty bit
   (fast_pf_fix_direct_spte, set_spte).  Reversed, GET can take the bit
   and protect a still read-only spte; the spte then becomes writable with
   no bit anywhere, and the next writes are lost.
2. A mapping fault adds the spte to the rmap BEFORE setting the dirty bit.
   Reversed, GET takes the bit, walks the rmap, finds nothing to protect;
   the spte then appears writable with no bit.
3. GET takes the bits (xchg) BEFORE write-protecting those pages through
   the rmap, flushes TLBs before returning, and userspace copies pages only
   after GET returns.  A write landing between the xchg and the protection
   is in the snapshot and is copied afterwards.
4. With write-protect-all: GET without write protect for every slot
   BEFORE ``KVM_WRITE_PROTECT_ALL_MEM``, and pages are copied AFTER it.
5. Manual protect: GET copies only; CLEAR clears exactly the bits given
   (``fetch_andnot``) and protects exactly the pages whose bits it
   cleared.  Userspace must CLEAR only bits it has read, and copy pages
   after the CLEAR: a page written (and faulted) between GET and CLEAR has
   its bit set again and is kept by a CLEAR of the read bits, lost by a
   CLEAR of all ones.
6. Push-down protects the child's entries BEFORE making the upper entry
   writable; a writable upper entry over a stale child would expose
   writable leaves that nothing logs (another vCPU's store goes through
   the old generation's writable entries without a fault).  A table
   created after the bump takes the generation current at its creation,
   never a later one, so the next bump finds it stale.
7. Zapping clears the spte BEFORE dropping it from the rmap (drop_spte).

How this simulation realises them.  The tables live in :mod:`._sim_mmu`
(one byte per spte, possible-writable bitmaps and counters, generations),
memslots with their rmap and bitmap in :mod:`._sim_memslot`.  Guest
accesses come in vectorised batches (:meth:`SimKVM.vcpu_write`): one pass
per level over the unique entries of the batch, then the leaves with numpy,
each phase in the rule order (rmap for every new leaf, then every spte,
then every dirty bit); the result equals feeding the pages one at a time,
fault counts included.  The tests' ``check_invariants`` (tests/simkit)
checks the structures and the invariant above at rest.
Python runs one thing at a time, so ``mmu_lock`` is accounted for
(acquisitions, hold time) rather than enforced.  The interleavings the
rules guard against are explored by a step-wise model
(:meth:`SimKVM.write_fault_steps`, :meth:`SimKVM.get_dirty_log_steps`,
module :mod:`._sim_steps`) that performs the same operations one atomic
action per ``next()``.  It lets GET's rmap walk interleave with the
mapping path too, as the 2013 lockless write protection did: that is the
strongest setting; under ``mmu_lock`` the interleavings are a subset.

Deviations, on purpose: 4 KiB pages only (no huge pages, so nothing is
split); one MMU per address space, guest accesses default to as 0;
KVM_CLEAR_DIRTY_LOG requires manual protect (EINVAL otherwise) and
enabling manual protect requires the ENABLE bit, as the project's contract
says (mainline accepts both); GET without write protect takes no
``mmu_lock``; no dirty ring; not thread-safe (one caller at a time, as
trio code is).  Writes to a KVM_MEM_READONLY slot, to a slot
without host memory, or outside every slot raise EFAULT (real KVM exits to
userspace with KVM_EXIT_MMIO for the first).
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from .._backend import UserMemoryRegion
from ._sim_mmu import (
    MAX_GFN,
    SPTE_DIRTY,
    SPTE_MMU_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    WP_ALL_ENABLE_MASK,
    WP_ALL_GEN_MASK,
    Mmu,
    WalkResult,
    get_write_protect_all_gen,
    is_write_protect_all_enabled,
    run_lengths,
    run_starts,
)
from . import _sim_memslot, _sim_steps
from . import _sim_shm as _S
from ._sim_memslot import MemSlot as _MemSlot
from ._sim_memslot import as_gfns as _as_gfns
from ._sim_memslot import bitmap_pages as _bitmap_pages
from ._sim_memslot import err as _err
from ._sim_memslot import unique_first as _unique_first

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager

    from numpy.typing import NDArray

    from ._sim_steps import SimStep

__all__ = ["SimKVM"]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_ADDRESS_SPACE_NUM = 2
_ALL_ROOTS = (1 << KVM_ADDRESS_SPACE_NUM) - 1
_VALID_MEM_FLAGS = K.KVM_MEM_LOG_DIRTY_PAGES | K.KVM_MEM_READONLY
#: pages per chunk when walking large bitmaps (bounds temporaries)
_CHUNK_WORDS = 1 << 14

STAT_NAMES = _S.STAT_NAMES

_MAP_WRITABLE = np.uint8(int(SPTE_PRESENT | SPTE_WRITABLE | SPTE_MMU_WRITABLE))
_MAP_READONLY_MW = np.uint8(int(SPTE_PRESENT | SPTE_MMU_WRITABLE))
_ONE64 = np.uint64(1)
_U64 = np.dtype(np.uint64)


_ZERO_U8 = np.uint8(0)


def _word_masks(idx: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.uint64]]:
    """Sorted unique page indices -> (bitmap word indices, their masks)."""
    n = int(idx.size)
    lo = int(idx[0]) & ~63
    span = int(idx[-1]) + 1 - lo
    if span <= 64 * n:
        # dense: one bool per page of the span, packed little-endian
        b = np.zeros((span + 63) & ~63, dtype=np.bool_)
        b[idx - lo] = True
        packed = np.packbits(b, bitorder="little").view(np.uint64)
        nz = np.flatnonzero(packed)
        return nz + (lo >> 6), packed[nz]
    w = idx >> 6
    bits = np.left_shift(_ONE64, (idx & 63).astype(np.uint64))
    s = run_starts(w)
    return w[s], (bits if s.size == n else np.bitwise_or.reduceat(bits, s))


def _take_words(ms, out: NDArray[np.uint64], quiescent: bool) -> None:  # noqa: ANN001
    """``out[i] = xchg(&dirty_bitmap[i], 0)`` for every word; words read as
    zero are left alone (a bit set after the read stays for the next GET).
    ``quiescent`` (no vCPU process can set a bit meanwhile): a numpy copy +
    fill does the same at numpy speed."""
    if quiescent:
        np.copyto(out, ms.dirty)
        ms.dirty.fill(0)
        return
    out.fill(0)
    nz = np.flatnonzero(ms.dirty.copy())  # vCPUs set bits meanwhile: look at one snapshot
    base = ms.dirty_addr
    xchg8 = _S.xchg8
    for w in nz.tolist():
        out[w] = xchg8(base + 8 * w, 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not running either
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class _Retry(Exception):
    """An access met an invalid memslot (being moved or deleted): retry it."""


class SimKVM:
    """A simulated KVM VM implementing :class:`memory.kvm.KvmVM`, plus vCPUs.

    Args:
        pml: model a host with PML: dirty logging by spte D bits, no
            write-protect-all.
        nr_memslots: KVM_CAP_NR_MEMSLOTS (slot ids per address space).
        nr_vcpus: simulated vCPUs (each has its own root reload request).

    Guest side: :meth:`vcpu_write` / :meth:`vcpu_read` run the fault path
    for a batch of gfns; after ``vcpu_write`` returns, every page of the
    batch is writable and logged, and the caller stores into the host
    memory (:meth:`gfn_to_host`, :meth:`host_pages_for`).
    """

    page_size = PAGE_SIZE

    def __init__(self, *, pml: bool = False, nr_memslots: int = 32764, nr_vcpus: int = 1,
                 params: _S.Params | None = None, _attach: tuple[int, int] | None = None) -> None:
        if nr_vcpus < 1 or not 1 <= nr_memslots <= 0x10000:
            raise ValueError(f"bad nr_vcpus={nr_vcpus} / nr_memslots={nr_memslots}")
        if params is None:
            params = _S.Params(nr_vcpus=nr_vcpus)
        elif params.nr_vcpus != nr_vcpus:
            raise ValueError(f"params.nr_vcpus {params.nr_vcpus} != nr_vcpus {nr_vcpus}")
        #: all state both the VMM and the vCPU processes touch (see _sim_shm)
        if _attach is None:
            self._shm = _S.SharedState.create(params)
            self._owner = True
        else:
            self._shm = _S.SharedState.attach(params, _attach[0])
            self._owner = False
        shm = self._shm
        self._hdr = shm["hdr"]
        if self._owner:
            self._hdr[_S.H_PML] = int(bool(pml))
            self._hdr[_S.H_NR_MEMSLOTS] = int(nr_memslots)
            self._hdr[_S.H_VMM_PID] = os.getpid()
        self.pml = bool(self._hdr[_S.H_PML])
        self.nr_memslots = int(self._hdr[_S.H_NR_MEMSLOTS])
        self.nr_vcpus = int(nr_vcpus)
        #: the statistics row of whoever runs the current operation: the
        #: VMM's row, or a vCPU's while that vCPU accesses memory
        self._vmm_row = self.nr_vcpus
        self._stats = _S.StatRow(shm["stats"], self._vmm_row)
        self._mmu_lock = _S.MmuLock(shm, self._stats)
        self._mmus = [Mmu(self._stats, shm, as_id, 0, create_root=self._owner)
                      for as_id in range(KVM_ADDRESS_SPACE_NUM)]
        #: KVM_REQ_MMU_RELOAD per vCPU: bit ``as_id`` set = that root must be reloaded
        self._reload: NDArray[np.int64] = shm["reload"]
        self._ctl: NDArray[np.int64] = shm["vcpu_ctl"]
        self._slot_table: NDArray[np.int64] = shm["slots"]
        self._bufs: NDArray[np.int64] = shm["bufs"]
        self._slots: dict[int, _MemSlot] = {}
        #: per entry serial -> MemSlot (views are built once per process)
        self._slot_cache: dict[tuple[int, int], _MemSlot] = {}
        #: host memory this process cannot share (plain numpy arrays): entry -> pages
        self._local_pages: dict[int, NDArray[np.uint8]] = {}
        #: host buffers mapped in this process: buffer index -> uint8 view
        self._buf_views: dict[int, NDArray[np.uint8]] = {}
        self._layout: list[tuple[NDArray[np.int64], NDArray[np.int64], list[_MemSlot]]] = [
            (np.empty(0, np.int64), np.empty(0, np.int64), []) for _ in range(KVM_ADDRESS_SPACE_NUM)
        ]
        self._slots_gen_seen = -1
        #: the vCPU this process is (a vCPU process), or None (the VMM)
        self.self_vcpu: int | None = None
        self._sync_slots()

    @property
    def shared_state(self) -> _S.SharedState:
        return self._shm

    # kvm->arch.mmu_write_protect_all_indicator, the write_protect_all(True)
    # count (snapshot bookkeeping) and kvm->manual_dirty_log_protect, shared
    @property
    def _indicator(self) -> int:
        return int(self._hdr[_S.H_INDICATOR]) & 0xFFFFFFFFFFFFFFFF

    @_indicator.setter
    def _indicator(self, v: int) -> None:
        self._hdr[_S.H_INDICATOR] = v - (1 << 64) if v >= 1 << 63 else v

    _wp_all_epoch = _S.SharedWord("_hdr", _S.H_WP_EPOCH)
    _manual = _S.SharedWord("_hdr", _S.H_MANUAL)

    @property
    def fault_order(self) -> str:
        """The fault paths' order (``spte_first``; the others are the broken
        variants the tests must catch).  Shared with the vCPU processes."""
        return _S.FAULT_ORDERS[int(self._hdr[_S.H_FAULT_ORDER])]

    @fault_order.setter
    def fault_order(self, order: str) -> None:
        self._hdr[_S.H_FAULT_ORDER] = _S.FAULT_ORDERS.index(order)

    # ------------------------------------------------------------------
    # capabilities
    # ------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        if cap == K.KVM_CAP_NR_MEMSLOTS:
            return self.nr_memslots
        if cap == K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return K.KVM_DIRTY_LOG_MANUAL_CAPS
        if cap in (K.KVM_CAP_DIRTY_LOG_RING, K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            # the largest ring in bytes this VM's shared layout has room for
            return self._shm.params.ring_entries * K.KVM_DIRTY_GFN_SIZE
        if cap in (K.KVM_CAP_X86_WRITE_PROTECT_ALL_MEM, K.KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT):
            # With PML, 4K tracking uses D bits: the review agreed the caps
            # report 0 so that userspace keeps the classic path.
            return 0 if self.pml else 1
        return 0

    def enable_cap(self, cap: int, *args: int) -> None:
        """KVM_ENABLE_CAP; only KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is known.

        Raises:
            OSError(EINVAL): unknown cap, or args[0] not a subset of
                KVM_DIRTY_LOG_MANUAL_CAPS including ..._PROTECT_ENABLE.
        """
        if cap in (K.KVM_CAP_DIRTY_LOG_RING, K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL):
            self._enable_ring(cap, args[0] if args else 0)
            return
        if cap != K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            raise _err(errno.EINVAL, f"KVM_ENABLE_CAP: cap {cap} not supported")
        arg = args[0] if args else 0
        if arg & ~K.KVM_DIRTY_LOG_MANUAL_CAPS or not arg & K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            raise _err(errno.EINVAL, f"KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): bad args[0]={arg:#x}")
        self._hdr[_S.H_MANUAL] = arg

    @property
    def manual_protect(self) -> bool:
        return bool(self._manual)

    # ------------------------------------------------------------------
    # memslots
    # ------------------------------------------------------------------
    def set_user_memory_region(self, region: UserMemoryRegion) -> None:
        """KVM_SET_USER_MEMORY_REGION: create, delete, move or change flags.

        Raises OSError as __kvm_set_memory_region: EINVAL for unknown flags,
        unaligned size/gpa/host, a bad slot id, deleting a missing slot,
        resizing or re-basing the host of an existing slot, toggling
        KVM_MEM_READONLY, or a gfn past MAXPHYADDR; EEXIST for an overlap
        with another slot of the same address space.  On error nothing
        changes.
        """
        slot, flags = int(region.slot), int(region.flags)
        size, gpa = int(region.memory_size), int(region.guest_phys_addr)
        if flags & ~_VALID_MEM_FLAGS:
            raise _err(errno.EINVAL, f"slot {slot:#x}: unknown flags {flags:#x}")
        if size < 0 or size & (PAGE_SIZE - 1):
            raise _err(errno.EINVAL, f"slot {slot:#x}: memory_size {size:#x} not page aligned")
        if gpa < 0 or gpa & (PAGE_SIZE - 1):
            raise _err(errno.EINVAL, f"slot {slot:#x}: guest_phys_addr {gpa:#x} not page aligned")
        hva = region.userspace_addr
        if hva & (PAGE_SIZE - 1):
            raise _err(errno.EINVAL, f"slot {slot:#x}: userspace_addr {hva:#x} not page aligned")
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if slot < 0 or as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= self.nr_memslots:
            raise _err(errno.EINVAL, f"slot {slot:#x}: as_id {as_id} / id {id_} out of range")
        if gpa + size > 1 << 64:
            raise _err(errno.EINVAL, f"slot {slot:#x}: gpa {gpa:#x} + size {size:#x} wraps")
        old = self._slots.get(slot)
        if size == 0:
            if old is None:
                raise _err(errno.EINVAL, f"slot {slot:#x}: delete of a slot that does not exist")
            self._delete_slot(old)
            return
        pages = None
        if region.host is not None:
            host = region.host
            if host.dtype != np.uint8 or host.ndim != 1 or not host.flags.c_contiguous or host.size < size:
                raise _err(errno.EINVAL, f"slot {slot:#x}: host must be a contiguous uint8 view of >= {size} bytes")
            pages = host[:size].reshape(-1, PAGE_SIZE)
        base, npages = gpa >> PAGE_SHIFT, size >> PAGE_SHIFT
        if old is not None:
            if hva != old.userspace_addr or npages != old.npages or (flags ^ old.flags) & K.KVM_MEM_READONLY:
                raise _err(
                    errno.EINVAL,
                    f"slot {slot:#x}: existing slot (npages {old.npages}, flags {old.flags:#x}) "
                    f"cannot become npages {npages}, flags {flags:#x}, userspace_addr {hva:#x}",
                )
            if base == old.base_gfn and flags == old.flags:
                return
        if old is None or base != old.base_gfn:
            for other in self._layout[as_id][2]:
                if other is not old and base < other.base_gfn + other.npages and other.base_gfn < base + npages:
                    raise _err(
                        errno.EEXIST,
                        f"slot {slot:#x}: gfn [{base:#x}, {base + npages:#x}) overlaps slot {other.id} "
                        f"[{other.base_gfn:#x}, {other.base_gfn + other.npages:#x})",
                    )
            if base + npages - 1 > MAX_GFN:
                raise _err(errno.EINVAL, f"slot {slot:#x}: gfn {base + npages - 1:#x} beyond kvm_mmu_max_gfn {MAX_GFN:#x}")
        # The memslot update protocol (kvm_set_memslot): a slot that loses
        # its mappings (move, delete) is first marked invalid (accesses to it
        # retry) and published; once every vCPU has left accesses that used
        # the old table (synchronize_srcu), its leaves are zapped under
        # mmu_lock; then the new state is published and synchronised again.
        if old is None:
            ms = self._new_slot(slot, base, npages, hva, region.host, pages)
            self._slots[slot] = ms
            self._rebuild_layout(as_id)
            _sim_memslot.apply_flags(self, ms, flags)
        elif base != old.base_gfn:
            # KVM_MR_MOVE: the old mappings go, the dirty bitmap stays
            self._invalidate(old)
            _sim_memslot.zap_slot(self, old)
            old.base_gfn = base
            old.row[_S.S_USED] = _S.SLOT_VALID
            self._rebuild_layout(as_id)
            _sim_memslot.apply_flags(self, old, flags)
        else:
            _sim_memslot.apply_flags(self, old, flags)

    def _new_slot(self, slot: int, base: int, npages: int, hva: int, host, pages) -> _MemSlot:  # noqa: ANN001
        t = self._slot_table
        free = np.flatnonzero(t[:, _S.S_USED] == _S.SLOT_FREE)
        if free.size == 0:
            raise _err(errno.ENOMEM, f"slot {slot:#x}: simulated memslot table full ({t.shape[0]} slots)")
        e = int(free[0])
        nwords = (npages + 63) >> 6
        shm = self._shm
        rmap_off = shm.arena_alloc(npages)
        dirty_off = shm.arena_alloc(nwords * 8)
        buf, off = self._host_buffer(host)
        row = t[e]
        row[:] = 0
        row[_S.S_SLOT] = slot
        row[_S.S_BASE] = base
        row[_S.S_NPAGES] = npages
        row[_S.S_HVA] = hva
        row[_S.S_HOST_BUF] = buf
        row[_S.S_HOST_OFF] = off
        row[_S.S_RMAP_OFF] = rmap_off
        row[_S.S_DIRTY_OFF] = dirty_off
        row[_S.S_SNAPSHOT_AT] = -1
        self._hdr[_S.H_SERIAL] += 1
        row[_S.S_SERIAL] = self._hdr[_S.H_SERIAL]
        if buf == -2:
            self._local_pages[e] = pages
        row[_S.S_USED] = _S.SLOT_VALID
        return self._slot_obj(e)

    def _host_buffer(self, host) -> tuple[int, int]:  # noqa: ANN001
        """(buffer index, offset) of ``host`` in a shareable mapping; (-1, 0)
        without host memory, (-2, 0) for memory only this process has."""
        if host is None:
            return -1, 0
        from ..._ramblock import shared_mapping_of

        found = shared_mapping_of(int(host.ctypes.data))
        if found is None:
            return -2, 0
        fd, addr, size = found
        bufs = self._bufs
        for i in range(bufs.shape[0]):
            if bufs[i, _S.B_SIZE] and bufs[i, _S.B_FD] == fd:
                break
        else:
            empty = np.flatnonzero(bufs[:, _S.B_SIZE] == 0)
            if empty.size == 0:
                return -2, 0
            i = int(empty[0])
            bufs[i, _S.B_FD] = fd
            bufs[i, _S.B_SIZE] = size
            self._buf_views[i] = np.frombuffer((ctypes.c_uint8 * size).from_address(addr), dtype=np.uint8)
        return i, int(host.ctypes.data) - addr

    def _slot_obj(self, e: int) -> _MemSlot:
        row = self._slot_table[e]
        key = (e, int(row[_S.S_SERIAL]))
        ms = self._slot_cache.get(key)
        if ms is not None:
            return ms
        npages = int(row[_S.S_NPAGES])
        buf = int(row[_S.S_HOST_BUF])
        if buf == -1:
            pages = None
        elif buf == -2:
            pages = self._local_pages.get(e)
            if pages is None:
                raise RuntimeError(f"memslot {int(row[_S.S_SLOT]):#x}: its host memory is not shareable")
        else:
            pages = self._map_buffer(buf)[int(row[_S.S_HOST_OFF]):][: npages * PAGE_SIZE].reshape(-1, PAGE_SIZE)
        rmap = self._shm.arena_view(int(row[_S.S_RMAP_OFF]), "bool", npages)
        dirty = self._shm.arena_view(int(row[_S.S_DIRTY_OFF]), "uint64", (npages + 63) >> 6)
        ms = _MemSlot(self._slot_table, e, pages, rmap, dirty)
        self._slot_cache[key] = ms
        return ms

    def _map_buffer(self, i: int) -> NDArray[np.uint8]:
        v = self._buf_views.get(i)
        if v is None:
            import mmap as _mmap

            fd, size = int(self._bufs[i, _S.B_FD]), int(self._bufs[i, _S.B_SIZE])
            # a vCPU process: the VMM's memfd, whether or not it was passed
            # at start (RAM added later was not): /proc/<vmm>/fd/N opens the
            # same file (a memfd has no other name)
            own = os.open(f"/proc/{int(self._hdr[_S.H_VMM_PID])}/fd/{fd}", os.O_RDWR)
            try:
                m = _mmap.mmap(own, size, flags=_mmap.MAP_SHARED, prot=_mmap.PROT_READ | _mmap.PROT_WRITE)
            finally:
                os.close(own)
            v = np.frombuffer(m, dtype=np.uint8)
            self._buf_views[i] = v
        return v

    def _invalidate(self, ms: _MemSlot) -> None:
        """KVM_MEMSLOT_INVALID: accesses to the slot retry; published."""
        ms.row[_S.S_USED] = _S.SLOT_INVALID
        self._publish_slots()

    def _delete_slot(self, ms: _MemSlot) -> None:
        self._invalidate(ms)
        _sim_memslot.zap_slot(self, ms)
        del self._slots[ms.id | ms.as_id << 16]
        ms.row[_S.S_USED] = _S.SLOT_FREE
        self._local_pages.pop(ms.e, None)
        self._rebuild_layout(ms.as_id)
        self._publish_slots()

    def _rebuild_layout(self, as_id: int) -> None:
        objs = sorted((s for s in self._slots.values() if s.as_id == as_id), key=lambda s: s.base_gfn)
        bases = np.array([s.base_gfn for s in objs], dtype=np.int64)
        ends = np.array([s.base_gfn + s.npages for s in objs], dtype=np.int64)
        self._layout[as_id] = (bases, ends, objs)

    def _publish_slots(self) -> None:
        """Make memslot changes visible, then wait until no vCPU is still in
        an access that read the old table (synchronize_srcu).  The caller
        must not hold mmu_lock (a vCPU in its access may be waiting for it)."""
        gen = _S.fetch_add8(self._shm.addr("hdr", _S.H_SLOTS_GEN), 1) + 1
        self._slots_gen_seen = gen
        ctl = self._ctl
        for v in range(self.nr_vcpus):
            if v == self.self_vcpu:
                continue
            # the marker is (generation read) + 1: a vCPU that read any generation
            # before ``gen`` has a marker <= gen
            self._wait_while(lambda v=v: 0 < int(ctl[v, _S.C_SRCU]) <= gen, v, "synchronize_srcu")

    def _sync_slots(self) -> None:
        """A vCPU process: rebuild the slot view if the table changed."""
        gen = int(self._hdr[_S.H_SLOTS_GEN])
        if gen == self._slots_gen_seen:
            return
        t = self._slot_table
        used = np.flatnonzero(t[:, _S.S_USED] != _S.SLOT_FREE)
        self._slots = {}
        for e in used.tolist():
            ms = self._slot_obj(e)
            self._slots[int(t[e, _S.S_SLOT])] = ms
        for as_id in range(KVM_ADDRESS_SPACE_NUM):
            self._rebuild_layout(as_id)
        self._slots_gen_seen = gen

    def _wait_while(self, cond, vcpu: int, what: str) -> int:  # noqa: ANN001
        """Spin (yielding the CPU) while ``cond()``; a vCPU process that died
        counts as having left.  Returns the ns waited."""
        if not cond():
            return 0
        t0 = time.perf_counter_ns()
        checked = t0
        while cond():
            os.sched_yield()
            now = time.perf_counter_ns()
            if now - checked > 200_000_000:
                checked = now
                pid = int(self._ctl[vcpu, _S.C_PID])
                if pid and not _pid_alive(pid):
                    break
        return time.perf_counter_ns() - t0

    def _flush_remote_tlbs(self, count: int = 1) -> None:
        """kvm_flush_remote_tlbs: once it returns, no vCPU still runs on a
        translation from before the caller's spte changes.  A vCPU stores
        only in guest mode (odd guest_seq) and re-reads the sptes after
        entering it; so waiting for every vCPU that is in guest mode now to
        leave it (the IPI + ack) is the flush.  The full fence orders the
        caller's spte stores before its reads of guest_seq (Dekker with the
        vCPU's entry: guest_seq store, fence, spte loads)."""
        self._stats["tlb_flushes"] += count
        self._wait_guest_exits()

    def _quiescent(self) -> bool:
        """No other process can touch the dirty bitmaps now: this is the VMM
        (single-threaded; in-process accesses are sequential with it) and
        every vCPU process is absent or has acknowledged a stop (it changes
        nothing until the VMM itself starts it again).  Then the per-word
        atomics of GET and CLEAR can be plain numpy operations."""
        if not self._owner:
            return False
        ctl = self._ctl
        alive = ctl[:, _S.C_ALIVE] != 0
        run, ack = ctl[:, _S.C_RUN], ctl[:, _S.C_ACK]
        return not (alive & (((run & 1) == 1) | (ack != run))).any()

    def _wait_guest_exits(self) -> None:
        """Wait until every other vCPU that is in guest mode now has left it."""
        _S.full_fence()
        ctl = self._ctl
        waited = 0
        for v in range(self.nr_vcpus):
            if v == self.self_vcpu:
                continue
            seq = int(ctl[v, _S.C_GUEST_SEQ])
            if seq & 1:
                waited += self._wait_while(lambda v=v, seq=seq: int(ctl[v, _S.C_GUEST_SEQ]) == seq, v, "tlb flush")
        if waited:
            self._stats["tlb_flush_wait_ns"] += waited

    def memslot(self, slot: int) -> tuple[int, int, int]:
        """(base_gfn, npages, flags) of ``slot`` (KeyError if absent)."""
        ms = self._slots[slot]
        return ms.base_gfn, ms.npages, ms.flags

    # ------------------------------------------------------------------
    # guest accesses (vectorised fault path)
    # ------------------------------------------------------------------
    def vcpu_write(self, gfns: NDArray[np.integer], vcpu: int = 0, *, as_id: int = 0) -> None:
        """The guest writes every page of ``gfns`` (any order, repeats allowed).

        Runs the fault path as KVM would, once per page that faults: root
        reload, push-down of read-only upper entries, mapping, fast page
        fault, dirty logging.  After it returns every page is writable and
        logged; store into :meth:`gfn_to_host` / :meth:`host_pages_for`.

        Raises:
            OSError(EFAULT): a gfn outside every slot, in a slot without host
                memory, or (writes) in a KVM_MEM_READONLY slot; raised
                before anything changes.
            OSError(EBADF): no such vCPU.
        """
        self._access(gfns, vcpu, as_id, write=True)

    def vcpu_read(self, gfns: NDArray[np.integer], vcpu: int = 0, *, as_id: int = 0) -> None:
        """The guest reads every page of ``gfns``: maps missing leaves, pushes nothing down."""
        self._access(gfns, vcpu, as_id, write=False)

    def _check_vcpu(self, vcpu: int, as_id: int) -> None:
        if not 0 <= vcpu < self.nr_vcpus:
            raise _err(errno.EBADF, f"no vCPU {vcpu} (nr_vcpus={self.nr_vcpus})")
        if not 0 <= as_id < KVM_ADDRESS_SPACE_NUM:
            raise ValueError(f"bad address space {as_id}")

    def _access(self, gfns, vcpu: int, as_id: int, write: bool) -> None:  # noqa: ANN001
        g = _as_gfns(gfns)
        self._check_vcpu(vcpu, as_id)
        if g.size == 0:
            return
        u, first = _unique_first(g)
        if self._hdr[_S.H_RING_SIZE] and u.size > self.ring_free(vcpu) + _S.RING_RSVD_ENTRIES:
            # each page may push a ring entry: refuse before any change (a
            # vCPU takes a ring-full exit before it gets here)
            raise _err(errno.ENOSPC, f"vCPU {vcpu}'s dirty ring has no room for {u.size} entries")
        stats = self._stats
        stats.row = vcpu
        try:
            self._srcu_enter(vcpu)
            try:
                runs = self._resolve(as_id, u, write)
                self._enter_guest(vcpu, as_id)
                self._fault_batch(as_id, u, first, runs, write)
            finally:
                self._srcu_exit(vcpu)
        finally:
            stats.row = self._vmm_row

    # --- memslot read side (SRCU) -------------------------------------------
    def _srcu_enter(self, vcpu: int) -> None:
        """srcu_read_lock(&kvm->srcu) + reading kvm->memslots: publish the
        memslot generation this access uses (+1, so 0 means none), fence,
        re-read the generation (Dekker with :meth:`_publish_slots`), then
        use the table of that generation."""
        hdr = self._hdr
        addr = self._shm.addr("vcpu_ctl", vcpu * _S.C_WORDS + _S.C_SRCU)
        while True:
            gen = int(hdr[_S.H_SLOTS_GEN])
            _S.store8(addr, gen + 1)
            if int(hdr[_S.H_SLOTS_GEN]) == gen:
                break
        if gen != self._slots_gen_seen:
            self._sync_slots()

    def _srcu_exit(self, vcpu: int) -> None:
        _S.store8(self._shm.addr("vcpu_ctl", vcpu * _S.C_WORDS + _S.C_SRCU), 0)

    # --- the fault path -------------------------------------------------------
    def _probe(self, mmu: Mmu, u: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.uint8], NDArray[np.bool_]]:
        """Lockless look at the batch: (leaf flat index or -1, leaf spte, path
        writable).  Advisory: every decision is re-made under mmu_lock, by
        cmpxchg, or at guest entry."""
        li = mmu.leaf_index(u)
        flat = mmu.levels[1].flat
        f = flat[np.maximum(li, 0)]
        if (li < 0).any():
            f = np.where(li >= 0, f, _ZERO_U8)
        return li, f, mmu.path_writable(u)

    def _fault_batch(self, as_id: int, u, first, runs, write: bool) -> None:  # noqa: ANN001
        """One VM exit per page that needs one, for the sorted unique pages
        ``u``: the slow path (missing tables or leaves, read-only upper
        entries) under mmu_lock, the fast page fault lockless by cmpxchg.

        The two sets are disjoint in effect: a slow fault only changes the
        path through a read-only or missing entry, which a fast page's path
        does not contain; so doing the slow ones first equals feeding the
        pages one at a time (fault counts included), which the tests check.
        """
        mmu = self._mmus[as_id]
        stats = self._stats
        if not write:
            with self._mmu_lock:
                res = mmu.walk(u, first, False, self._indicator)
                slow = 0
                for ms, a, b in runs:
                    slow += self._leaves_read(mmu, ms, u[a:b], res.leaf_index[a:b])
                stats["mmu_lock_acquisitions"] += slow
                if res.flushes:
                    self._flush_remote_tlbs(res.flushes)
            return
        for _ in self._write_phases(as_id, u, first, runs, int(self._hdr[_S.H_FAULT_ORDER]), self._mmu_lock):
            pass

    def _write_phases(self, as_id: int, u, first, runs, order: int, lock: AbstractContextManager[object]) -> Iterator[str]:  # noqa: ANN001
        """The write faults of :meth:`_fault_batch`, one phase per ``yield``:
        the lockless probe sorts the pages into slow (under ``lock``: the
        walk's phases, then each slot's leaf phases) and fast (the fast page
        fault's phases).  The vectorised path runs it through holding
        mmu_lock; the step model (:mod:`._sim_steps`) steps it with a null
        lock (its GET may interleave anywhere), so both run this code."""
        mmu = self._mmus[as_id]
        stats = self._stats
        li, f, pathw = self._probe(mmu, u)
        slow_mask = ~pathw | ((f & SPTE_PRESENT) == 0)
        if slow_mask.any():
            sel = np.flatnonzero(slow_mask)
            whole = sel.size == u.size
            us = u if whole else u[sel]
            pos = first if whole else (sel if first is None else first[sel])
            with lock:
                walked: list[WalkResult] = []
                yield from mmu.walk_phases(us, pos, True, self._indicator, order, walked)
                res = walked[0]
                nslow = 0
                for ms, a, b in runs:
                    if whole:
                        i, j = a, b
                    else:
                        i, j = np.searchsorted(sel, (a, b))
                    if i == j:
                        continue
                    sl = None if res.slow is None else res.slow[i:j]
                    out = [0]
                    yield from self._leaf_phases(mmu, ms, us[i:j], res.leaf_index[i:j], sl, order, out)
                    nslow += out[0]
                stats["mmu_lock_acquisitions"] += nslow
                if res.flushes:
                    self._flush_remote_tlbs(res.flushes)
            if whole:
                return
        # fast page fault (lockless): a present leaf, read-only but
        # mmu-writable, under a writable path; with PML a writable leaf
        # whose D bit is clear is logged by "hardware" the same way
        if self.pml:
            fast_mask = ~slow_mask & ((f & SPTE_DIRTY) == 0)
        else:
            fast_mask = ~slow_mask & ((f & (SPTE_WRITABLE | SPTE_MMU_WRITABLE)) == SPTE_MMU_WRITABLE)
        if not fast_mask.any():
            return
        fi = np.flatnonzero(fast_mask)
        fixed: list = [None]
        yield from self._fast_phases(mmu, runs, u, li, f, fi, order, fixed)

    def _fast_fix(self, mmu: Mmu, leaves, f) -> NDArray[np.bool_]:  # noqa: ANN001
        """fast_pf_fix_direct_spte: cmpxchg W (PML: W|D) into each leaf;
        True where this vCPU made the change (it must then log the page:
        rule 1, the dirty bit after the spte).  A leaf someone else fixed
        meanwhile needs no log from us; a leaf zapped or no longer
        mmu-writable is left for the next fault.

        Sptes are bytes, eight to a machine word: the faults of one batch
        whose leaves share a word are fixed by ONE 8-byte cmpxchg (each
        byte changed only if it still is present, mmu-writable and not yet
        fixed, checked against the word the cmpxchg compares).  That is
        those faults happening at the same instant, one of the
        interleavings the per-spte cmpxchg allows, at an eighth of the
        ctypes calls for a sequential writer."""
        stats = self._stats
        ok = np.zeros(leaves.size, dtype=np.bool_)
        if leaves.size == 0:
            return ok
        flat = mmu.levels[1].flat
        flat64 = flat.view(np.uint64)
        base = int(flat.ctypes.data)
        add = int(SPTE_WRITABLE | SPTE_DIRTY) if self.pml else int(SPTE_WRITABLE)
        need = int(SPTE_DIRTY) if self.pml else int(SPTE_WRITABLE)
        good = int(SPTE_PRESENT | SPTE_MMU_WRITABLE)
        if self._quiescent():
            # nobody else can change these bytes meanwhile: the same test and
            # store, as numpy (no cmpxchg needed without a concurrent writer)
            cur = flat[leaves]
            ok = (cur & np.uint8(good | need)) == np.uint8(good)
            flat[leaves[ok]] = cur[ok] | np.uint8(add)
            n = int(ok.sum())
            stats["pml_logged" if self.pml else "faults_fast"] += n
            return ok
        order = np.argsort(leaves, kind="stable")
        ls = leaves[order]
        w = ls >> 3
        starts = run_starts(w)
        words = w[starts]
        cur = flat64[words]  # one snapshot of each word (the cmpxchg's expected value)
        shift = ((ls & 7) << 3).astype(np.uint64)
        byte = (np.repeat(cur, run_lengths(starts, int(ls.size))) >> shift) & np.uint64(0xFF)
        qual = (byte & np.uint64(good | need)) == np.uint64(good)
        bits = np.where(qual, np.left_shift(np.uint64(add), shift), np.uint64(0))
        want = np.bitwise_or.reduceat(bits, starts)
        cas8 = _S.cas8
        failed = 0
        ends = np.append(starts[1:], ls.size).tolist()
        for g, (wi, c, m, s0, e0) in enumerate(zip(words.tolist(), cur.tolist(), want.tolist(), starts.tolist(), ends)):
            if not m:
                continue
            addr = base + 8 * wi
            if cas8(addr, c, c | m):
                ok[order[s0:e0][qual[s0:e0]]] = True
                continue
            # lost a race on this word: redo it against a fresh read
            failed += 1
            pos = order[s0:e0]
            sh = (ls[s0:e0] & 7).tolist()
            while True:
                c = int(flat64[wi])
                m, mine = 0, []
                for k, b8 in zip(pos.tolist(), sh):
                    byte_ = (c >> (8 * b8)) & 0xFF
                    if byte_ & (good | need) == good:
                        m |= add << (8 * b8)
                        mine.append(k)
                if not m:
                    break
                if cas8(addr, c, c | m):
                    ok[mine] = True
                    break
                failed += 1
        n = int(ok.sum())
        if self.pml:
            stats["pml_logged"] += n
        else:
            stats["faults_fast"] += n
        if failed:
            stats["fast_pf_cas_failed"] += failed
        return ok

    def guest_can_store(self, gfns: NDArray[np.int64], vcpu: int, *, as_id: int = 0) -> bool:
        """In guest mode: can vCPU ``vcpu`` store to every page of the sorted
        unique ``gfns`` without a VM exit?  (Leaf writable, path writable, no
        root reload pending; with PML also the D bit set, i.e. logged.)"""
        if self._reload[vcpu] >> as_id & 1:
            return False
        mmu = self._mmus[as_id]
        li, f, pathw = self._probe(mmu, gfns)
        need = (SPTE_WRITABLE | SPTE_DIRTY) if self.pml else SPTE_WRITABLE
        return bool(((f & need) == need).all() and pathw.all() and (li >= 0).all())

    def _resolve(self, as_id: int, u: NDArray[np.int64], write: bool) -> list[tuple[_MemSlot, int, int]]:
        """Runs of ``u`` (sorted) per slot; EFAULT before any effect."""
        bases, ends, objs = self._layout[as_id]
        n = int(u.size)
        if not objs:
            raise _err(errno.EFAULT, f"gfn {int(u[0]):#x} (as {as_id}) is in no memslot")
        k0 = int(np.searchsorted(bases, u[0], side="right")) - 1
        k1 = int(np.searchsorted(bases, u[-1], side="right")) - 1
        if k0 == k1 and k0 >= 0 and u[-1] < ends[k0]:
            runs = [(objs[k0], 0, n)]
        else:
            k = np.searchsorted(bases, u, side="right") - 1
            bad = (k < 0) | (u >= ends[np.maximum(k, 0)])
            if bad.any():
                raise _err(errno.EFAULT, f"gfn {int(u[np.argmax(bad)]):#x} (as {as_id}) is in no memslot")
            s = run_starts(k)
            e = np.append(s[1:], n)
            runs = [(objs[int(k[a])], int(a), int(b)) for a, b in zip(s, e)]
        for ms, a, _ in runs:
            if ms.row[_S.S_USED] != _S.SLOT_VALID:
                raise _Retry(f"slot {ms.id} is being changed")
            if ms.pages is None:
                raise _err(errno.EFAULT, f"gfn {int(u[a]):#x}: slot {ms.id} has no host memory")
            if write and ms.flags & K.KVM_MEM_READONLY:
                raise _err(errno.EFAULT, f"gfn {int(u[a]):#x}: write to KVM_MEM_READONLY slot {ms.id} (KVM_EXIT_MMIO)")
        return runs

    def _enter_guest(self, vcpu: int, as_id: int) -> None:
        """vcpu_enter_guest: a pending KVM_REQ_MMU_RELOAD loads the root
        (under mmu_lock).  The request is taken atomically, so a request
        made after it is seen at the next entry."""
        bit = 1 << as_id
        if not self._reload[vcpu] & bit:
            return
        _S.fetch_and8(self._shm.addr("reload", vcpu), ~bit)
        self._stats["root_reloads"] += 1
        with self._mmu_lock:
            self._stats["mmu_lock_acquisitions"] += 1
            protected = self._mmus[as_id].load_root(self._indicator)
            if protected:
                self._flush_remote_tlbs()

    def _leaf_phases(self, mmu: Mmu, ms: _MemSlot, u, leaves, slow, order: int, out: list):  # noqa: ANN001, ANN202
        """The leaf part of the slow-path write fault, one phase per ``yield``
        (the phase's name): [rmap_add] (new leaves), set_spte, mark_dirty, in
        the order the rules require (``order`` 0), or a broken order (1:
        dirty bit before the spte; 2: before the rmap add).  The vectorised
        path runs it through; the step model (:mod:`._sim_steps`) yields a
        step per phase, so both run this code.  ``out[0]`` receives the
        number of slow-path faults."""
        flat = mmu.levels[1].flat
        f = flat[leaves]
        miss = (f & SPTE_PRESENT) == 0
        wr = (f & SPTE_WRITABLE) != 0
        idx = u - ms.base_gfn
        slowp = miss if slow is None else (miss | slow)
        fast = ~wr & ~slowp
        log = slowp | fast
        if self.pml:
            pml = wr & ~slowp & ((f & SPTE_DIRTY) == 0)
            log |= pml
            self._stats["pml_logged"] += int(pml.sum())
        nslow = int(slowp.sum())
        self._stats["faults_map"] += nslow
        self._stats["faults_fast"] += int(fast.sum())
        out[0] = nslow
        logging = ms.dirty is not None
        marked = np.zeros(log.shape, dtype=np.bool_)

        def mark(sel: NDArray[np.bool_]) -> None:
            if logging and sel.any():
                self._mark_dirty(ms, idx[sel])
            marked[sel] = True

        if order == 2 and miss.any():  # BROKEN (rule 2 reversed, for the tests)
            mark(log & miss)
            yield "mark_dirty"
        # rule 2: a new leaf enters the rmap before anything sets its bit
        if miss.any():
            ms.rmap[idx[miss]] = True
            yield "rmap_add"
        if order == 1:  # BROKEN (rule 1 reversed, for the tests)
            mark(log)
            yield "mark_dirty"
        # rule 1: every spte is writable before its dirty bit is set.  A
        # present leaf is read-only but mmu-writable (fast page fault, or the
        # slow path after a push-down) or already writable.  Re-read: the
        # step model lets lockless protectors run between phases.
        f = flat[leaves]
        miss = (f & SPTE_PRESENT) == 0
        d = SPTE_DIRTY if self.pml else np.uint8(0)
        new = np.where(miss, _MAP_WRITABLE | d, f | SPTE_WRITABLE | d)
        ch = new != f
        if ch.any():
            mmu.spte_write(1, leaves[ch], new[ch], f[ch])
        yield "set_spte"
        # then the dirty bits: every fault logs its page (set_spte and
        # fast_pf_fix_direct_spte both call mark_page_dirty); a writable
        # leaf logs only through PML (D bit was clear)
        rest = log & ~marked
        if rest.any() or not marked.any():
            mark(rest)
            yield "mark_dirty"

    def _fast_phases(self, mmu: Mmu, runs, u, li, f, fi, order: int, out: list):  # noqa: ANN001, ANN202
        """The fast page fault for the pages ``u[fi]`` (lockless), one phase
        per ``yield``: fast_set_writable (or fast_cmpxchg_failed when no
        cmpxchg of ours changed an spte) then mark_dirty for the pages fixed
        (rule 1); ``order`` 1 marks first (broken).  Shared by the vectorised
        path and the step model.  ``out[0]``: mask of the pages fixed."""
        def mark(sel: NDArray[np.int64]) -> None:
            for ms, a, b in runs:
                i, j = np.searchsorted(sel, (a, b))
                if i < j and ms.dirty is not None:
                    self._mark_dirty(ms, u[sel[i:j]] - ms.base_gfn)

        if order == 1:  # BROKEN (rule 1 reversed, for the tests): log, THEN cmpxchg
            mark(fi)
            yield "mark_dirty"
            if not self._quiescent():
                time.sleep(0.0002)  # widen the window so a concurrent GET lands in it
            ok = self._fast_fix(mmu, li[fi], f[fi])
            out[0] = ok
            yield "fast_set_writable" if ok.any() else "fast_cmpxchg_failed"
            return
        ok = self._fast_fix(mmu, li[fi], f[fi])
        out[0] = ok
        yield "fast_set_writable" if ok.any() else "fast_cmpxchg_failed"
        if ok.any():
            mark(fi[ok])
            yield "mark_dirty"

    def _leaves_read(self, mmu: Mmu, ms: _MemSlot, u, leaves) -> int:  # noqa: ANN001
        flat = mmu.levels[1].flat
        f = flat[leaves]
        miss = (f & SPTE_PRESENT) == 0
        nmiss = int(miss.sum())
        if not nmiss:
            return 0
        idx = u[miss] - ms.base_gfn
        if ms.flags & K.KVM_MEM_READONLY:
            new = SPTE_PRESENT
        elif ms.logging and not self.pml:
            new = _MAP_READONLY_MW  # the first write will fault and log
        else:
            new = _MAP_WRITABLE  # D clear: with PML the first write logs
        ms.rmap[idx] = True
        mmu.spte_write(1, leaves[miss], np.full(nmiss, new, dtype=np.uint8), f[miss])
        self._stats["faults_map"] += nmiss
        return nmiss

    def _mark_dirty(self, ms: _MemSlot, idx: NDArray[np.int64]) -> None:
        """mark_page_dirty_in_slot for sorted, unique page indices ``idx``:
        one atomic OR per bitmap word touched (set_bit_le), since GET's
        xchg and other vCPUs' faults race on the same words."""
        n = int(idx.size)
        if n == 0:
            return
        if self._hdr[_S.H_RING_SIZE]:
            self._ring_push(ms, idx)
            self._stats["pages_marked_dirty"] += n
            return
        words, masks = _word_masks(idx)
        base = ms.dirty_addr
        fetch_or8 = _S.fetch_or8
        for w, m in zip(words.tolist(), masks.tolist()):
            fetch_or8(base + 8 * w, m)
        self._stats["pages_marked_dirty"] += n

    # ------------------------------------------------------------------
    # host memory
    # ------------------------------------------------------------------
    def gfn_to_host(self, gfn: int, *, as_id: int = 0) -> NDArray[np.uint8]:
        """The 4096-byte host view of ``gfn`` (OSError(EFAULT) if unbacked)."""
        (ms, _, _), = self._resolve(as_id, np.array([gfn], dtype=np.int64), write=False)
        return ms.pages[int(gfn) - ms.base_gfn]

    def host_pages_for(
        self, gfns: NDArray[np.integer], *, as_id: int = 0
    ) -> list[tuple[NDArray[np.uint8], NDArray[np.int64], NDArray[np.int64]]]:
        """Group ``gfns`` by slot: ``[(pages, page_idx, positions)]``.

        ``pages`` is the slot's (npages, 4096) host view, ``page_idx`` the
        pages of that slot, ``positions`` where they are in ``gfns``; so
        ``pages[page_idx, 0] = values[positions]`` stores with numpy, in
        place.  Raises OSError(EFAULT) like :meth:`vcpu_write`.
        """
        g = _as_gfns(gfns)
        if g.size == 0:
            return []
        order = np.argsort(g, kind="stable")
        gs = g[order]
        out = []
        for ms, a, b in self._resolve(as_id, gs, write=False):
            out.append((ms.pages, gs[a:b] - ms.base_gfn, order[a:b]))
        return out

    # ------------------------------------------------------------------
    # dirty log
    # ------------------------------------------------------------------
    def _logged_slot(self, slot: int) -> _MemSlot:
        as_id, id_ = slot >> 16, slot & 0xFFFF
        if slot < 0 or as_id >= KVM_ADDRESS_SPACE_NUM or id_ >= self.nr_memslots:
            raise _err(errno.EINVAL, f"slot {slot:#x}: as_id {as_id} / id {id_} out of range")
        ms = self._slots.get(slot)
        if ms is None or ms.dirty is None:
            raise _err(errno.ENOENT, f"slot {slot:#x}: {'no such slot' if ms is None else 'not logging dirty pages'}")
        return ms

    @staticmethod
    def _check_buffer(bitmap: NDArray[np.uint64], nwords: int, what: str, *, exact: bool = False) -> None:
        # a buffer the kernel could not copy to/from whole: -EFAULT
        if (
            not isinstance(bitmap, np.ndarray)
            or bitmap.dtype != np.uint64
            or bitmap.ndim != 1
            or (bitmap.shape[0] != nwords if exact else bitmap.shape[0] < nwords)
            or not bitmap.flags.c_contiguous
        ):
            raise _err(errno.EFAULT, f"{what}: need a contiguous uint64 array of {nwords} words")

    def get_dirty_log(self, slot: int, bitmap: NDArray[np.uint64], flags: int = 0) -> None:
        """KVM_GET_DIRTY_LOG into ``bitmap`` (exactly ALIGN(npages, 64)/64 words).

        flags 0: take the bits and write-protect those pages (with PML:
        clear their D bits) under mmu_lock, flushing TLBs if any bit was
        set.  KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT: take the bits only.  With
        manual protect: copy the bits, clear nothing, protect nothing.

        Raises:
            OSError(EINVAL): unknown flags (or the flag with PML), bad slot id.
            OSError(ENOENT): no such slot, or the slot does not log.
            OSError(EFAULT): ``bitmap`` has the wrong type or size.
        """
        # The common case is checked first with as little work as possible
        # (the fast protocol's GET is O(1) Python + one bitmap copy); the
        # errno for the rest comes from the full checks.
        if flags and (flags != K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT or self.pml):
            raise _err(errno.EINVAL, f"KVM_GET_DIRTY_LOG: bad flags {flags:#x}")
        if self._hdr[_S.H_RING_SIZE]:
            raise _err(errno.ENXIO, "KVM_GET_DIRTY_LOG on a VM with the dirty ring")
        ms = self._slots.get(slot)
        if ms is None or ms.dirty is None:
            ms = self._logged_slot(slot)
        words = ms.dirty
        if (
            type(bitmap) is not np.ndarray
            or bitmap.shape != words.shape
            or bitmap.dtype != _U64
            or not bitmap.flags.c_contiguous
        ):
            self._check_buffer(bitmap, words.size, "KVM_GET_DIRTY_LOG", exact=True)
        self._stats["dirty_log_calls"] += 1
        if self._manual:
            np.copyto(bitmap, words)
            return
        if flags:
            # rule 4: snapshot + clear; the pages are protected by a later
            # KVM_WRITE_PROTECT_ALL_MEM, and copied only after it
            _take_words(ms, bitmap, self._quiescent())
            ms.snapshot_at = self._wp_all_epoch
            return
        with self._mmu_lock:
            self._stats["mmu_lock_acquisitions"] += 1
            # rule 3: take the bits (xchg per word), THEN protect those pages
            _take_words(ms, bitmap, self._quiescent())
            self._protect_logged_pages(ms, bitmap, 0)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: NDArray[np.uint64]) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual protect only).

        Clears the given bits that are set (fetch_andnot) and write-protects
        (with PML: clears the D bit of) exactly the pages whose bits it
        cleared; flushes TLBs if any.  ``bitmap`` bit 0 is ``first_page``.

        Raises:
            OSError(EINVAL): manual protect not enabled, bad slot id,
                ``first_page`` not a multiple of 64, ``num_pages`` not a
                multiple of 64 unless the range ends at the slot's end, or
                the range outside the slot.
            OSError(ENOENT): no such slot or it does not log.
            OSError(EFAULT): ``bitmap`` too short.
        """
        if not self._manual:
            raise _err(errno.EINVAL, "KVM_CLEAR_DIRTY_LOG without KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        first_page, num_pages = int(first_page), int(num_pages)
        if first_page & 63 or first_page < 0:
            raise _err(errno.EINVAL, f"KVM_CLEAR_DIRTY_LOG: first_page {first_page} not a multiple of 64")
        ms = self._logged_slot(slot)
        n = ms.npages
        if num_pages < 0 or first_page > n or num_pages > n - first_page or (
            num_pages < n - first_page and num_pages & 63
        ):
            raise _err(
                errno.EINVAL,
                f"KVM_CLEAR_DIRTY_LOG slot {slot:#x}: pages [{first_page}, +{num_pages}) vs npages {n}",
            )
        nwords = (num_pages + 63) >> 6
        self._check_buffer(bitmap, nwords, "KVM_CLEAR_DIRTY_LOG")
        self._stats["clear_dirty_log_calls"] += 1
        if nwords == 0:
            return
        i0 = first_page >> 6
        given = bitmap[:nwords]
        with self._mmu_lock:
            self._stats["mmu_lock_acquisitions"] += 1
            # mask &= atomic_long_fetch_andnot(mask, p), per word given
            if self._quiescent():
                live = ms.dirty[i0 : i0 + nwords]
                cleared = given & live
                live &= ~given
            else:
                cleared = np.zeros(nwords, dtype=np.uint64)
                base = ms.dirty_addr + 8 * i0
                fetch_and8 = _S.fetch_and8
                for w in np.flatnonzero(given).tolist():
                    m = int(given[w])
                    cleared[w] = fetch_and8(base + 8 * w, ~m) & m
            self._protect_logged_pages(ms, cleared, first_page)

    def _protect_logged_pages(self, ms, words: NDArray[np.uint64], first_page: int) -> None:
        """kvm_arch_mmu_enable_log_dirty_pt_masked: for every page whose bit is
        set in ``words`` (bit 0 = ``first_page``), walk the rmap and
        write-protect its leaf (PML: clear its D bit instead); one TLB flush
        if anything was returned.  Caller holds mmu_lock.  Cost grows with
        the number of set bits, processed in chunks of words."""
        nz = np.flatnonzero(words)
        mmu = self._mmus[ms.as_id]
        for c in range(0, nz.size, _CHUNK_WORDS):
            pages = first_page + _bitmap_pages(words, nz[c : c + _CHUNK_WORDS])
            pages = pages[ms.rmap[pages]]  # the rmap walk
            leaves = mmu.leaf_index(ms.base_gfn + pages)
            if self.pml:
                mmu.clear_dirty_leaves(leaves)
            else:
                mmu.protect_leaves(leaves)
        if nz.size:
            self._flush_remote_tlbs()

    # ------------------------------------------------------------------
    # dirty ring (per vCPU, in shared memory)
    # ------------------------------------------------------------------
    def _enable_ring(self, cap: int, nbytes: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]): before any memslot
        (the kernel: before any vCPU); ``nbytes`` a power of two of
        16-byte entries, at most what KVM_CHECK_EXTENSION reported."""
        entries = int(nbytes) // K.KVM_DIRTY_GFN_SIZE
        if (nbytes % K.KVM_DIRTY_GFN_SIZE or entries < 2 * _S.RING_RSVD_ENTRIES or entries & (entries - 1)
                or entries > self._shm.params.ring_entries):
            raise _err(errno.EINVAL, f"dirty ring of {nbytes} bytes (max {self.check_extension(cap)})")
        if self._slots or self._hdr[_S.H_RING_SIZE]:
            raise _err(errno.EINVAL, "dirty ring: enable it once, before any memslot")
        self._hdr[_S.H_RING_SIZE] = entries
        self.dirty_ring_entries = entries

    def enable_dirty_ring(self, size_entries: int) -> int:
        """As :meth:`RealKVM.enable_dirty_ring`: returns the capability enabled."""
        self.enable_cap(K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, size_entries * K.KVM_DIRTY_GFN_SIZE)
        return K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL

    def _ring_vcpu(self) -> int:
        row = self._stats.row
        return row if row < self.nr_vcpus else 0  # no running vCPU: vCPU 0's ring

    def ring_free(self, vcpu: int) -> int:
        """Entries vCPU ``vcpu`` may still push before its ring is soft full."""
        size = int(self._hdr[_S.H_RING_SIZE])
        used = int(self._ctl[vcpu, _S.C_RING_PUSH]) - int(self._ctl[vcpu, _S.C_RING_RESET])
        return size - _S.RING_RSVD_ENTRIES - used

    def _ring_push(self, ms, idx: NDArray[np.int64]) -> None:  # noqa: ANN001
        """kvm_dirty_ring_push for each page, in order: the entry's slot and
        offset are written BEFORE its flags say DIRTY (the release store),
        so a harvester that sees DIRTY reads a complete entry.  Past the soft
        limit the push fails with ENOSPC before anything changes (the vCPU
        must take a ring-full exit first; the vCPU processes size their
        batches so it does not happen)."""
        v = self._ring_vcpu()
        size = int(self._hdr[_S.H_RING_SIZE])
        n = int(idx.size)
        if n > self.ring_free(v) + _S.RING_RSVD_ENTRIES:
            raise _err(errno.ENOSPC, f"vCPU {v}'s dirty ring is full ({size} entries)")
        ring = self._shm["ring"][v]
        head = int(self._ctl[v, _S.C_RING_PUSH])
        pos = (head + np.arange(n, dtype=np.int64)) & (size - 1)
        ring[pos, _S.R_SLOT] = ms.id | ms.as_id << 16
        ring[pos, _S.R_OFFSET] = idx
        _S.full_fence()
        ring[pos, _S.R_FLAGS] = K.KVM_DIRTY_GFN_F_DIRTY
        _S.store8(self._shm.addr("vcpu_ctl", v * _S.C_WORDS + _S.C_RING_PUSH), head + n)

    def harvest_dirty_rings(self) -> tuple[NDArray[np.uint32], NDArray[np.uint64]]:
        """Userspace's harvest, per vCPU in ring order: every entry whose
        flags say DIRTY, marked RESET (``(slots, offsets)``).  The caller
        must :meth:`reset_dirty_rings` before it reads the pages."""
        size = int(self._hdr[_S.H_RING_SIZE])
        if not size:
            raise _err(errno.EINVAL, "no dirty ring")
        slots, offs = [], []
        for v in range(self.nr_vcpus):
            ring = self._shm["ring"][v]
            fetch = int(self._ctl[v, _S.C_RING_FETCH])
            end = int(self._ctl[v, _S.C_RING_PUSH])  # read once: entries pushed later wait for the next harvest
            if end == fetch:
                continue
            pos = (fetch + np.arange(end - fetch, dtype=np.int64)) & (size - 1)
            dirty = (ring[pos, _S.R_FLAGS] & K.KVM_DIRTY_GFN_F_DIRTY) != 0
            k = int(np.argmin(dirty)) if not dirty.all() else int(pos.size)  # in order: stop at the first gap
            pos = pos[:k]
            slots.append(ring[pos, _S.R_SLOT].astype(np.uint32))
            offs.append(ring[pos, _S.R_OFFSET].astype(np.uint64))
            ring[pos, _S.R_FLAGS] = K.KVM_DIRTY_GFN_F_RESET
            self._ctl[v, _S.C_RING_FETCH] = fetch + k
        if not slots:
            return np.empty(0, np.uint32), np.empty(0, np.uint64)
        return np.concatenate(slots), np.concatenate(offs)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: for every vCPU, the entries from its reset
        index that userspace marked RESET, in order: write-protect their
        pages again (through the rmap, under mmu_lock, one TLB flush), then
        recycle the entries.  Returns the number of entries reset."""
        size = int(self._hdr[_S.H_RING_SIZE])
        total = 0
        with self._mmu_lock:
            self._stats["mmu_lock_acquisitions"] += 1
            for v in range(self.nr_vcpus):
                ring = self._shm["ring"][v]
                start = int(self._ctl[v, _S.C_RING_RESET])
                end = int(self._ctl[v, _S.C_RING_FETCH])
                if end == start:
                    continue
                pos = (start + np.arange(end - start, dtype=np.int64)) & (size - 1)
                slot_ids = ring[pos, _S.R_SLOT]
                offs = ring[pos, _S.R_OFFSET]
                for sid in np.unique(slot_ids).tolist():
                    ms = self._slots.get(int(sid))
                    if ms is None:
                        continue  # the slot went away meanwhile
                    pages = np.unique(offs[slot_ids == sid])
                    pages = pages[(pages >= 0) & (pages < ms.npages)]
                    pages = pages[ms.rmap[pages]]
                    mmu = self._mmus[ms.as_id]
                    leaves = mmu.leaf_index(ms.base_gfn + pages)
                    if self.pml:
                        mmu.clear_dirty_leaves(leaves)
                    else:
                        mmu.protect_leaves(leaves)
                ring[pos, _S.R_FLAGS] = 0
                _S.store8(self._shm.addr("vcpu_ctl", v * _S.C_WORDS + _S.C_RING_RESET), end)
                total += end - start
            if total:
                self._flush_remote_tlbs()
        return total

    def write_protect_all(self, enable: bool) -> None:
        """KVM_WRITE_PROTECT_ALL_MEM (2017 series): O(1), no mmu_lock.

        Enabling bumps the generation and requests a root reload on every
        vCPU; protection then moves down on demand.  Disabling clears the
        enable bit only.

        Raises:
            OSError(ENOTTY): the VM models PML (the capability is absent).
        """
        if self.pml:
            raise _err(errno.ENOTTY, "KVM_WRITE_PROTECT_ALL_MEM: not available with PML")
        gen = self._indicator & WP_ALL_GEN_MASK
        if enable:
            gen = (gen + 1) & WP_ALL_GEN_MASK
            # the indicator BEFORE the requests: a vCPU that takes the
            # request loads the root against the new generation
            self._indicator = WP_ALL_ENABLE_MASK | gen
            self._hdr[_S.H_WP_EPOCH] += 1
            # kvm_reload_remote_mmus: request, then kick every vCPU in guest
            # mode and wait for it to leave (KVM_REQUEST_WAIT); it re-enters
            # only through the request check
            for v in range(self.nr_vcpus):
                _S.fetch_or8(self._shm.addr("reload", v), _ALL_ROOTS)
            self._wait_guest_exits()
        else:
            self._indicator = gen
        self._stats["write_protect_all_calls"] += 1

    # ------------------------------------------------------------------
    # statistics and introspection
    # ------------------------------------------------------------------
    def statistics(self) -> dict[str, int]:
        """Counters, see STAT_NAMES.  faults_map counts every fault that took
        the slow path (mapping a leaf, creating tables, or pushing write
        protection down); faults_push_down counts upper entries made
        writable; faults_fast leaves fixed by the fast page fault."""
        tot = self._shm["stats"][:, : len(STAT_NAMES)].sum(axis=0)
        return dict(zip(STAT_NAMES, (int(x) for x in tot)))

    def vcpu_statistics(self, vcpu: int) -> dict[str, int]:
        """Every counter of vCPU ``vcpu``'s row (its faults, pages written,
        mmu_lock wait, fault cost, ...)."""
        row = self._shm["stats"][vcpu]
        return {n: int(row[i]) for i, n in enumerate(_S.ALL_STATS)}

    def reset_statistics(self) -> None:
        self._shm["stats"][:] = 0

    @property
    def write_protect_all_indicator(self) -> int:
        return self._indicator

    def _root_reload_protects(self, as_id: int) -> bool:
        """Whether loading the root now would write-protect it (enabled,
        stale generation, possibly-writable entries)."""
        if not is_write_protect_all_enabled(self._indicator):
            return False
        root = self._mmus[as_id].levels[4]
        return bool(root.gen[0] != get_write_protect_all_gen(self._indicator) and root.pwc[0] > 0)

    def _vcpu_root_protected(self, vcpu: int, as_id: int) -> bool:
        """vCPU ``vcpu`` cannot run before reloading a root that the reload
        will protect: for it, the whole address space is read-only.  (Only
        per vCPU: after a vCPU reloaded a root with nothing to protect, the
        patch leaves the root's generation stale, and that vCPU runs on.)"""
        return bool(self._reload[vcpu] >> as_id & 1) and self._root_reload_protects(as_id)

    def _root_protected_for_all(self, as_id: int) -> bool:
        return all(self._vcpu_root_protected(v, as_id) for v in range(self.nr_vcpus))

    # ------------------------------------------------------------------
    # step-wise model (see _sim_steps and the essay above)
    # ------------------------------------------------------------------
    def write_fault_steps(
        self, gfn: int, vcpu: int = 0, *, order: str = "spte_first", value: int | None = None
    ) -> Iterator[SimStep]:
        """One guest write to ``gfn`` as a generator of atomic steps.

        Steps: [load_root] (if requested), the fault's actions (fast:
        set writable, mark dirty; map: rmap add, set spte, mark dirty; slow
        path: link/push down per level first), then [store], which writes
        ``value`` (default: byte 0 + 1) to the page only if the vCPU can
        write it at that moment, and otherwise takes the fault again.
        ``order``: "spte_first" (correct), "dirty_first" (dirty bit before
        the spte is made writable), "dirty_before_rmap" (dirty bit before
        the rmap add) or "upper_first" (a push-down makes the upper entry
        writable before it protects the child table, as two steps).
        Validates eagerly (EFAULT, EBADF, ValueError).
        """
        return _sim_steps.write_fault_steps(self, gfn, vcpu, order, value)

    def get_dirty_log_steps(self, slot: int, bitmap: NDArray[np.uint64], flags: int = 0) -> Iterator[SimStep]:
        """:meth:`get_dirty_log` as a generator: [xchg word] and [write
        protect that word's pages through the rmap] per word, [flush], then
        [copy_to_user] into ``bitmap``.  Validates eagerly."""
        return _sim_steps.get_dirty_log_steps(self, slot, bitmap, flags)

