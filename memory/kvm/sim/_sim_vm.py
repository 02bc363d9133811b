"""SimKVM's shared state and memslots: the VM's state in shared memory, the
memslot update protocol (invalid, SRCU grace period, zap, publish), TLB
flushes as waits for guest exits, and the root-reload state.

The base of :class:`memory.kvm.sim.SimKVM`'s layers (:mod:`._sim_dirty`,
:mod:`._sim_fault`, :mod:`.simulated`); the rules it keeps are in the
essay of :mod:`.simulated`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .. import linux_kvm as K
from .._backend import UserMemoryRegion
from . import _sim_memslot
from . import _sim_shm as _S
from ._sim_memslot import MemSlot as _MemSlot
from ._sim_memslot import err as _err
from ._sim_mmu import MAX_GFN, Mmu, get_write_protect_all_gen, is_write_protect_all_enabled

if TYPE_CHECKING:
    from numpy.typing import NDArray

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
KVM_ADDRESS_SPACE_NUM = 2
_VALID_MEM_FLAGS = K.KVM_MEM_LOG_DIRTY_PAGES | K.KVM_MEM_READONLY


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

class SimVMCore:
    """The state every layer of :class:`memory.kvm.sim.SimKVM` shares, and
    the memslot ioctl (see SimKVM for the arguments)."""

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

    def _new_slot(self, slot: int, base: int, npages: int, hva: int, host: NDArray[np.uint8] | None,
                  pages: NDArray[np.uint8] | None) -> _MemSlot:
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
        if buf == -2 and pages is not None:
            self._local_pages[e] = pages
        row[_S.S_USED] = _S.SLOT_VALID
        return self._slot_obj(e)

    def _host_buffer(self, host: NDArray[np.uint8] | None) -> tuple[int, int]:
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
            self._buf_views[i] = np.frombuffer(memoryview((ctypes.c_uint8 * size).from_address(addr)), dtype=np.uint8)
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
            self._wait_while(lambda: 0 < int(ctl[v, _S.C_SRCU]) <= gen, v, "synchronize_srcu")  # noqa: B023

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

    def _wait_while(self, cond: Callable[[], bool], vcpu: int, what: str) -> int:
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
                waited += self._wait_while(lambda: int(ctl[v, _S.C_GUEST_SEQ]) == seq, v, "tlb flush")  # noqa: B023
        if waited:
            self._stats["tlb_flush_wait_ns"] += waited

    def memslot(self, slot: int) -> tuple[int, int, int]:
        """(base_gfn, npages, flags) of ``slot`` (KeyError if absent)."""
        ms = self._slots[slot]
        return ms.base_gfn, ms.npages, ms.flags

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
