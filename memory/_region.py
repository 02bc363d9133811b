"""Memory regions, flat views and sections (QEMU's system/memory.c data model).

A guest's physical address space is a tree of ``MemoryRegion``s:

* **RAM** regions own a ``RAMBlock`` (guest memory, a place in ram_addr space);
* **alias** regions show a window (``alias_offset``, ``size``) of another region;
* **containers** only hold subregions;
* **I/O** regions (MMIO placeholders here) terminate the tree but are not RAM:
  an accelerator never maps them, so every access traps.

An ``AddressSpace`` renders its root into a ``FlatView``: sorted, disjoint
``FlatRange``s, each naming the terminal region it shows, the offset inside
that region and the region's dirty-log client mask.  Rendering rules
(``render_memory_region``):

* a disabled region and everything below it is skipped;
* subregions are visited in priority order, highest first; among equal
  priorities the one added **last** comes first (it is inserted before the
  existing equal-priority siblings), and whatever is rendered first owns the
  space — later regions only fill the gaps;
* a container's own space is rendered after its children (children win);
* aliases are resolved: the range names the target region, with the offset
  translated by ``alias_offset``;
* adjacent ranges of the same region with contiguous offsets and equal
  attributes are merged (``flatview_simplify``).

Changes made inside ``memory_region_transaction_begin/commit`` are batched; at
depth 0 every address space is re-rendered and its listeners get the diff
(see :mod:`memory._system`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._dirty import DIRTY_MEMORY_MIGRATION, DIRTY_MEMORY_VGA
from ._errors import MemoryRegionError
from ._ramblock import TARGET_PAGE_BITS

if TYPE_CHECKING:
    from ._listener import MemoryListener
    from ._ramblock import RAMBlock
    from ._system import MemorySystem

#: QEMU's ``int128_2_64()``: the size of a container covering all of hwaddr.
UINT64_RANGE = 1 << 64


class MemoryRegion:
    """A node of the memory tree.  Create through the ``MemorySystem``:
    ``memory_region_init`` (container), ``memory_region_init_ram``,
    ``memory_region_init_alias``, ``memory_region_init_io``.
    """

    def __init__(self, ms: MemorySystem, name: str, size: int, *, terminates: bool) -> None:
        if size < 0:
            raise MemoryRegionError(f"negative size {size}", region=name)
        self.ms = ms
        self.name = name
        self.size = size
        self.addr = 0
        self.priority = 0
        self.container: MemoryRegion | None = None
        self.subregions: list[MemoryRegion] = []
        self.enabled = True
        self.terminates = terminates
        self.ram = False
        self.ram_block: RAMBlock | None = None
        self.alias: MemoryRegion | None = None
        self.alias_offset = 0
        self.readonly = False
        #: own client mask (only DIRTY_MEMORY_VGA, via ``set_log``)
        self.dirty_log_mask = 0
        self.vga_logging_count = 0
        self.mapped_via_alias = 0

    def __repr__(self) -> str:
        kind = "ram" if self.ram else "alias" if self.alias else "i/o" if self.terminates else "container"
        return f"<MemoryRegion {self.name!r} {kind} addr={self.addr:#x} size={self.size:#x} prio={self.priority}>"

    # -- queries --------------------------------------------------------------
    def is_ram(self) -> bool:
        return self.ram

    @property
    def ram_addr(self) -> int:
        """``memory_region_get_ram_addr`` (bytes); only for RAM regions."""
        if self.ram_block is None:
            raise MemoryRegionError("not a RAM region", region=self.name)
        return self.ram_block.offset

    def get_dirty_log_mask(self) -> int:
        """``memory_region_get_dirty_log_mask``: own clients (VGA) plus MIGRATION
        when global dirty tracking is on and the region is RAM.  CODE is TCG's
        client and never appears here."""
        mask = self.dirty_log_mask
        if self.ms.global_dirty_tracking and self.ram_block is not None:
            mask |= 1 << DIRTY_MEMORY_MIGRATION
        return mask

    def is_logging(self, client: int) -> bool:
        return bool(self.get_dirty_log_mask() & (1 << client))

    def is_mapped(self) -> bool:
        return self.container is not None or self.mapped_via_alias > 0

    # -- tree changes (each is its own transaction, nesting is fine) ---------------
    def add_subregion(self, offset: int, subregion: MemoryRegion, priority: int = 0) -> None:
        """``memory_region_add_subregion`` (``priority`` 0) or
        ``memory_region_add_subregion_overlap``."""
        if subregion.container is not None:
            raise MemoryRegionError(f"already in {subregion.container.name!r}", region=subregion.name)
        if subregion.ms is not self.ms:
            raise MemoryRegionError("belongs to another MemorySystem", region=subregion.name)
        subregion.container = self
        alias = subregion.alias
        while alias is not None:
            alias.mapped_via_alias += 1
            alias = alias.alias
        subregion.addr = offset
        subregion.priority = priority
        self._insert_subregion(subregion)

    def _insert_subregion(self, subregion: MemoryRegion) -> None:
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            # Before the first sibling of lower-or-equal priority: so the newest of
            # equal priority renders first and wins.
            pos = len(self.subregions)
            for i, other in enumerate(self.subregions):
                if subregion.priority >= other.priority:
                    pos = i
                    break
            self.subregions.insert(pos, subregion)
            ms._update_pending |= self.enabled and subregion.enabled
        finally:
            ms.memory_region_transaction_commit()

    def del_subregion(self, subregion: MemoryRegion) -> None:
        """``memory_region_del_subregion``."""
        if subregion.container is not self:
            raise MemoryRegionError(f"not a subregion of {self.name!r}", region=subregion.name)
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            subregion.container = None
            alias = subregion.alias
            while alias is not None:
                alias.mapped_via_alias -= 1
                alias = alias.alias
            self.subregions.remove(subregion)
            ms._update_pending |= self.enabled and subregion.enabled
        finally:
            ms.memory_region_transaction_commit()

    def set_enabled(self, enabled: bool) -> None:
        """``memory_region_set_enabled``."""
        if enabled == self.enabled:
            return
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            self.enabled = enabled
            ms._update_pending = True
        finally:
            ms.memory_region_transaction_commit()

    def set_address(self, addr: int) -> None:
        """``memory_region_set_address``: re-add at ``addr`` (one transaction)."""
        if addr == self.addr:
            return
        self.addr = addr
        container = self.container
        if container is None:
            return
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            priority = self.priority
            container.del_subregion(self)
            container.add_subregion(addr, self, priority)
        finally:
            ms.memory_region_transaction_commit()

    def set_alias_offset(self, offset: int) -> None:
        """``memory_region_set_alias_offset``."""
        if self.alias is None:
            raise MemoryRegionError("not an alias", region=self.name)
        if offset == self.alias_offset:
            return
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            self.alias_offset = offset
            ms._update_pending |= self.enabled
        finally:
            ms.memory_region_transaction_commit()

    def set_readonly(self, readonly: bool) -> None:
        """``memory_region_set_readonly``."""
        if readonly == self.readonly:
            return
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            self.readonly = readonly
            ms._update_pending |= self.enabled
        finally:
            ms.memory_region_transaction_commit()

    def set_log(self, log: bool, client: int = DIRTY_MEMORY_VGA) -> None:
        """``memory_region_set_log``: refcounted VGA logging."""
        if client != DIRTY_MEMORY_VGA:
            raise MemoryRegionError(f"only DIRTY_MEMORY_VGA can be set per region, not {client}", region=self.name)
        old = self.vga_logging_count
        new = old + (1 if log else -1)
        if new < 0:
            raise MemoryRegionError("set_log(False) without a matching set_log(True)", region=self.name)
        self.vga_logging_count = new
        if bool(old) == bool(new):
            return
        ms = self.ms
        ms.memory_region_transaction_begin()
        try:
            bit = 1 << client
            self.dirty_log_mask = (self.dirty_log_mask & ~bit) | (bit if log else 0)
            ms._update_pending |= self.enabled
        finally:
            ms.memory_region_transaction_commit()


class FlatRange:
    """One piece of a FlatView: ``[start, start + size)`` shows ``mr`` at
    ``offset_in_region``."""

    __slots__ = ("mr", "offset_in_region", "start", "size", "dirty_log_mask", "readonly")

    def __init__(
        self, mr: MemoryRegion, offset_in_region: int, start: int, size: int, dirty_log_mask: int, readonly: bool
    ) -> None:
        self.mr = mr
        self.offset_in_region = offset_in_region
        self.start = start
        self.size = size
        self.dirty_log_mask = dirty_log_mask
        self.readonly = readonly

    @property
    def end(self) -> int:
        return self.start + self.size

    def same_as(self, other: FlatRange) -> bool:
        """``flatrange_equal``: same region, place and attributes; the dirty log
        mask is deliberately not compared (a mask change is ``log_start/stop``,
        not ``region_del`` + ``region_add``)."""
        return (
            self.mr is other.mr
            and self.start == other.start
            and self.size == other.size
            and self.offset_in_region == other.offset_in_region
            and self.readonly == other.readonly
        )

    def __repr__(self) -> str:
        return (
            f"FlatRange({self.mr.name!r}, [{self.start:#x}, {self.end:#x}), "
            f"off={self.offset_in_region:#x}, mask={self.dirty_log_mask:#x})"
        )


class FlatView:
    """Sorted, disjoint ``FlatRange``s rendered from ``root``."""

    def __init__(self, root: MemoryRegion | None, ranges: list[FlatRange]) -> None:
        self.root = root
        self.ranges = ranges

    @classmethod
    def render(cls, root: MemoryRegion | None) -> FlatView:
        """``generate_memory_topology``: render and simplify."""
        ranges: list[FlatRange] = []
        if root is not None:
            _render(ranges, root, 0, 0, UINT64_RANGE, False)
        return cls(root, _simplify(ranges))

    def sections(self) -> list[MemoryRegionSection]:
        return [MemoryRegionSection.from_flat_range(fr, self) for fr in self.ranges]

    def lookup(self, addr: int) -> FlatRange | None:
        """The range containing guest-physical ``addr``, if any."""
        lo, hi = 0, len(self.ranges)
        while lo < hi:
            mid = (lo + hi) // 2
            fr = self.ranges[mid]
            if addr < fr.start:
                hi = mid
            elif addr >= fr.end:
                lo = mid + 1
            else:
                return fr
        return None

    def __repr__(self) -> str:
        return f"FlatView({self.ranges!r})"


def _render(view: list[FlatRange], mr: MemoryRegion, base: int, clip_start: int, clip_end: int, readonly: bool) -> None:
    """Render ``mr`` (placed at ``base + mr.addr``) into the gaps of ``view``
    within ``[clip_start, clip_end)``."""
    if not mr.enabled:
        return
    base += mr.addr
    readonly = readonly or mr.readonly
    lo = max(base, clip_start)
    hi = min(base + mr.size, clip_end)
    if lo >= hi:
        return
    if mr.alias is not None:
        target = mr.alias
        _render(view, target, base - target.addr - mr.alias_offset, lo, hi, readonly)
        return
    for sub in mr.subregions:
        _render(view, sub, base, lo, hi, readonly)
    if not mr.terminates:
        return
    mask = mr.get_dirty_log_mask()
    # Fill the holes of [lo, hi) not yet owned by a range rendered earlier.
    i = 0
    n = len(view)
    while i < n and view[i].end <= lo:
        i += 1
    pos = lo
    while pos < hi:
        if i >= len(view) or view[i].start >= hi:
            view.insert(i, FlatRange(mr, pos - base, pos, hi - pos, mask, readonly))
            return
        r = view[i]
        if pos < r.start:
            view.insert(i, FlatRange(mr, pos - base, pos, r.start - pos, mask, readonly))
            i += 1
        pos = max(pos, r.end)
        i += 1


def _simplify(ranges: list[FlatRange]) -> list[FlatRange]:
    """``flatview_simplify``: merge adjacent pieces of the same region."""
    out: list[FlatRange] = []
    for fr in ranges:
        if out:
            prev = out[-1]
            if (
                prev.end == fr.start
                and prev.mr is fr.mr
                and prev.offset_in_region + prev.size == fr.offset_in_region
                and prev.dirty_log_mask == fr.dirty_log_mask
                and prev.readonly == fr.readonly
            ):
                prev.size += fr.size
                continue
        out.append(FlatRange(fr.mr, fr.offset_in_region, fr.start, fr.size, fr.dirty_log_mask, fr.readonly))
    return out


@dataclass(frozen=True, slots=True)
class MemoryRegionSection:
    """``MemoryRegionSection``: a window of one region as seen in a FlatView."""

    mr: MemoryRegion
    fv: FlatView | None
    offset_within_region: int
    offset_within_address_space: int
    size: int
    readonly: bool = False

    @classmethod
    def from_flat_range(cls, fr: FlatRange, fv: FlatView | None) -> MemoryRegionSection:
        """``section_from_flat_range``."""
        return cls(fr.mr, fv, fr.offset_in_region, fr.start, fr.size, fr.readonly)

    @property
    def ram_addr(self) -> int:
        """ram_addr (bytes) of the section's first byte; RAM sections only."""
        return self.mr.ram_addr + self.offset_within_region

    def __repr__(self) -> str:
        return (
            f"Section({self.mr.name!r}, gpa=[{self.offset_within_address_space:#x}, "
            f"{self.offset_within_address_space + self.size:#x}), off={self.offset_within_region:#x})"
        )


class AddressSpace:
    """``AddressSpace``: a root region, its current FlatView and its listeners.
    Create with ``MemorySystem.address_space_init``."""

    def __init__(self, root: MemoryRegion, name: str) -> None:
        self.root = root
        self.name = name
        self.current_map = FlatView(root, [])
        self.listeners: list[MemoryListener] = []

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name!r} root={self.root.name!r}>"

    def gpa_to_ram_addr(self, gpa: int) -> int | None:
        """ram_addr (bytes) shown at ``gpa``, or None when it is not RAM."""
        fr = self.current_map.lookup(gpa)
        if fr is None or fr.mr.ram_block is None:
            return None
        return fr.mr.ram_block.offset + fr.offset_in_region + (gpa - fr.start)


def page_range(offset_bytes: int, size_bytes: int) -> tuple[int, int]:
    """Pages ``(first, count)`` touched by a byte range (count rounds up)."""
    first = offset_bytes >> TARGET_PAGE_BITS
    last = (offset_bytes + size_bytes + (1 << TARGET_PAGE_BITS) - 1) >> TARGET_PAGE_BITS
    return first, max(0, last - first)
