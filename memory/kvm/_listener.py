"""The KVM memory listener: accel/kvm/kvm-all.c's memslot and dirty-log glue.

Slots
=====

Every RAM ``FlatRange`` of the listener's address space becomes one or more
KVM memslots (``KVMSlot``).  ``region_add``/``region_del`` only queue the
section; ``commit`` applies **all deletions before all additions**, so a range
that moved never has two slots covering the same guest pages.
``kvm_set_phys_mem``:

* ``kvm_align_section`` rounds the start **up** to a host page and the size
  **down**; an empty result maps nothing;
* non-RAM (our MMIO placeholders) is never mapped: every access traps;
* a section is split into slots of at most ``max_slot_size`` bytes, and later
  found again by exact ``(start, size)``;
* the ioctl slot id is ``slot | as_id << 16``; flags carry
  ``KVM_MEM_LOG_DIRTY_PAGES`` while the region's client mask is non-zero;
* deleting a logged slot first harvests its bits into the clients ("best
  effort" in QEMU: writes between that fetch and the deletion are lost - no
  vCPU runs during a commit here).

``log_start``/``log_stop`` act only on the first client gained (``old == 0``) /
last client lost (``new == 0``), re-issuing the memslot with new flags.

The rest lives beside this module, one concept each: the dirty-log modes
and their re-protection rules (``_modes.py``), the VM's write-protect-all
hook (``_wp_all.py``), the dirty ring (``_dirty_ring.py``) and the slot
records (``_slot.py``).

Cost hooks
==========

Every ioctl the listener issues is reported to ``MemorySystem.cost_meter``
(``memory/_cost.py`` has the table): ``GET_DIRTY_LOG`` and
``CLEAR_DIRTY_LOG`` around each call (``pages``: the bits returned / to
clear), ``SET_MEMORY_REGION`` around each memslot update, the ring causes
around each reap, and ``REGION_SYNC`` around a ``log_sync`` (or the ring's
``log_sync_global``) that is not part of a global sync.  The meter is read
at each call, so it can be set or replaced at any time; the only work done
for it alone, the popcount of a fetched bitmap, is skipped for ``NO_METER``.
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .._cost import NO_METER, Cause
from .._dirty import popcount, range_mask
from .._errors import KVMListenerError
from .._listener import MemoryListener
from .._ramblock import TARGET_PAGE_SIZE
from ._backend import KvmVM, UserMemoryRegion
from ._dirty_ring import RingReaper, mark_ring_entries
from ._modes import DirtyLogMode, RegionSyncRule, choose_mode
from ._slot import DEFAULT_NR_SLOTS, KVMSlot, SlotIds
from ._wp_all import WriteProtectAllHook
from .linux_kvm import (
    KVM_CAP_NR_MEMSLOTS,
    KVM_CLEAR_LOG_SHIFT,
    KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_MEM_LOG_DIRTY_PAGES,
)

#: hooks absent with / without the dirty ring (see ``absent_hooks``)
_RING_ABSENT = frozenset({"log_sync", "log_clear"})
_BITMAP_ABSENT = frozenset({"log_sync_global"})

__all__ = [
    "DirtyLogMode",
    "KVMListenerStatistics",
    "KVMMemoryListener",
    "KVMSlot",
    "RegionSyncRule",
    "WriteProtectAllHook",
]

if TYPE_CHECKING:
    from .._region import MemoryRegion, MemoryRegionSection
    from .._system import MemorySystem

@dataclass(frozen=True, slots=True)
class KVMListenerStatistics:
    """Counters of one ``KVMMemoryListener``.

    ``last_sync_time_ns``/``last_sync_pages``: time spent in GET_DIRTY_LOG and
    pages fetched during the most recent *global* sync.
    ``last_write_protect_time_ns``: time spent re-protecting for that sync -
    the ``KVM_WRITE_PROTECT_ALL_MEM`` ioctl (write-protect-all mode), or the
    ``KVM_CLEAR_DIRTY_LOG`` calls issued since it started (manual mode); 0 in
    legacy mode, where GET protects and its cost is in ``last_sync_time_ns``.
    """

    mode: str
    region_sync_rule: str
    nr_slots_used: int
    global_syncs: int
    region_syncs: int
    get_dirty_log_calls: int
    pages_fetched: int
    fetch_time_ns: int
    last_sync_time_ns: int
    last_sync_pages: int
    write_protect_all_calls: int
    write_protect_off_calls: int
    write_protect_time_ns: int
    last_write_protect_time_ns: int
    clear_dirty_log_calls: int
    pages_cleared: int
    clear_time_ns: int
    harvests: int


class KVMMemoryListener(MemoryListener):
    """``KVMMemoryListener``: one per KVM address space.

    Register it with ``memory_system.memory_listener_register(listener,
    memory_system.address_space_memory)`` (QEMU's
    ``kvm_memory_listener_register``); registration replays the current
    topology into memslots.  In write-protect-all mode the constructor
    installs the memory core's write-protect-all hook (as the draft's
    ``kvm_init`` does), or joins the one already installed for the same VM.

    Args:
        memory_system: the VM's memory core.
        kvm: the VM (``memory.kvm.KvmVM``).
        as_id: KVM address-space id (slot ids are ``slot | as_id << 16``).
        max_slot_size: split sections into slots of at most this many bytes
            (a multiple of the host page size); unlimited by default.
        write_protect_all: use the 2017 write-protect-all mode.  ``None``: when
            both caps (145, 146) are present and ``manual_protect`` is not True.
        manual_protect: enable ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``
            (``MANUAL_PROTECT_ENABLE | INITIALLY_SET``).  ``None``: when the cap
            is present and write-protect-all is not used; a failing enable then
            falls back to legacy, as QEMU does.
        region_sync_rule: per-region syncs in write-protect-all mode.
        dirty_ring: the VM uses the dirty ring (excludes the other modes); ``kvm``
            must be a ``DirtyRingReaper`` or a ``DirtyRingBackend``.

    Raises:
        KVMListenerError: a mode was requested that the VM cannot provide
            (including a dirty ring on a VM with neither ring Protocol).
        OSError: an ioctl failed while enabling the cap or mapping slots.
    """

    priority = 10

    def __init__(
        self,
        memory_system: MemorySystem,
        kvm: KvmVM,
        *,
        as_id: int = 0,
        max_slot_size: int | None = None,
        write_protect_all: bool | None = None,
        manual_protect: bool | None = None,
        region_sync_rule: RegionSyncRule = RegionSyncRule.PROTECTING_FETCH,
        dirty_ring: bool = False,
        name: str = "kvm-memory",
    ) -> None:
        super().__init__()
        self.name = name
        self.ms = memory_system
        self.kvm = kvm
        self.as_id = as_id
        self.page_size = int(kvm.page_size)
        if self.page_size != TARGET_PAGE_SIZE:
            raise KVMListenerError("host page size must equal the target page size", page_size=self.page_size)
        if max_slot_size is not None and (max_slot_size <= 0 or max_slot_size % self.page_size):
            raise KVMListenerError("max_slot_size must be a positive multiple of the page size", size=max_slot_size)
        self.max_slot_size = max_slot_size if max_slot_size is not None else 1 << 64
        self.nr_slots = int(kvm.check_extension(KVM_CAP_NR_MEMSLOTS)) or DEFAULT_NR_SLOTS
        self.region_sync_rule = region_sync_rule
        self.dirty_ring = dirty_ring
        self._ring: RingReaper | None = None
        if dirty_ring:
            if write_protect_all or manual_protect:
                raise KVMListenerError("the dirty ring excludes write-protect-all and manual protect")
            self._ring = RingReaper(kvm)
            self.mode = DirtyLogMode.DIRTY_RING
        else:
            self.mode = choose_mode(kvm, write_protect_all, manual_protect)

        self._slots: dict[tuple[int, int], KVMSlot] = {}
        self._ids = SlotIds(self.nr_slots)
        self._transaction_add: list[MemoryRegionSection] = []
        self._transaction_del: list[MemoryRegionSection] = []
        # Pages were fetched WITHOUT_WRITE_PROTECT and not yet re-protected.
        self._wp_pending = False
        self._in_transaction = False
        self._sync_generation = -1
        self._n: dict[str, int] = dict.fromkeys(
            (
                "global_syncs region_syncs get_dirty_log_calls pages_fetched fetch_time_ns last_sync_time_ns "
                "last_sync_pages write_protect_all_calls write_protect_off_calls write_protect_time_ns "
                "last_write_protect_time_ns "
                "clear_dirty_log_calls pages_cleared clear_time_ns harvests"
            ).split(),
            0,
        )

        self._wp_hook: WriteProtectAllHook | None = None
        if self.mode is DirtyLogMode.WRITE_PROTECT_ALL:
            hook = memory_system._write_protect_all_fn
            if not (isinstance(hook, WriteProtectAllHook) and hook.kvm is kvm):
                hook = WriteProtectAllHook(kvm)
                memory_system.memory_register_write_protect_all(hook)
            hook.listeners.append(self)
            self._wp_hook = hook

    def unregister(self) -> None:
        """``memory_listener_unregister`` (deletes every slot, harvesting logged
        ones); the VM's write-protect-all hook goes with its last listener."""
        self.ms.memory_listener_unregister(self)
        hook = self._wp_hook
        if hook is not None and self in hook.listeners:
            hook.listeners.remove(self)
            if not hook.listeners and self.ms._write_protect_all_fn is hook:
                self.ms.memory_register_write_protect_all(None)

    # -- queries -----------------------------------------------------------------
    @property
    def slots(self) -> list[KVMSlot]:
        """Used slots, by guest address."""
        return sorted(self._slots.values(), key=lambda m: m.start_addr)

    def lookup_matching_slot(self, start_addr: int, size: int) -> KVMSlot | None:
        """``kvm_lookup_matching_slot``: exact ``(start, size)`` match."""
        return self._slots.get((start_addr, size))

    def statistics(self) -> KVMListenerStatistics:
        return KVMListenerStatistics(
            mode=self.mode.value,
            region_sync_rule=self.region_sync_rule.value,
            nr_slots_used=len(self._slots),
            **self._n,
        )

    def absent_hooks(self) -> frozenset[str]:
        """``kvm_memory_listener_register``: with the dirty ring, ``log_sync_global``
        instead of ``log_sync``/``log_clear``; without it, the reverse."""
        return _RING_ABSENT if self.dirty_ring else _BITMAP_ABSENT

        # -- the write-protect-all hook's view (``_wp_all.WriteProtectAllClient``) ---------
    def write_protect_pending(self) -> bool:
        return self._wp_pending

    def write_protect_done(self, time_ns: int) -> None:
        self._wp_pending = False
        self._n["write_protect_all_calls"] += 1
        self._n["write_protect_time_ns"] += time_ns
        self._n["last_write_protect_time_ns"] = time_ns

    def write_protect_off_done(self) -> None:
        self._n["write_protect_off_calls"] += 1

    def in_topology_update(self) -> bool:
        return self._in_transaction

    def logs_dirty_pages(self) -> bool:
        return any(mem.flags & KVM_MEM_LOG_DIRTY_PAGES for mem in self._slots.values())

    # -- slot plumbing ---------------------------------------------------------------
    def align_section(self, section: MemoryRegionSection) -> tuple[int, int]:
        """``kvm_align_section``: ``(start, size)``, start rounded up to a host
        page, size rounded down; size 0 means nothing to map."""
        ps = self.page_size
        start = -(-section.offset_within_address_space // ps) * ps
        delta = start - section.offset_within_address_space
        if delta > section.size:
            return start, 0
        return start, (section.size - delta) // ps * ps

    @staticmethod
    def _mem_flags(mr: MemoryRegion) -> int:
        # KVM_MEM_READONLY is not used: there are no ROM/ROMD regions here.
        return KVM_MEM_LOG_DIRTY_PAGES if mr.get_dirty_log_mask() else 0

    def _set_user_memory_region(self, mem: KVMSlot) -> None:
        region = UserMemoryRegion(mem.id, mem.flags, mem.start_addr, mem.memory_size, mem.ram)
        meter = self.ms.cost_meter
        token = meter.begin(Cause.SET_MEMORY_REGION)
        try:
            self.kvm.set_user_memory_region(region)
        except OSError as exc:
            exc.add_note(
                f"KVM_SET_USER_MEMORY_REGION slot={mem.id} gpa={mem.start_addr:#x} "
                f"size={mem.memory_size:#x} flags={mem.flags:#x}"
            )
            raise
        finally:
            meter.end(Cause.SET_MEMORY_REGION, token)
        mem.old_flags = mem.flags

    def _slot_init_dirty_bitmap(self, mem: KVMSlot) -> None:
        if not mem.flags & KVM_MEM_LOG_DIRTY_PAGES or mem.dirty_bmap is not None:
            return
        npages = mem.memory_size // self.page_size
        mem.dirty_bmap = np.zeros((npages + 63) // 64, dtype=np.uint64)

    def _slot_get_dirty_log(self, mem: KVMSlot, flags: int) -> None:
        """``kvm_slot_get_dirty_log``: GET into ``dirty_bmap``; ENOENT is fine."""
        assert mem.dirty_bmap is not None
        meter = self.ms.cost_meter
        token = meter.begin(Cause.GET_DIRTY_LOG)
        t0 = time.perf_counter_ns()
        try:
            self.kvm.get_dirty_log(mem.id, mem.dirty_bmap, flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                exc.add_note(f"KVM_GET_DIRTY_LOG slot={mem.id} gpa={mem.start_addr:#x} flags={flags:#x}")
                raise
        finally:
            dt = time.perf_counter_ns() - t0
            meter.end(Cause.GET_DIRTY_LOG, token, 0 if meter is NO_METER else popcount(mem.dirty_bmap))
            self._n["fetch_time_ns"] += dt
            self._n["get_dirty_log_calls"] += 1
            if self.ms.global_sync_in_progress:
                self._n["last_sync_time_ns"] += dt

    def _slot_sync_dirty_pages(self, mem: KVMSlot) -> int:
        """``kvm_slot_sync_dirty_pages``: OR ``dirty_bmap`` into every active client."""
        assert mem.dirty_bmap is not None
        n = self.ms.physical_memory_set_dirty_lebitmap(
            mem.dirty_bmap, mem.ram_start_offset // TARGET_PAGE_SIZE, mem.memory_size // self.page_size
        )
        self._n["pages_fetched"] += n
        if self.ms.global_sync_in_progress:
            self._n["last_sync_pages"] += n
        return n

    def _set_phys_mem(self, section: MemoryRegionSection, add: bool) -> None:
        mr = section.mr
        if not mr.is_ram():
            return
        start, size = self.align_section(section)
        if not size:
            return
        assert mr.ram_block is not None
        mr_offset = section.offset_within_region + start - section.offset_within_address_space
        ram_start = mr.ram_block.offset + mr_offset
        if not add:
            while size:
                slot_size = min(self.max_slot_size, size)
                mem = self._slots.get((start, slot_size))
                if mem is None:
                    return
                if mem.flags & KVM_MEM_LOG_DIRTY_PAGES:
                    # Harvest before the bitmap dies with the slot.  Protecting
                    # fetch: the pages are about to be unmapped anyway.
                    if self.dirty_ring:
                        self.dirty_ring_reap()
                    else:
                        self._slot_get_dirty_log(mem, 0)
                    self._slot_sync_dirty_pages(mem)
                    self._n["harvests"] += 1
                mem.dirty_bmap = None
                mem.memory_size = 0
                mem.flags = 0
                self._set_user_memory_region(mem)
                del self._slots[(start, slot_size)]
                self._ids.free(mem)
                start += slot_size
                size -= slot_size
            return
        host = mr.ram_block.host
        while size:
            slot_size = min(self.max_slot_size, size)
            mem = self._ids.alloc(self.as_id)
            mem.memory_size = slot_size
            mem.start_addr = start
            mem.ram_start_offset = ram_start
            mem.ram = host[mr_offset : mr_offset + slot_size]
            mem.flags = self._mem_flags(mr)
            self._slot_init_dirty_bitmap(mem)
            try:
                self._set_user_memory_region(mem)
            except BaseException:
                self._ids.free(mem)
                raise
            self._slots[(start, slot_size)] = mem
            start += slot_size
            ram_start += slot_size
            mr_offset += slot_size
            size -= slot_size

    def _section_update_flags(self, section: MemoryRegionSection) -> None:
        start, size = self.align_section(section)
        while size:
            slot_size = min(self.max_slot_size, size)
            mem = self._slots.get((start, slot_size))
            if mem is None:
                return  # not mapped (yet): the slot gets its flags when added
            mem.flags = self._mem_flags(section.mr)
            if mem.flags != mem.old_flags:
                self._slot_init_dirty_bitmap(mem)
                self._set_user_memory_region(mem)
            start += slot_size
            size -= slot_size

    # -- MemoryListener: topology ---------------------------------------------------
    def begin(self) -> None:
        self._in_transaction = True

    def region_add(self, section: MemoryRegionSection) -> None:
        self._transaction_add.append(section)

    def region_del(self, section: MemoryRegionSection) -> None:
        self._transaction_del.append(section)

    def commit(self) -> None:
        """``kvm_region_commit``: deletions first, then additions."""
        dels, adds = self._transaction_del, self._transaction_add
        self._transaction_del, self._transaction_add = [], []
        self._in_transaction = False
        for section in dels:
            self._set_phys_mem(section, False)
        for section in adds:
            self._set_phys_mem(section, True)
        if self._wp_hook is not None:
            self._wp_hook.off_if_idle()  # a deferred request, once every listener committed

    def log_start(self, section: MemoryRegionSection, old: int, new: int) -> None:
        if old != 0:
            return
        self._section_update_flags(section)

    def log_stop(self, section: MemoryRegionSection, old: int, new: int) -> None:
        if new != 0:
            return
        self._section_update_flags(section)

    # -- MemoryListener: dirty log -------------------------------------------------------
    def _sync_stats_begin(self) -> bool:
        """Account one sync call; returns whether it belongs to a global sync."""
        if not self.ms.global_sync_in_progress:
            self._n["region_syncs"] += 1
            return False
        if self._sync_generation != self.ms.global_sync_count:
            self._sync_generation = self.ms.global_sync_count
            self._n["global_syncs"] += 1
            self._n["last_sync_time_ns"] = 0
            self._n["last_sync_pages"] = 0
            self._n["last_write_protect_time_ns"] = 0
        return True

    def log_sync(self, section: MemoryRegionSection) -> None:
        """``kvm_log_sync``.  The fetch flags follow the rule in the module
        docstring: only a global sync may leave pages unprotected, because only
        it is followed by write-protect-all before anyone reads."""
        is_global = self._sync_stats_begin()
        meter = self.ms.cost_meter
        token = 0 if is_global else meter.begin(Cause.REGION_SYNC)
        try:
            unprotected = self.mode is DirtyLogMode.WRITE_PROTECT_ALL and (
                is_global or self.region_sync_rule is not RegionSyncRule.PROTECTING_FETCH
            )
            flags = KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT if unprotected else 0
            fetched = self.physical_sync_dirty_bitmap(section, flags)
            if unprotected and fetched:
                self._wp_pending = True
                if not is_global and self.region_sync_rule is RegionSyncRule.WRITE_PROTECT_ALL:
                    assert self._wp_hook is not None
                    self._wp_hook(True)
                # NAIVE: nothing re-protects the fetched pages until the next global sync.
        finally:
            if not is_global:
                meter.end(Cause.REGION_SYNC, token)

    def physical_sync_dirty_bitmap(self, section: MemoryRegionSection, flags: int = 0) -> int:
        """``kvm_physical_sync_dirty_bitmap``: fetch each slot of the section and
        merge it into the clients.  Returns the number of slots fetched."""
        start, size = self.align_section(section)
        fetched = 0
        while size:
            slot_size = min(self.max_slot_size, size)
            mem = self._slots.get((start, slot_size))
            if mem is None:
                return fetched  # no slot: every access traps
            if mem.dirty_bmap is not None:
                self._slot_get_dirty_log(mem, flags)
                self._slot_sync_dirty_pages(mem)
                fetched += 1
            start += slot_size
            size -= slot_size
        return fetched

    def log_clear(self, section: MemoryRegionSection) -> None:
        """``kvm_log_clear`` -> ``kvm_physical_log_clear`` (manual protect only)."""
        if self.mode is not DirtyLogMode.MANUAL_PROTECT:
            return
        start = section.offset_within_address_space
        size = section.size
        if not size:
            return
        end = start + size
        for mem in list(self._slots.values()):
            mem_end = mem.start_addr + mem.memory_size
            if mem.start_addr >= end or start >= mem_end:
                continue
            if start >= mem.start_addr:
                offset = start - mem.start_addr
                count = min(mem.memory_size - offset, size)
            else:
                offset = 0
                count = min(mem.memory_size, size - (mem.start_addr - start))
            self._log_clear_one_slot(mem, offset, count)

    def _log_clear_one_slot(self, mem: KVMSlot, start: int, size: int) -> None:
        """``kvm_log_clear_one_slot``: ``start``/``size`` in bytes within the slot."""
        ps = self.page_size
        align_pages = 1 << KVM_CLEAR_LOG_SHIFT
        bmap_start = (start // ps) // align_pages * align_pages
        start_delta = start // ps - bmap_start
        size_pages = size // ps
        # The kernel wants num_pages 64-aligned, or reaching the end of the slot.
        bmap_npages = -(-(start_delta + size_pages) // align_pages) * align_pages
        bmap_npages = min(bmap_npages, mem.memory_size // ps - bmap_start)
        if mem.dirty_bmap is None:
            raise AssertionError(f"log_clear before any sync on slot {mem.id}")
        w0 = bmap_start // 64
        nw = -(-bmap_npages // 64)
        window = mem.dirty_bmap[w0 : w0 + nw]
        m0, mask = range_mask(start_delta, size_pages)
        full = np.zeros(nw, dtype=np.uint64)
        full[m0 : m0 + len(mask)] = mask
        # Only bits we fetched, only inside the requested range: anything set in
        # the kernel since our GET is not in dirty_bmap and stays set.
        clear = window & full
        npages = popcount(clear)
        if npages:
            meter = self.ms.cost_meter
            token = meter.begin(Cause.CLEAR_DIRTY_LOG)
            t0 = time.perf_counter_ns()
            try:
                self.kvm.clear_dirty_log(mem.id, bmap_start, bmap_npages, clear)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    exc.add_note(
                        f"KVM_CLEAR_DIRTY_LOG slot={mem.id} first_page={bmap_start} num_pages={bmap_npages}"
                    )
                    raise
            finally:
                dt = time.perf_counter_ns() - t0
                meter.end(Cause.CLEAR_DIRTY_LOG, token, npages)
                self._n["clear_time_ns"] += dt
                self._n["last_write_protect_time_ns"] += dt
                self._n["clear_dirty_log_calls"] += 1
            self._n["pages_cleared"] += npages
        window &= ~full

    # -- dirty ring ------------------------------------------------------------------
    def dirty_ring_reap(self) -> int:
        """``kvm_dirty_ring_reap``: harvest every ring, reset (re-protect), then
        mark the entries in the slots' ``dirty_bmap``.  Returns the entry count.

        Public because QEMU's reaper calls it from outside the listener too:
        a vCPU that exits with ``KVM_EXIT_DIRTY_RING_FULL`` waits for it
        (``SimVCPUs.on_ring_full``)."""
        assert self._ring is not None
        t0 = time.perf_counter_ns()
        slots, offsets = self._ring(self.ms.cost_meter)
        self._n["fetch_time_ns"] += time.perf_counter_ns() - t0
        mark_ring_entries(self._slots.values(), slots, offsets, self.page_size)
        return len(offsets)

    def log_sync_global(self, last_stage: bool) -> None:
        """``kvm_log_sync_global`` (dirty ring only): reap, then publish and
        zero each logged slot."""
        if self._ring is None:
            raise KVMListenerError("log_sync_global on a listener without a dirty ring")
        is_global = self._sync_stats_begin()
        meter = self.ms.cost_meter
        token = 0 if is_global else meter.begin(Cause.REGION_SYNC)
        t0 = time.perf_counter_ns()
        try:
            self.dirty_ring_reap()
            for mem in list(self._slots.values()):
                if mem.flags & KVM_MEM_LOG_DIRTY_PAGES and mem.dirty_bmap is not None:
                    self._slot_sync_dirty_pages(mem)
                    mem.dirty_bmap[:] = 0
        finally:
            if not is_global:
                meter.end(Cause.REGION_SYNC, token)
        if is_global:
            self._n["last_sync_time_ns"] += time.perf_counter_ns() - t0
