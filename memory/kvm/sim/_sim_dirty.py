"""SimKVM's dirty logging: KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG, the
per-vCPU dirty ring and KVM_WRITE_PROTECT_ALL_MEM (rules 3, 4 and 5 of the
essay in :mod:`.simulated`)."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from . import _sim_shm as _S
from ._sim_memslot import MemSlot as _MemSlot
from ._sim_memslot import bitmap_pages as _bitmap_pages
from ._sim_memslot import err as _err
from ._sim_mmu import WP_ALL_ENABLE_MASK, WP_ALL_GEN_MASK
from ._sim_vm import KVM_ADDRESS_SPACE_NUM, SimVMCore

if TYPE_CHECKING:
    from numpy.typing import NDArray

_ALL_ROOTS = (1 << KVM_ADDRESS_SPACE_NUM) - 1
#: pages per chunk when walking large bitmaps (bounds temporaries)
_CHUNK_WORDS = 1 << 14
_U64 = np.dtype(np.uint64)


def _take_words(ms: _MemSlot, out: NDArray[np.uint64], quiescent: bool) -> None:
    """``out[i] = xchg(&dirty_bitmap[i], 0)`` for every word; words read as
    zero are left alone (a bit set after the read stays for the next GET).
    ``quiescent`` (no vCPU process can set a bit meanwhile): a numpy copy +
    fill does the same at numpy speed."""
    if quiescent:
        np.copyto(out, ms.bitmap)
        ms.bitmap.fill(0)
        return
    out.fill(0)
    nz = np.flatnonzero(ms.bitmap.copy())  # vCPUs set bits meanwhile: look at one snapshot
    base = ms.dirty_addr
    xchg8 = _S.xchg8
    for w in nz.tolist():
        out[w] = xchg8(base + 8 * w, 0)

class SimDirtyLog(SimVMCore):
    """The dirty-log ioctls of :class:`memory.kvm.sim.SimKVM`."""

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
        words = ms.bitmap  # the slot logs (checked above)
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
                live = ms.bitmap[i0 : i0 + nwords]
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

    def _protect_logged_pages(self, ms: _MemSlot, words: NDArray[np.uint64], first_page: int) -> None:
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
            most = self._shm.params.ring_entries * K.KVM_DIRTY_GFN_SIZE
            raise _err(errno.EINVAL, f"dirty ring of {nbytes} bytes (max {most})")
        if self._slots or self._hdr[_S.H_RING_SIZE]:
            raise _err(errno.EINVAL, "dirty ring: enable it once, before any memslot")
        self._hdr[_S.H_RING_SIZE] = entries
        self.dirty_ring_entries = entries

    def enable_dirty_ring(self, size_entries: int) -> int:
        """As :meth:`RealKVM.enable_dirty_ring`: returns the capability enabled."""
        self._enable_ring(K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, size_entries * K.KVM_DIRTY_GFN_SIZE)
        return K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL

    def _ring_vcpu(self) -> int:
        row = self._stats.row
        return row if row < self.nr_vcpus else 0  # no running vCPU: vCPU 0's ring

    def ring_free(self, vcpu: int) -> int:
        """Entries vCPU ``vcpu`` may still push before its ring is soft full."""
        size = int(self._hdr[_S.H_RING_SIZE])
        used = int(self._ctl[vcpu, _S.C_RING_PUSH]) - int(self._ctl[vcpu, _S.C_RING_RESET])
        return size - _S.RING_RSVD_ENTRIES - used

    def _ring_push(self, ms: _MemSlot, idx: NDArray[np.int64]) -> None:
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
