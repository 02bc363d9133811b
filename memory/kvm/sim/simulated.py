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
memslots with their rmap and bitmap in :mod:`._sim_memslot`, all of it in
shared memory (:mod:`._sim_shm`) so that vCPU processes
(:mod:`._sim_vcpu_proc`) fault concurrently with the VMM.  SimKVM is
layered by concern: shared state, memslots and TLB flushes
(:mod:`._sim_vm`), the dirty-log ioctls, ring and write-protect-all
(:mod:`._sim_dirty`), the fault path (:mod:`._sim_fault`), and here the
capabilities, statistics and the step model's entry points.  Guest
accesses come in vectorised batches (:meth:`SimKVM.vcpu_write`): one pass
per level over the unique entries of the batch, then the leaves with numpy,
each phase in the rule order (rmap for every new leaf, then every spte,
then every dirty bit); the result equals feeding the pages one at a time,
fault counts included.  The tests' ``check_invariants`` (tests/simkit)
checks the structures and the invariant above at rest.  The interleavings
the rules guard against are explored by a step-wise model
(:meth:`SimKVM.write_fault_steps`, :meth:`SimKVM.get_dirty_log_steps`,
module :mod:`._sim_steps`) that steps the same fault code one atomic
action per ``next()``.  It lets GET's rmap walk interleave with the
mapping path too, as the 2013 lockless write protection did: that is the
strongest setting; under ``mmu_lock`` the interleavings are a subset.

Deviations, on purpose: 4 KiB pages only (no huge pages, so nothing is
split); one MMU per address space, guest accesses default to as 0;
KVM_CLEAR_DIRTY_LOG requires manual protect (EINVAL otherwise) and
enabling manual protect requires the ENABLE bit, as the project's contract
says (mainline accepts both); GET without write protect takes no
``mmu_lock``; not thread-safe within a process (one caller at a time,
as trio code is).  Writes to a KVM_MEM_READONLY slot, to a slot
without host memory, or outside every slot raise EFAULT (real KVM exits to
userspace with KVM_EXIT_MMIO for the first).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .. import linux_kvm as K
from .._backend import KvmStatistics
from . import _sim_shm as _S
from . import _sim_steps
from ._sim_fault import SimFaults
from ._sim_memslot import err as _err
from ._sim_vm import PAGE_SIZE

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    from numpy.typing import NDArray

    from ._sim_steps import SimStep

__all__ = ["SimKVM"]

STAT_NAMES = _S.STAT_NAMES


class SimKVM(SimFaults):
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
    # statistics and introspection
    # ------------------------------------------------------------------
    def statistics(self) -> KvmStatistics:
        """Counters, see STAT_NAMES, summed over every actor (vCPUs and the
        VMM).  faults_map counts every fault that took the slow path
        (mapping a leaf, creating tables, or pushing write protection down);
        faults_push_down counts upper entries made writable; faults_fast
        leaves fixed by the fast page fault."""
        tot = self._shm["stats"][:, : len(STAT_NAMES)].sum(axis=0)
        return KvmStatistics(dict(zip(STAT_NAMES, (int(x) for x in tot))))

    def ioctl_statistics(self) -> KvmStatistics:
        """The STAT_NAMES counters of the VMM's own row only: what this
        process's ioctls did (GET/CLEAR's rmap walks, log start, their
        mmu_lock holds), without the vCPU processes' faults.  A meter reads
        it before and after an ioctl to charge the ioctl its own work."""
        row = self._shm["stats"][self._vmm_row, : len(STAT_NAMES)]
        return KvmStatistics(dict(zip(STAT_NAMES, (int(x) for x in row))))

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
