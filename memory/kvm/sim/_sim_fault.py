"""SimKVM's guest accesses: the vectorised fault path (root reload, the
upper walk and push-down, mapping, the fast page fault, dirty marking) and
the host view of guest memory.

The write fault is one generator of phases (:meth:`SimFaults._write_phases`)
that the vectorised path and the vCPU processes run through and the step
model (:mod:`._sim_steps`) steps; the rules it keeps (1, 2, 6) are in the
essay of :mod:`.simulated`.
"""

from __future__ import annotations

import errno
import time
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from . import _sim_shm as _S
from ._sim_dirty import SimDirtyLog
from ._sim_memslot import MemSlot as _MemSlot
from ._sim_memslot import as_gfns as _as_gfns
from ._sim_memslot import err as _err
from ._sim_memslot import unique_first as _unique_first
from ._sim_mmu import (
    SPTE_DIRTY,
    SPTE_MMU_WRITABLE,
    SPTE_PRESENT,
    SPTE_WRITABLE,
    Mmu,
    WalkResult,
    run_lengths,
    run_starts,
)
from ._sim_vm import KVM_ADDRESS_SPACE_NUM, _Retry

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager

    from numpy.typing import ArrayLike, NDArray

#: runs of a sorted batch per memslot: (slot, start, end) positions
Runs = list[tuple[_MemSlot, int, int]]

_MAP_WRITABLE = np.uint8(int(SPTE_PRESENT | SPTE_WRITABLE | SPTE_MMU_WRITABLE))
_MAP_READONLY_MW = np.uint8(int(SPTE_PRESENT | SPTE_MMU_WRITABLE))
_ONE64 = np.uint64(1)
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

class SimFaults(SimDirtyLog):
    """Guest accesses of :class:`memory.kvm.sim.SimKVM` (its vCPUs' side)."""

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

    def _access(self, gfns: ArrayLike, vcpu: int, as_id: int, write: bool) -> None:
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

    def _fault_batch(self, as_id: int, u: NDArray[np.int64], first: NDArray[np.int64] | None, runs: Runs,
                     write: bool) -> None:
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

    def _write_phases(self, as_id: int, u: NDArray[np.int64], first: NDArray[np.int64] | None, runs: Runs, order: int,
                      lock: AbstractContextManager[object]) -> Iterator[str]:
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
        fixed: list[NDArray[np.bool_] | None] = [None]
        yield from self._fast_phases(mmu, runs, u, li, f, fi, order, fixed)

    def _fast_fix(self, mmu: Mmu, leaves: NDArray[np.int64], f: NDArray[np.uint8]) -> NDArray[np.bool_]:
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
            np.equal(cur & np.uint8(good | need), np.uint8(good), out=ok)
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

    def _resolve(self, as_id: int, u: NDArray[np.int64], write: bool) -> Runs:
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

    def _leaf_phases(self, mmu: Mmu, ms: _MemSlot, u: NDArray[np.int64], leaves: NDArray[np.int64],
                     slow: NDArray[np.bool_] | None, order: int, out: list[int]) -> Iterator[str]:
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

    def _fast_phases(self, mmu: Mmu, runs: Runs, u: NDArray[np.int64], li: NDArray[np.int64], f: NDArray[np.uint8],
                     fi: NDArray[np.int64], order: int, out: list[NDArray[np.bool_] | None]) -> Iterator[str]:
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

    def _leaves_read(self, mmu: Mmu, ms: _MemSlot, u: NDArray[np.int64], leaves: NDArray[np.int64]) -> int:
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
        page: NDArray[np.uint8] = ms.host_pages[int(gfn) - ms.base_gfn]
        return page

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
        out: list[tuple[NDArray[np.uint8], NDArray[np.int64], NDArray[np.int64]]] = []
        for ms, a, b in self._resolve(as_id, gs, write=False):
            out.append((ms.host_pages, gs[a:b] - ms.base_gfn, order[a:b]))
        return out
