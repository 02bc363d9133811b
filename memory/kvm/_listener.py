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

Three ways to re-protect what was fetched
=========================================

Some facts about KVM dirty logging (see /work/shared/reference/kvm.md): a
page is logged when a write faults on a write-protected mapping; once the
fault made the mapping writable, further writes are silent until something
write-protects the page again.  Hence the one rule every mode obeys:

    fetch -> re-protect -> only then may anyone read the fetched pages.

* **legacy**: ``KVM_GET_DIRTY_LOG`` (flags 0) returns the bits, clears them and
  write-protects those pages through the rmap, all in the one ioctl.  Its cost
  grows with the number of dirty pages.
* **manual protect** (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with
  ``INITIALLY_SET``): GET only copies.  ``log_clear`` (from
  ``memory_region_clear_dirty_bitmap``, which migration calls per chunk
  *before* sending any page of it) issues ``KVM_CLEAR_DIRTY_LOG`` for **only
  the bits already fetched into ``dirty_bmap``** inside the requested range
  (start aligned down to 64 pages, the padding masked off), then drops them
  from ``dirty_bmap``.  A bit set in the kernel after our GET was never in
  ``dirty_bmap``, so it is never cleared unseen.
* **write-protect-all** (the 2017 series: caps 145 and 146): a *global* sync
  fetches every slot with ``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT`` (bits copied
  and cleared, pages left writable), and the memory core's write-protect-all
  hook - called after every listener fetched every slot and before the sync
  returns - issues one ``KVM_WRITE_PROTECT_ALL_MEM(1)``.  A write landing
  between the fetch and the protection is not in the kernel bitmap, but the
  page is in our snapshot and will be read only after the protection, so it
  is not lost (Paolo's reading of the series).

  ``KVM_WRITE_PROTECT_ALL_MEM(0)`` only clears the enable bit: tables the lazy
  protection has not reached yet are then never protected, so their pages
  stay writable and unlogged.  The draft issued it after every ``log_stop``;
  a display switching VGA logging off mid-migration (or migration ending
  while a display still logs) would lose writes.  Rule kept here: the
  memory core's ``False`` request is deferred until every listener of the VM
  has committed the topology update, and issued only if no slot of any of
  them still logs dirty pages.

  Both requests are per VM, not per listener (``WriteProtectAllHook``): the
  ioctl protects every address space, so one call after the last fetch of
  every listener covers them all, and it must be made if *any* of them
  fetched without protection (x86 QEMU has two KVM listeners, as 0 and the
  SMRAM address space as 1).

Per-region syncs in write-protect-all mode (Paolo's open question)
==================================================================

"How would this work when kvm_physical_sync_dirty_bitmap is called from
memory_region_sync_dirty_bitmap rather than memory_global_dirty_log_sync?"
A display device syncs only its own region (``memory_region_sync_dirty_bitmap``
in 2017, ``memory_region_snapshot_and_clear_dirty`` today), at its refresh
rate, between migration's global syncs.  Nothing calls write-protect-all at
the end of such a sync.  If it fetched with ``WITHOUT_WRITE_PROTECT`` (the
draft's unconditional flag - ``RegionSyncRule.NAIVE``), a page P it fetched
stays writable with its kernel bit cleared, until the next global sync's
write-protect-all - which, outside a migration, never comes.  The display
loses for sure: global sync + WP-all, guest writes P (logged), display sync
(naive: P fetched, drawn, left writable), guest writes P again (silent), the
next refresh does not redraw P.  Migration is saved only by the order of its
consumer: P's bit also went into MIGRATION, and QEMU's consumer reads those
bits only in ``migration_bitmap_sync``, right after a global sync whose
write-protect-all re-protects P, so it reads P after the silent write.  A
consumer that took MIGRATION bits without a global sync of its own (trusting
the display's fetch) would read P, the guest would write it silently, and
the destination would keep the old P.  Rather than depend on that, every
fetch is made safe where it happens.

The rule chosen (``RegionSyncRule.PROTECTING_FETCH``, the default): **a sync that
is not the global sync uses the protecting fetch** - ``KVM_GET_DIRTY_LOG``
with flags 0, so the kernel write-protects through the rmap exactly the pages
it returns.  Every page fetched is protected by the same ioctl, before the
caller can read it, and the cost grows only with that region's dirty pages
(a framebuffer), never with guest size; the O(1) write-protect-all stays
reserved for the global sync where the rmap walk was the expensive part.
The listener tells the two apart by ``MemorySystem.global_sync_in_progress``.

Alternative (``RegionSyncRule.WRITE_PROTECT_ALL``): fetch without protection
and call ``KVM_WRITE_PROTECT_ALL_MEM(1)`` right after the region's slots were
fetched.  Also correct, but every display refresh then write-protects the
whole guest, and every page the guest writes afterwards takes a fault again:
a 60 Hz display would multiply migration's fault rate.  ``NAIVE`` is kept
only so tests can show it loses a page.

Other modes need no special rule: legacy GET always protects; in manual
mode a per-region fetch only copies, and the display's
``memory_region_clear_dirty_bitmap`` re-protects what it consumed.

Dirty ring
==========

With ``dirty_ring=True`` (the VM has the ring enabled before any vCPU) the
listener has ``log_sync_global`` instead of ``log_sync``/``log_clear``:
every sync, even one requested for a single region, reaps every vCPU's ring
(harvest, then ``KVM_RESET_DIRTY_RINGS`` re-protects the pages), marks the
entries in the slots' ``dirty_bmap`` and only then publishes and zeroes each
logged slot's ``dirty_bmap`` - bits are never published before their pages are
re-protected.  ``KVM_GET_DIRTY_LOG`` is never used (ENXIO on a ring VM).
"""

from __future__ import annotations

import enum
import errno
import heapq
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .._dirty import popcount, range_mask
from .._errors import KVMListenerError
from .._listener import MemoryListener
from .._ramblock import TARGET_PAGE_SIZE
from ._backend import KvmVM, UserMemoryRegion
from .linux_kvm import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_CAP_X86_WRITE_PROTECT_ALL_MEM,
    KVM_CLEAR_LOG_SHIFT,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_MEM_LOG_DIRTY_PAGES,
)

if TYPE_CHECKING:
    from .._region import MemoryRegion, MemoryRegionSection
    from .._system import MemorySystem

#: QEMU's default when KVM_CAP_NR_MEMSLOTS answers 0
_DEFAULT_NR_SLOTS = 32


class DirtyLogMode(enum.Enum):
    """How fetched pages are re-protected (see the module docstring)."""

    LEGACY = "legacy"
    MANUAL_PROTECT = "manual-protect"
    WRITE_PROTECT_ALL = "write-protect-all"
    DIRTY_RING = "dirty-ring"


class RegionSyncRule(enum.Enum):
    """What a per-region sync does in write-protect-all mode."""

    PROTECTING_FETCH = "protecting-fetch"
    WRITE_PROTECT_ALL = "write-protect-all"
    NAIVE = "naive"  # loses pages; for tests only


class WriteProtectAllHook:
    """The draft's ``kvm_write_protect_all_mem``: ONE per VM, shared by every
    ``KVMMemoryListener`` of that VM (QEMU's ``kvm_init`` registers it once, and
    ``KVM_WRITE_PROTECT_ALL_MEM`` acts on every address space of the VM).

    Ordering rule it keeps: the memory core calls it with ``True`` after the
    last fetch of EVERY listener; it must then protect if ANY listener of the
    VM fetched without protection since the last call.  A per-listener hook
    is wrong twice over: the memory core keeps one hook, so the last
    registered listener's would replace the others' (and, if that listener
    fetched nothing, the others' unprotected fetches would never be
    re-protected), and unregistering it would leave the others fetching
    ``WITHOUT_WRITE_PROTECT`` with no hook at all.  ``False`` (switch the lazy
    protection off) is safe only when no slot of ANY listener of the VM still
    logs, checked once every listener has applied its part of the topology
    update.
    """

    def __init__(self, kvm: KvmVM) -> None:
        self.kvm = kvm
        self.listeners: list[KVMMemoryListener] = []
        self.off_requested = False

    def __call__(self, write: bool) -> None:
        if not write:
            self.off_requested = True
            self.off_if_idle()
            return
        pending = [kml for kml in self.listeners if kml._wp_pending]
        if not pending:
            return  # no page was left unprotected since the last call
        t0 = time.perf_counter_ns()
        try:
            self.kvm.write_protect_all(True)
        except OSError as exc:
            exc.add_note("KVM_WRITE_PROTECT_ALL_MEM(1)")
            raise
        dt = time.perf_counter_ns() - t0
        for kml in pending:
            kml._wp_pending = False
            kml._n["write_protect_all_calls"] += 1
            kml._n["write_protect_time_ns"] += dt
            kml._n["last_write_protect_time_ns"] = dt

    def off_if_idle(self) -> None:
        """Issue a requested ``KVM_WRITE_PROTECT_ALL_MEM(0)`` once no listener of
        the VM is inside a topology update, and only if no slot logs."""
        if not self.off_requested or any(kml._in_transaction for kml in self.listeners):
            return
        self.off_requested = False
        if any(mem.flags & KVM_MEM_LOG_DIRTY_PAGES for kml in self.listeners for mem in kml._slots.values()):
            return  # some slot still logs: its writes rely on the lazy protection
        try:
            self.kvm.write_protect_all(False)
        except OSError as exc:
            exc.add_note("KVM_WRITE_PROTECT_ALL_MEM(0)")
            raise
        for kml in self.listeners:
            kml._n["write_protect_off_calls"] += 1


class KVMSlot:
    """``KVMSlot`` (include/system/kvm_int.h).  ``ram`` is the host view."""

    __slots__ = (
        "slot",
        "as_id",
        "start_addr",
        "memory_size",
        "ram",
        "ram_start_offset",
        "flags",
        "old_flags",
        "dirty_bmap",
    )

    def __init__(self, slot: int, as_id: int) -> None:
        self.slot = slot
        self.as_id = as_id
        self.start_addr = 0
        self.memory_size = 0
        self.ram: NDArray[np.uint8] | None = None
        self.ram_start_offset = 0
        self.flags = 0
        self.old_flags = 0
        self.dirty_bmap: NDArray[np.uint64] | None = None

    @property
    def id(self) -> int:
        """The ioctl slot id, ``slot | as_id << 16``."""
        return self.slot | (self.as_id << 16)

    def __repr__(self) -> str:
        return (
            f"KVMSlot({self.slot}, gpa=[{self.start_addr:#x}, {self.start_addr + self.memory_size:#x}), "
            f"ram_addr={self.ram_start_offset:#x}, flags={self.flags:#x})"
        )


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
        dirty_ring: the VM uses the dirty ring (excludes the other modes).

    Raises:
        KVMListenerError: a mode was requested that the VM cannot provide.
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
        self.nr_slots = int(kvm.check_extension(KVM_CAP_NR_MEMSLOTS)) or _DEFAULT_NR_SLOTS
        self.region_sync_rule = region_sync_rule
        self.dirty_ring = dirty_ring
        if dirty_ring:
            if write_protect_all or manual_protect:
                raise KVMListenerError("the dirty ring excludes write-protect-all and manual protect")
            self.mode = DirtyLogMode.DIRTY_RING
            # kvm_memory_listener_register: log_sync_global instead of log_sync/log_clear.
            self.log_sync = None  # type: ignore[assignment]
            self.log_clear = None  # type: ignore[assignment]
            self.log_sync_global = self._log_sync_global_ring  # type: ignore[method-assign]
        else:
            self.mode = self._choose_mode(write_protect_all, manual_protect)

        self._slots: dict[tuple[int, int], KVMSlot] = {}
        self._free_ids: list[int] = []
        self._next_id = 0
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

    # -- setup -------------------------------------------------------------------
    def _choose_mode(self, write_protect_all: bool | None, manual_protect: bool | None) -> DirtyLogMode:
        kvm = self.kvm
        wp_caps = bool(kvm.check_extension(KVM_CAP_X86_WRITE_PROTECT_ALL_MEM)) and bool(
            kvm.check_extension(KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT)
        )
        manual_caps = int(kvm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) & KVM_DIRTY_LOG_MANUAL_CAPS
        if write_protect_all and manual_protect:
            raise KVMListenerError("write-protect-all and manual protect are exclusive")
        if write_protect_all is None:
            write_protect_all = wp_caps and not manual_protect
        elif write_protect_all and not wp_caps:
            raise KVMListenerError(
                "write-protect-all requested but not supported",
                cap_write_protect_all=KVM_CAP_X86_WRITE_PROTECT_ALL_MEM,
                cap_without_write_protect=KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
            )
        if write_protect_all:
            return DirtyLogMode.WRITE_PROTECT_ALL
        explicit = manual_protect is True
        if manual_protect is None:
            manual_protect = bool(manual_caps)
        if not manual_protect:
            return DirtyLogMode.LEGACY
        if not manual_caps:
            raise KVMListenerError("manual protect requested but not supported", cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        try:
            kvm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual_caps)
        except OSError:
            if explicit:
                raise
            return DirtyLogMode.LEGACY  # QEMU warns and falls back
        return DirtyLogMode.MANUAL_PROTECT

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

    def _alloc_slot(self) -> KVMSlot:
        if self._free_ids:
            return KVMSlot(heapq.heappop(self._free_ids), self.as_id)
        if self._next_id >= self.nr_slots:
            raise KVMListenerError("no free slot available", nr_slots=self.nr_slots)
        self._next_id += 1
        return KVMSlot(self._next_id - 1, self.as_id)

    def _free_slot(self, mem: KVMSlot) -> None:
        heapq.heappush(self._free_ids, mem.slot)

    def _set_user_memory_region(self, mem: KVMSlot) -> None:
        region = UserMemoryRegion(mem.id, mem.flags, mem.start_addr, mem.memory_size, mem.ram)
        try:
            self.kvm.set_user_memory_region(region)
        except OSError as exc:
            exc.add_note(
                f"KVM_SET_USER_MEMORY_REGION slot={mem.id} gpa={mem.start_addr:#x} "
                f"size={mem.memory_size:#x} flags={mem.flags:#x}"
            )
            raise
        mem.old_flags = mem.flags

    def _slot_init_dirty_bitmap(self, mem: KVMSlot) -> None:
        if not mem.flags & KVM_MEM_LOG_DIRTY_PAGES or mem.dirty_bmap is not None:
            return
        npages = mem.memory_size // self.page_size
        mem.dirty_bmap = np.zeros((npages + 63) // 64, dtype=np.uint64)

    def _slot_get_dirty_log(self, mem: KVMSlot, flags: int) -> None:
        """``kvm_slot_get_dirty_log``: GET into ``dirty_bmap``; ENOENT is fine."""
        assert mem.dirty_bmap is not None
        t0 = time.perf_counter_ns()
        try:
            self.kvm.get_dirty_log(mem.id, mem.dirty_bmap, flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                exc.add_note(f"KVM_GET_DIRTY_LOG slot={mem.id} gpa={mem.start_addr:#x} flags={flags:#x}")
                raise
        finally:
            dt = time.perf_counter_ns() - t0
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
                        self._dirty_ring_reap()
                    else:
                        self._slot_get_dirty_log(mem, 0)
                    self._slot_sync_dirty_pages(mem)
                    self._n["harvests"] += 1
                mem.dirty_bmap = None
                mem.memory_size = 0
                mem.flags = 0
                self._set_user_memory_region(mem)
                del self._slots[(start, slot_size)]
                self._free_slot(mem)
                start += slot_size
                size -= slot_size
            return
        host = mr.ram_block.host
        while size:
            slot_size = min(self.max_slot_size, size)
            mem = self._alloc_slot()
            mem.memory_size = slot_size
            mem.start_addr = start
            mem.ram_start_offset = ram_start
            mem.ram = host[mr_offset : mr_offset + slot_size]
            mem.flags = self._mem_flags(mr)
            self._slot_init_dirty_bitmap(mem)
            try:
                self._set_user_memory_region(mem)
            except BaseException:
                self._free_slot(mem)
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
                self._n["clear_time_ns"] += dt
                self._n["last_write_protect_time_ns"] += dt
                self._n["clear_dirty_log_calls"] += 1
            self._n["pages_cleared"] += npages
        window &= ~full

    # -- dirty ring ------------------------------------------------------------------
    def _dirty_ring_reap(self) -> int:
        """``kvm_dirty_ring_reap``: harvest every ring, reset (re-protect), then
        mark the entries in the slots' ``dirty_bmap``.  Returns the entry count."""
        t0 = time.perf_counter_ns()
        reap = getattr(self.kvm, "reap_dirty_rings", None)
        if reap is not None:
            slots, offsets, _ = reap()
        else:
            slots, offsets = self.kvm.harvest_dirty_rings()  # type: ignore[attr-defined]
            if len(offsets):
                self.kvm.reset_dirty_rings()  # type: ignore[attr-defined]
        self._n["fetch_time_ns"] += time.perf_counter_ns() - t0
        slots = np.asarray(slots, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        if not len(offsets):
            return 0
        by_id = {mem.id: mem for mem in self._slots.values()}
        ids = np.sort(slots)  # (np.unique is ~10x slower than a sort here)
        for sid in ids[np.r_[True, ids[1:] != ids[:-1]]].tolist():
            mem = by_id.get(sid)
            if mem is None or mem.dirty_bmap is None:
                continue  # another address space, or a slot already gone
            offs = offsets[slots == sid]
            offs = np.sort(offs[offs < mem.memory_size // self.page_size])
            if not offs.size:
                continue
            # O(entries), not O(slot size): OR one word per run of entries
            # (repeats are harmless to an OR)
            words = offs >> 6
            bits = np.left_shift(np.uint64(1), (offs & 63).astype(np.uint64))
            starts = np.flatnonzero(np.r_[True, words[1:] != words[:-1]])
            mem.dirty_bmap[words[starts]] |= np.bitwise_or.reduceat(bits, starts)
        return len(offsets)

    def _log_sync_global_ring(self, last_stage: bool) -> None:
        """``kvm_log_sync_global``: reap, then publish and zero each logged slot."""
        self._sync_stats_begin()
        t0 = time.perf_counter_ns()
        self._dirty_ring_reap()
        for mem in list(self._slots.values()):
            if mem.flags & KVM_MEM_LOG_DIRTY_PAGES and mem.dirty_bmap is not None:
                self._slot_sync_dirty_pages(mem)
                mem.dirty_bmap[:] = 0
        if self.ms.global_sync_in_progress:
            self._n["last_sync_time_ns"] += time.perf_counter_ns() - t0
