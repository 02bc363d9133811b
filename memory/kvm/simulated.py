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
fault counts included.  :meth:`SimKVM._check_invariants` (:mod:`._sim_check`)
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

import errno
import time
from typing import TYPE_CHECKING

import numpy as np

from . import linux_kvm as K
from ._backend import UserMemoryRegion
from ._sim_mmu import (
    MAX_GFN,
    SPTE_DIRTY,
    SPTE_MMU_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    WP_ALL_ENABLE_MASK,
    WP_ALL_GEN_MASK,
    Mmu,
    get_write_protect_all_gen,
    is_write_protect_all_enabled,
    run_starts,
)
from . import _sim_check, _sim_memslot, _sim_steps
from ._sim_memslot import MemSlot as _MemSlot
from ._sim_memslot import as_gfns as _as_gfns
from ._sim_memslot import bitmap_pages as _bitmap_pages
from ._sim_memslot import err as _err
from ._sim_memslot import unique_first as _unique_first
from ._sim_check import SpteInfo

if TYPE_CHECKING:
    from collections.abc import Iterator

    from numpy.typing import NDArray

    from ._sim_steps import SimStep

__all__ = ["SimKVM", "SpteInfo"]

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_ADDRESS_SPACE_NUM = 2
_ALL_ROOTS = (1 << KVM_ADDRESS_SPACE_NUM) - 1
_VALID_MEM_FLAGS = K.KVM_MEM_LOG_DIRTY_PAGES | K.KVM_MEM_READONLY
#: pages per chunk when walking large bitmaps (bounds temporaries)
_CHUNK_WORDS = 1 << 14

STAT_NAMES = (
    "sptes_write_protected",
    "sptes_dirty_cleared",
    "sptes_zapped",
    "faults_fast",
    "faults_push_down",
    "faults_map",
    "pml_logged",
    "pages_marked_dirty",
    "tables_created",
    "tlb_flushes",
    "mmu_lock_acquisitions",
    "mmu_lock_hold_ns",
    "root_reloads",
    "dirty_log_calls",
    "clear_dirty_log_calls",
    "write_protect_all_calls",
)

_MAP_WRITABLE = np.uint8(int(SPTE_PRESENT | SPTE_WRITABLE | SPTE_MMU_WRITABLE))
_MAP_READONLY_MW = np.uint8(int(SPTE_PRESENT | SPTE_MMU_WRITABLE))
_ONE64 = np.uint64(1)
_U64 = np.dtype(np.uint64)


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

    def __init__(self, *, pml: bool = False, nr_memslots: int = 32764, nr_vcpus: int = 1) -> None:
        if nr_vcpus < 1 or not 1 <= nr_memslots <= 0x10000:
            raise ValueError(f"bad nr_vcpus={nr_vcpus} / nr_memslots={nr_memslots}")
        self.pml = bool(pml)
        self.nr_memslots = int(nr_memslots)
        self.nr_vcpus = int(nr_vcpus)
        self._stats: dict[str, int] = dict.fromkeys(STAT_NAMES, 0)
        #: kvm->arch.mmu_write_protect_all_indicator
        self._indicator = 0
        #: number of write_protect_all(True) calls (for snapshot bookkeeping)
        self._wp_all_epoch = 0
        self._mmus = [Mmu(self._stats, 0) for _ in range(KVM_ADDRESS_SPACE_NUM)]
        #: KVM_REQ_MMU_RELOAD per vCPU: bit ``as_id`` set = that root must be reloaded
        self._reload: list[int] = [0] * self.nr_vcpus
        self._slots: dict[int, _MemSlot] = {}
        self._layout: list[tuple[NDArray[np.int64], NDArray[np.int64], list[_MemSlot]]] = [
            (np.empty(0, np.int64), np.empty(0, np.int64), []) for _ in range(KVM_ADDRESS_SPACE_NUM)
        ]
        #: kvm->manual_dirty_log_protect
        self._manual = 0

    # ------------------------------------------------------------------
    # capabilities
    # ------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd."""
        if cap == K.KVM_CAP_NR_MEMSLOTS:
            return self.nr_memslots
        if cap == K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            return K.KVM_DIRTY_LOG_MANUAL_CAPS
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
        if cap != K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            raise _err(errno.EINVAL, f"KVM_ENABLE_CAP: cap {cap} not supported")
        arg = args[0] if args else 0
        if arg & ~K.KVM_DIRTY_LOG_MANUAL_CAPS or not arg & K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            raise _err(errno.EINVAL, f"KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2): bad args[0]={arg:#x}")
        self._manual = arg

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
        if old is None:
            ms = _MemSlot(as_id, id_, base, npages, 0, hva, pages)
            self._slots[slot] = ms
            _sim_memslot.apply_flags(self, ms, flags)
            self._rebuild_layout(as_id)
        elif base != old.base_gfn:
            # KVM_MR_MOVE: the old mappings go, the dirty bitmap stays
            _sim_memslot.zap_slot(self, old)
            old.base_gfn = base
            _sim_memslot.apply_flags(self, old, flags)
            self._rebuild_layout(as_id)
        else:
            _sim_memslot.apply_flags(self, old, flags)

    def _delete_slot(self, ms: _MemSlot) -> None:
        _sim_memslot.zap_slot(self, ms)
        del self._slots[ms.id | ms.as_id << 16]
        self._rebuild_layout(ms.as_id)

    def _rebuild_layout(self, as_id: int) -> None:
        objs = sorted((s for s in self._slots.values() if s.as_id == as_id), key=lambda s: s.base_gfn)
        bases = np.array([s.base_gfn for s in objs], dtype=np.int64)
        ends = np.array([s.base_gfn + s.npages for s in objs], dtype=np.int64)
        self._layout[as_id] = (bases, ends, objs)

    def _unlock(self, t0: int) -> None:
        """Account one mmu_lock critical section that started at ``t0``."""
        self._stats["mmu_lock_acquisitions"] += 1
        self._stats["mmu_lock_hold_ns"] += time.perf_counter_ns() - t0

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
        runs = self._resolve(as_id, u, write)
        self._enter_guest(vcpu, as_id)
        mmu = self._mmus[as_id]
        t0 = time.perf_counter_ns()
        res = mmu.walk(u, first, write, self._indicator)
        t1 = time.perf_counter_ns()
        slow = 0
        for ms, a, b in runs:
            sl = None if res.slow is None else res.slow[a:b]
            if write:
                slow += self._leaves_write(mmu, ms, u[a:b], res.leaf_index[a:b], sl)
            else:
                slow += self._leaves_read(mmu, ms, u[a:b], res.leaf_index[a:b])
        if slow:
            # Each slow-path fault took mmu_lock once.  Hold time, estimated:
            # the walk if it changed upper entries (push-down, new tables),
            # plus the leaf phase prorated to the slow faults (the fast page
            # faults of the same batch are lockless).
            leaf_ns = time.perf_counter_ns() - t1
            hold = (t1 - t0 if res.upper_slow_faults else 0) + leaf_ns * slow // int(u.size)
            self._stats["mmu_lock_acquisitions"] += slow
            self._stats["mmu_lock_hold_ns"] += hold
        self._stats["tlb_flushes"] += res.flushes

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
            if ms.pages is None:
                raise _err(errno.EFAULT, f"gfn {int(u[a]):#x}: slot {ms.id} has no host memory")
            if write and ms.flags & K.KVM_MEM_READONLY:
                raise _err(errno.EFAULT, f"gfn {int(u[a]):#x}: write to KVM_MEM_READONLY slot {ms.id} (KVM_EXIT_MMIO)")
        return runs

    def _enter_guest(self, vcpu: int, as_id: int) -> None:
        """vcpu_enter_guest: a pending KVM_REQ_MMU_RELOAD loads the root."""
        bit = 1 << as_id
        if not self._reload[vcpu] & bit:
            return
        self._reload[vcpu] &= ~bit
        self._stats["root_reloads"] += 1
        t0 = time.perf_counter_ns()
        protected = self._mmus[as_id].load_root(self._indicator)
        self._unlock(t0)
        if protected:
            self._stats["tlb_flushes"] += 1

    def _leaves_write(self, mmu: Mmu, ms: _MemSlot, u, leaves, slow) -> int:  # noqa: ANN001
        """Write faults on the leaves of one slot; returns the slow-path faults."""
        flat = mmu.levels[1].flat
        f = flat[leaves]
        miss = (f & SPTE_PRESENT) == 0
        wr = (f & SPTE_WRITABLE) != 0
        idx = u - ms.base_gfn
        slowp = miss if slow is None else (miss | slow)
        # rule 2: a new leaf enters the rmap before anything sets its bit
        if miss.any():
            ms.rmap[idx[miss]] = True
        # rule 1: every spte is writable before its dirty bit is set.  A
        # present leaf is read-only but mmu-writable (fast page fault, or the
        # slow path after a push-down) or already writable.
        d = SPTE_DIRTY if self.pml else np.uint8(0)
        new = np.where(miss, _MAP_WRITABLE | d, f | SPTE_WRITABLE | d)
        ch = new != f
        if ch.any():
            mmu.spte_write(1, leaves[ch], new[ch], f[ch])
        # then the dirty bits: every fault logs its page (set_spte and
        # fast_pf_fix_direct_spte both call mark_page_dirty); a writable
        # leaf logs only through PML (D bit was clear)
        fast = ~wr & ~slowp
        log = slowp | fast
        if self.pml:
            pml = wr & ~slowp & ((f & SPTE_DIRTY) == 0)
            log |= pml
            self._stats["pml_logged"] += int(pml.sum())
        if ms.dirty is not None:
            self._mark_dirty(ms, idx[log])
        nslow = int(slowp.sum())
        self._stats["faults_map"] += nslow
        self._stats["faults_fast"] += int(fast.sum())
        return nslow

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
        """mark_page_dirty_in_slot for sorted, unique page indices ``idx``."""
        n = int(idx.size)
        if n == 0:
            return
        lo = int(idx[0]) & ~63
        span = int(idx[-1]) + 1 - lo
        if span <= 64 * n:
            # dense: one bool per page of the span, packed little-endian
            # into bytes and ORed into the (64-page aligned) words
            b = np.zeros(span, dtype=np.bool_)
            b[idx - lo] = True
            packed = np.packbits(b, bitorder="little")
            view = ms.dirty.view(np.uint8)[lo >> 3 : (lo >> 3) + packed.size]
            view |= packed
        else:
            w = idx >> 6
            bits = np.left_shift(_ONE64, (idx & 63).astype(np.uint64))
            s = run_starts(w)
            ms.dirty[w[s]] |= bits if s.size == n else np.bitwise_or.reduceat(bits, s)
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
            np.copyto(bitmap, words)
            words.fill(0)
            ms.snapshot_at = self._wp_all_epoch
            return
        t0 = time.perf_counter_ns()
        # rule 3: take the bits (the per-word xchg, done for all words at
        # once: nothing runs in between here), THEN protect those pages.
        np.copyto(bitmap, words)
        words.fill(0)
        self._protect_logged_pages(ms, bitmap, 0)
        self._unlock(t0)

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
        t0 = time.perf_counter_ns()
        i0 = first_page >> 6
        live = ms.dirty[i0 : i0 + nwords]
        given = bitmap[:nwords]
        cleared = given & live  # mask &= atomic_long_fetch_andnot(mask, p)
        live &= ~given
        self._protect_logged_pages(ms, cleared, first_page)
        self._unlock(t0)

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
            self._stats["tlb_flushes"] += 1

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
            self._indicator = WP_ALL_ENABLE_MASK | gen
            self._reload = [_ALL_ROOTS] * self.nr_vcpus  # kvm_reload_remote_mmus
            self._wp_all_epoch += 1
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
        return dict(self._stats)

    def reset_statistics(self) -> None:
        for k in self._stats:
            self._stats[k] = 0

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

    def inspect_spte(self, gfn: int, *, as_id: int = 0) -> SpteInfo:
        """The state of ``gfn``'s leaf spte, rmap entry and dirty bit."""
        return _sim_check.inspect_spte(self, gfn, as_id)

    def peek_dirty_log(self, slot: int) -> NDArray[np.uint64]:
        """A copy of the slot's live dirty bitmap (no ioctl does this; tests)."""
        return self._logged_slot(slot).dirty.copy()

    def _state(self) -> dict:
        """Canonical state (tables by id, rmaps, bitmaps, indicator) for comparisons."""
        return _sim_check.state(self)

    def _check_invariants(self, *, dirty_log: bool = True) -> None:
        """Raise AssertionError (with evidence) if the simulated state is
        inconsistent; see :func:`memory.kvm._sim_check.check_invariants`.
        ``dirty_log=False`` skips Marcelo's rule (structure only)."""
        _sim_check.check_invariants(self, dirty_log=dirty_log)

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

