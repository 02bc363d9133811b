"""``MemorySystem``: QEMU's memory-core globals in one object.

QEMU keeps these as globals in system/memory.c and system/physmem.c:
``ram_list`` (blocks and the per-client dirty bitmaps), ``address_spaces``,
``memory_listeners``, the transaction depth, ``global_dirty_tracking`` and,
with the 2017 fast-write-protect draft, the write-protect-all callback.  Here
one ``MemorySystem`` owns them (no module state), and its methods carry QEMU's
function names.

Theory of operation
===================

**Transactions.**  Tree changes (``MemoryRegion.add_subregion`` etc.) happen
inside ``memory_region_transaction_begin/commit``, which nest.  When the depth
returns to 0 with an update pending, every address space is re-rendered and
its listeners see the difference, in this order (system/memory.c
``memory_region_transaction_commit`` / ``address_space_update_topology_pass``):

1. ``begin`` on every listener (forward);
2. per address space, a removal pass over old/new ranges: ``region_del``
   (reverse listener order) for each range that is gone or changed;
3. an addition pass: for unchanged ranges ``region_nop`` and, if the client
   mask changed, ``log_start(old, new)`` (forward) and/or ``log_stop(old, new)``
   (reverse); ``region_add`` (forward) for new ranges;
4. ``commit`` on every listener (forward).

**Dirty logging.**  ``memory_global_dirty_log_start(flags)`` sets
``global_dirty_tracking``; on the first flag it calls ``log_global_start`` on
every listener and then runs an empty transaction: every RAM range now has
MIGRATION in its mask, so each gets ``log_start``.  Stopping is the reverse.

**Syncs.**  ``memory_global_dirty_log_sync`` asks every listener to fetch
(``log_sync`` per logged range of its address space, or one
``log_sync_global``).  A fetch ORs the bits into every active client
(:meth:`physical_memory_set_dirty_lebitmap`).

**The write-protect-all hook (2017 draft).**  With
``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT`` the fetch leaves the fetched pages
writable, so a write after it is not logged.  That is safe only if all memory
is write-protected again *after the last fetch and before anyone reads the
fetched pages*.  Ordering rule: ``memory_global_dirty_log_sync`` calls the
registered function with ``True`` right after the last listener fetched its
last slot and before it returns (the draft's place) - so before migration
consumes the MIGRATION bitmap.  A sync that raises still calls it, so bits
already fetched stay safe.  The per-region syncs below do not call it: the
listener must make its own fetches safe there (see memory/kvm/_listener.py).

The draft also calls the hook with ``False`` after each ``log_stop`` of the
topology update; so does this core.  Switching the kernel's lazy protection
off is only safe once *no* slot logs any more (a display turning VGA off in
the middle of a migration, or migration ending while a display still logs,
must not disable it): the KVM listeners, which know their slots' flags, defer
the request until every KVM listener of the VM has committed and issue
``KVM_WRITE_PROTECT_ALL_MEM(0)`` only if no logged slot is left in any of
them (see memory/kvm/_listener.py).  There is one hook per VM, as in the
draft: with several KVM listeners (x86: as 0 and SMRAM's as 1), the ``True``
call after the last fetch protects if any of them fetched without
protection.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from ._cost import NO_METER, Cause, CostMeter
from ._dirty import (
    DIRTY_CLIENTS_ALL,
    DIRTY_CLIENTS_NOCODE,
    DIRTY_MEMORY_VGA,
    GLOBAL_DIRTY_DIRTY_RATE,
    GLOBAL_DIRTY_MASK,
    DirtyBitmapSnapshot,
    DirtyMemory,
    Words,
)
from ._errors import MemoryRegionError
from ._listener import MemoryListener, listener_implements
from ._ramblock import TARGET_PAGE_BITS, RAMList
from ._region import (
    UINT64_RANGE,
    AddressSpace,
    FlatView,
    MemoryRegion,
    MemoryRegionSection,
    page_range,
)

WriteProtectAllFn = Callable[[bool], None]


def _insert_by_priority(lst: list[MemoryListener], listener: MemoryListener) -> None:
    pos = len(lst)
    for i, other in enumerate(lst):
        if listener.priority < other.priority:
            pos = i
            break
    lst.insert(pos, listener)


class MemorySystem:
    """QEMU's memory core (one per VM).

    Attributes:
        ram_list: RAM blocks in ram_addr space.
        dirty_memory: per-client dirty bitmaps over ram_addr pages.
        system_memory: the root container (``get_system_memory()``).
        address_space_memory: the CPU address space over ``system_memory``.
        global_dirty_tracking: ``GLOBAL_DIRTY_*`` flags.
        global_sync_in_progress: True while ``memory_global_dirty_log_sync``
            runs its listeners (a listener's ``log_sync`` uses it to tell a
            global sync from a per-region one).
        global_sync_count: number of global syncs started.
        total_dirty_pages: pages fetched while ``GLOBAL_DIRTY_DIRTY_RATE`` is on.
        cost_meter: the :class:`memory.CostMeter` told about every global sync
            and, by the KVM listener, every dirty-log ioctl (see
            ``memory/_cost.py`` for the hooks); :data:`memory.NO_METER` by
            default.  Set it to measure; nothing is patched.
    """

    def __init__(self) -> None:
        self.ram_list = RAMList()
        self.dirty_memory = DirtyMemory(0)
        self.address_spaces: list[AddressSpace] = []
        self.memory_listeners: list[MemoryListener] = []
        self.global_dirty_tracking = 0
        self.global_sync_in_progress = False
        self.global_sync_count = 0
        self.total_dirty_pages = 0
        self.cost_meter: CostMeter = NO_METER
        self._transaction_depth = 0
        self._update_pending = False
        self._write_protect_all_fn: WriteProtectAllFn | None = None
        self.system_memory = self.memory_region_init("system", UINT64_RANGE)
        self.address_space_memory = self.address_space_init(self.system_memory, "memory")

    # -- region constructors -----------------------------------------------------
    def memory_region_init(self, name: str, size: int) -> MemoryRegion:
        """A container."""
        return MemoryRegion(self, name, size, terminates=False)

    def memory_region_init_ram(self, name: str, size: int) -> MemoryRegion:
        """A RAM region with a new RAMBlock (``idstr`` = ``name``).

        Like ``ram_block_add``, the new block starts dirty for every client.
        """
        mr = MemoryRegion(self, name, size, terminates=True)
        block = self.ram_list.alloc(name, size)
        block.mr = mr  # type: ignore[attr-defined]  # QEMU's RAMBlock.mr
        mr.ram = True
        mr.ram_block = block
        self.dirty_memory.grow(self.ram_list.ram_addr_size)
        self.dirty_memory.set_dirty_range(block.offset >> TARGET_PAGE_BITS, block.npages, DIRTY_CLIENTS_ALL)
        return mr

    def memory_region_init_alias(self, name: str, orig: MemoryRegion, offset: int, size: int) -> MemoryRegion:
        mr = MemoryRegion(self, name, size, terminates=False)
        mr.alias = orig
        mr.alias_offset = offset
        return mr

    def memory_region_init_io(self, name: str, size: int) -> MemoryRegion:
        """An MMIO placeholder: terminates, not RAM, never a KVM slot."""
        return MemoryRegion(self, name, size, terminates=True)

    # -- address spaces and listeners ------------------------------------------------
    def address_space_init(self, root: MemoryRegion, name: str) -> AddressSpace:
        as_ = AddressSpace(root, name)
        self.address_spaces.append(as_)
        as_.current_map = FlatView.render(root)
        return as_

    def memory_listener_register(self, listener: MemoryListener, as_: AddressSpace) -> None:
        """Register and replay the current state to ``listener``:
        ``begin``, ``log_global_start`` if tracking, ``region_add`` and
        ``log_start(0, mask)`` per range, ``commit``."""
        if listener_implements(listener, "log_sync") and listener_implements(listener, "log_sync_global"):
            raise AssertionError(f"{listener.name}: log_sync and log_sync_global are exclusive")
        if listener.address_space is not None:
            raise MemoryRegionError("listener already registered", region=as_.name)
        listener.address_space = as_
        _insert_by_priority(self.memory_listeners, listener)
        _insert_by_priority(as_.listeners, listener)
        view = as_.current_map
        listener.begin()
        if self.global_dirty_tracking:
            listener.log_global_start()
        for fr in view.ranges:
            section = MemoryRegionSection.from_flat_range(fr, view)
            listener.region_add(section)
            if fr.dirty_log_mask:
                listener.log_start(section, 0, fr.dirty_log_mask)
        listener.commit()

    def memory_listener_unregister(self, listener: MemoryListener) -> None:
        """Reverse the replay (``log_stop(mask, 0)`` and ``region_del`` per range)."""
        as_ = listener.address_space
        if as_ is None:
            return
        view = as_.current_map
        listener.begin()
        for fr in view.ranges:
            section = MemoryRegionSection.from_flat_range(fr, view)
            if fr.dirty_log_mask:
                listener.log_stop(section, fr.dirty_log_mask, 0)
            listener.region_del(section)
        listener.commit()
        self.memory_listeners.remove(listener)
        as_.listeners.remove(listener)
        listener.address_space = None

    def memory_register_write_protect_all(self, fn: WriteProtectAllFn | None) -> None:
        """The 2017 draft's hook (replaces any previous one; ``None`` removes it)."""
        self._write_protect_all_fn = fn

    # -- transactions ---------------------------------------------------------------
    def memory_region_transaction_begin(self) -> None:
        self._transaction_depth += 1

    def memory_region_transaction_commit(self) -> None:
        if self._transaction_depth <= 0:
            raise MemoryRegionError("commit without begin", region="(transaction)")
        self._transaction_depth -= 1
        if self._transaction_depth or not self._update_pending:
            return
        self._update_pending = False
        new_views = [FlatView.render(as_.root) for as_ in self.address_spaces]
        for listener in self.memory_listeners:
            listener.begin()
        for as_, new in zip(self.address_spaces, new_views):
            old = as_.current_map
            if as_.listeners:
                self._update_topology_pass(as_, old, new, adding=False)
                self._update_topology_pass(as_, old, new, adding=True)
            as_.current_map = new
        for listener in self.memory_listeners:
            listener.commit()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """``with ms.transaction(): ...`` = begin/commit."""
        self.memory_region_transaction_begin()
        try:
            yield
        finally:
            self.memory_region_transaction_commit()

    def _update_topology_pass(self, as_: AddressSpace, old: FlatView, new: FlatView, *, adding: bool) -> None:
        iold = inew = 0
        olds, news = old.ranges, new.ranges
        fwd = as_.listeners
        rev = fwd[::-1]
        while iold < len(olds) or inew < len(news):
            frold = olds[iold] if iold < len(olds) else None
            frnew = news[inew] if inew < len(news) else None
            if frold is not None and (
                frnew is None
                or frold.start < frnew.start
                or (frold.start == frnew.start and not frold.same_as(frnew))
            ):
                # In old but not in new, or changed.
                if not adding:
                    section = MemoryRegionSection.from_flat_range(frold, old)
                    for listener in rev:
                        listener.region_del(section)
                iold += 1
            elif frold is not None and frnew is not None and frold.same_as(frnew):
                # In both and unchanged, except perhaps the logging mask.
                if adding:
                    section = MemoryRegionSection.from_flat_range(frnew, new)
                    for listener in fwd:
                        listener.region_nop(section)
                    if frnew.dirty_log_mask & ~frold.dirty_log_mask:
                        for listener in fwd:
                            listener.log_start(section, frold.dirty_log_mask, frnew.dirty_log_mask)
                    if frold.dirty_log_mask & ~frnew.dirty_log_mask:
                        for listener in rev:
                            listener.log_stop(section, frold.dirty_log_mask, frnew.dirty_log_mask)
                        if self._write_protect_all_fn is not None:
                            self._write_protect_all_fn(False)  # the draft's placement
                iold += 1
                inew += 1
            else:
                assert frnew is not None
                if adding:
                    section = MemoryRegionSection.from_flat_range(frnew, new)
                    for listener in fwd:
                        listener.region_add(section)
                inew += 1

    # -- global dirty tracking -------------------------------------------------------
    def memory_global_dirty_log_start(self, flags: int) -> None:
        """Set ``flags``; on the first one start logging everywhere.

        Raises whatever a listener's ``log_global_start`` raises (or
        ``RuntimeError`` if it returns False); listeners already started are
        stopped again and the flags are left unchanged.
        """
        if not flags or flags & ~GLOBAL_DIRTY_MASK:
            raise ValueError(f"bad global dirty flags {flags:#x}")
        flags &= ~self.global_dirty_tracking
        if not flags:
            return
        old = self.global_dirty_tracking
        self.global_dirty_tracking |= flags
        if old:
            return
        started: list[MemoryListener] = []
        try:
            for listener in self.memory_listeners:
                if not listener.log_global_start():
                    raise RuntimeError(f"{listener.name}: log_global_start failed")
                started.append(listener)
        except BaseException:
            for listener in reversed(started):
                listener.log_global_stop()
            self.global_dirty_tracking &= ~flags
            raise
        with self.transaction():
            self._update_pending = True

    def memory_global_dirty_log_stop(self, flags: int) -> None:
        """Clear ``flags``; when none is left stop logging everywhere (QEMU's
        postponing while the VM is stopped is not modelled)."""
        if not flags or flags & ~GLOBAL_DIRTY_MASK:
            raise ValueError(f"bad global dirty flags {flags:#x}")
        if self.global_dirty_tracking & flags != flags:
            raise ValueError(f"flags {flags:#x} not set (tracking {self.global_dirty_tracking:#x})")
        self.global_dirty_tracking &= ~flags
        if self.global_dirty_tracking:
            return
        with self.transaction():
            self._update_pending = True
        for listener in reversed(self.memory_listeners):
            listener.log_global_stop()

    # -- syncs ---------------------------------------------------------------------
    def _sync_dirty_bitmap(self, mr: MemoryRegion | None, last_stage: bool) -> None:
        """The static ``memory_region_sync_dirty_bitmap(mr, last_stage)``."""
        for listener in list(self.memory_listeners):
            if listener_implements(listener, "log_sync"):
                as_ = listener.address_space
                assert as_ is not None
                view = as_.current_map
                for fr in view.ranges:
                    if fr.dirty_log_mask and (mr is None or fr.mr is mr):
                        listener.log_sync(MemoryRegionSection.from_flat_range(fr, view))
            elif listener_implements(listener, "log_sync_global"):
                listener.log_sync_global(last_stage)

    def memory_global_dirty_log_sync(self, last_stage: bool = False) -> None:
        """Fetch every listener's dirty bits, then write-protect-all(True).

        Metered as ``Cause.GLOBAL_SYNC`` (``FINAL_SYNC`` with ``last_stage``),
        from entry to return."""
        meter = self.cost_meter
        cause = Cause.FINAL_SYNC if last_stage else Cause.GLOBAL_SYNC
        token = meter.begin(cause)
        self.global_sync_count += 1
        self.global_sync_in_progress = True
        try:
            self._sync_dirty_bitmap(None, last_stage)
        finally:
            self.global_sync_in_progress = False
            try:
                # Every listener has fetched every slot: protect before any
                # consumer reads the fetched pages (the draft's placement).
                if self._write_protect_all_fn is not None:
                    self._write_protect_all_fn(True)
            finally:
                meter.end(cause, token)

    def memory_global_after_dirty_log_sync(self) -> None:
        for listener in list(self.memory_listeners):
            listener.log_global_after_sync()

    def memory_region_sync_dirty_bitmap(self, mr: MemoryRegion) -> None:
        """Per-region sync (exported in 2017-era QEMU): only ranges showing ``mr``."""
        self._sync_dirty_bitmap(mr, False)

    def memory_region_clear_dirty_bitmap(self, mr: MemoryRegion, start: int, size: int) -> None:
        """Call ``log_clear`` on every listener that has it, for each logged range
        of ``mr`` intersecting ``[start, start + size)`` (region offsets)."""
        for listener in list(self.memory_listeners):
            if not listener_implements(listener, "log_clear"):
                continue
            as_ = listener.address_space
            assert as_ is not None
            view = as_.current_map
            for fr in view.ranges:
                if not fr.dirty_log_mask or fr.mr is not mr:
                    continue
                sec_start = max(fr.offset_in_region, start)
                sec_end = min(fr.offset_in_region + fr.size, start + size)
                if sec_start >= sec_end:
                    continue
                listener.log_clear(
                    MemoryRegionSection(
                        mr, view, sec_start, fr.start + (sec_start - fr.offset_in_region), sec_end - sec_start, fr.readonly
                    )
                )

    # -- QEMU-named wrappers of MemoryRegion methods ------------------------------------
    def memory_region_set_log(self, mr: MemoryRegion, log: bool, client: int = DIRTY_MEMORY_VGA) -> None:
        mr.set_log(log, client)

    def memory_region_get_dirty_log_mask(self, mr: MemoryRegion) -> int:
        return mr.get_dirty_log_mask()

    # -- dirty bits of a region ----------------------------------------------------------
    def physical_memory_set_dirty_lebitmap(self, words: Words, start_page: int, npages: int) -> int:
        """OR a fetched bitmap into every active client: VGA always (as QEMU),
        MIGRATION while global tracking is on (CODE only under TCG: never)."""
        clients = DIRTY_CLIENTS_NOCODE if self.global_dirty_tracking else (1 << DIRTY_MEMORY_VGA)
        n = self.dirty_memory.set_dirty_lebitmap(words, start_page, npages, clients)
        if self.global_dirty_tracking & GLOBAL_DIRTY_DIRTY_RATE:
            self.total_dirty_pages += n
        return n

    def _ram_pages(self, mr: MemoryRegion, addr: int, size: int) -> tuple[int, int]:
        if mr.ram_block is None:
            raise MemoryRegionError("not a RAM region", region=mr.name)
        if addr < 0 or size < 0 or addr + size > mr.size:
            raise MemoryRegionError(f"range [{addr:#x}, {addr + size:#x}) outside region", region=mr.name)
        first, n = page_range(addr, size)
        return (mr.ram_block.offset >> TARGET_PAGE_BITS) + first, n

    def memory_region_snapshot_and_clear_dirty(
        self, mr: MemoryRegion, addr: int, size: int, client: int
    ) -> DirtyBitmapSnapshot:
        """What a display device calls: sync ``mr``, copy and clear ``client``'s
        bits (widened to 64-page words), ``memory_region_clear_dirty_bitmap`` for
        the range, then the after-sync notification."""
        start, n = self._ram_pages(mr, addr, size)
        self._sync_dirty_bitmap(mr, False)
        snap = self.dirty_memory.snapshot_and_clear(client, start, n)
        self.memory_region_clear_dirty_bitmap(mr, addr, size)
        self.memory_global_after_dirty_log_sync()
        return snap

    def memory_region_snapshot_get_dirty(
        self, mr: MemoryRegion, snap: DirtyBitmapSnapshot, addr: int, size: int
    ) -> bool:
        start, n = self._ram_pages(mr, addr, size)
        return snap.get_dirty(start, n)

    def memory_region_get_dirty(self, mr: MemoryRegion, addr: int, size: int, client: int) -> bool:
        start, n = self._ram_pages(mr, addr, size)
        return self.dirty_memory.get_dirty(client, start, n)

    def memory_region_set_dirty(self, mr: MemoryRegion, addr: int, size: int) -> None:
        """Mark a range dirty for the region's logging clients (device DMA)."""
        start, n = self._ram_pages(mr, addr, size)
        self.dirty_memory.set_dirty_range(start, n, mr.get_dirty_log_mask())

    def memory_region_reset_dirty(self, mr: MemoryRegion, addr: int, size: int, client: int) -> bool:
        """Test-and-clear ``client``'s bits, then ``memory_region_clear_dirty_bitmap``."""
        start, n = self._ram_pages(mr, addr, size)
        hit = self.dirty_memory.test_and_clear(client, start, n)
        self.memory_region_clear_dirty_bitmap(mr, addr, size)
        return hit

    def migration_dirty_words(self, mr: MemoryRegion) -> tuple[int, int]:
        """``(start_word, nwords)`` of ``mr``'s block in the MIGRATION bitmap (for
        ``dirty_memory.xchg_words(DIRTY_MEMORY_MIGRATION, ...)``)."""
        if mr.ram_block is None:
            raise MemoryRegionError("not a RAM region", region=mr.name)
        block = mr.ram_block
        start_page = block.offset >> TARGET_PAGE_BITS
        return start_page // 64, (block.npages + 63) // 64

