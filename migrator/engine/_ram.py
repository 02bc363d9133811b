"""RAM migration bookkeeping (QEMU's migration/ram.c), without I/O.

Source side (:class:`RAMSaveState`):

* ``bmap`` per block, uint64 words, bit i = page i of the block; starts all
  ones (every page must be sent once) and ``migration_dirty_pages`` = total.
* :meth:`bitmap_sync` = ``migration_bitmap_sync``: a global dirty-log sync
  (which, in write-protect-all mode, ends with the one ``KVM_WRITE_PROTECT_ALL_MEM``
  after the last fetch), then per block *exchange* the MIGRATION client words
  with zero and OR them into ``bmap``, counting only newly set bits, and mark
  the block's ``clear_bmap`` chunks; then ``memory_global_after_dirty_log_sync``.
* :meth:`next_batch` finds the next dirty pages from the cursor and
  test-and-clears them **just before they are read for sending**.  Before
  the first page of a clear_bmap chunk is handed out, the chunk's KVM dirty
  bits are cleared and re-protected (``memory_region_clear_dirty_bitmap`` ->
  ``KVM_CLEAR_DIRTY_LOG`` in manual-protect mode; a no-op otherwise).

Ordering rules this module relies on (each one loses writes if broken):

1. *Protect before read.*  A page's content may be read for sending only
   after it has been re-protected since the fetch that reported it: the
   legacy GET protects as it fetches; write-protect-all runs inside the sync,
   after every fetch and before the xchg below; manual protect clears the
   chunk right before the chunk's first page is handed out.  A write after
   the protection faults and is logged for a later round; a write before it
   is in the content we read.
2. *Clear the bmap bit before reading the page.*  The bit is cleared in
   :meth:`next_batch`, the caller reads (gathers) the pages immediately after.
3. *Clear only what was fetched.*  The listener's ``log_clear`` clears only
   bits it already fetched into its slot cache, so a write that KVM logged
   after our sync is not thrown away by our clear.
4. *No clears in the last stage.*  vCPUs are stopped; nothing to protect
   (``bitmap_sync(last_stage=True)`` switches them off).

Destination side (:class:`RAMLoadState`) writes received pages into the
blocks, validating block names and sizes against its own RAM.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from memory import TARGET_PAGE_BITS, TARGET_PAGE_SIZE, popcount

if TYPE_CHECKING:
    from collections.abc import Iterable

    from numpy.typing import NDArray

    from memory import MemoryRegion, MemorySystem, RAMBlock

_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class SyncResult:
    new_dirty_pages: int  #: bits newly set in bmap (QEMU's num_dirty_pages_period)
    sync_ns: int
    #: dirty bits fetched by this sync, also those of pages still pending:
    #: the pages the guest wrote since the previous fetch
    found_dirty_pages: int = 0


class _BlockState:
    def __init__(self, block: RAMBlock, mr: MemoryRegion, clear_bitmap_shift: int) -> None:
        self.block = block
        self.mr = mr
        npages = block.npages
        nwords = (npages + 63) // 64
        self.npages = npages
        self.bmap = np.full(nwords, _ALL_ONES, dtype=np.uint64)
        tail = npages % 64
        if tail:
            self.bmap[-1] = np.uint64((1 << tail) - 1)
        self.shift = clear_bitmap_shift
        nchunks = (npages + (1 << clear_bitmap_shift) - 1) >> clear_bitmap_shift
        self.clear_bmap = np.zeros(nchunks, dtype=bool)
        self.cursor_word = 0
        # first word of this block in the global ram_addr bitmap
        self.ram_addr_word = (block.offset >> TARGET_PAGE_BITS) // 64
        self.nwords = nwords


class RAMSaveState:
    """The source's view of which pages still have to be sent."""

    def __init__(self, ms: MemorySystem, blocks: Iterable[tuple[RAMBlock, MemoryRegion]], *,
                 clear_bitmap_shift: int = 18, log_keeps_bits: bool = False) -> None:
        from memory import DIRTY_MEMORY_MIGRATION

        self.ms = ms
        self._client = DIRTY_MEMORY_MIGRATION
        self.blocks = [_BlockState(b, mr, clear_bitmap_shift) for b, mr in blocks]
        #: manual protect: KVM keeps a page's bit until it is CLEARed, so a
        #: sync re-reports the pending pages of chunks not cleared since
        #: (see found_dirty_pages in bitmap_sync)
        self.log_keeps_bits = log_keeps_bits
        self.migration_dirty_pages = sum(b.npages for b in self.blocks)
        self.total_pages = self.migration_dirty_pages
        self.dirty_sync_count = 0
        self._block_index = 0
        self.last_stage = False
        # dirty-rate period (QEMU: reset every >1000 ms at sync time)
        self.num_dirty_pages_period = 0

    # -- sync --------------------------------------------------------------
    def bitmap_sync(self, last_stage: bool = False) -> SyncResult:
        """``migration_bitmap_sync``; ``last_stage`` (vCPUs stopped) also turns
        off the lazy clears for the rest of the migration (rule 4)."""
        t0 = time.perf_counter_ns()
        if last_stage:
            self.last_stage = True
        self.dirty_sync_count += 1
        self.ms.memory_global_dirty_log_sync(last_stage)
        new = found = 0
        dm = self.ms.dirty_memory
        for bs in self.blocks:
            words = dm.xchg_words(self._client, bs.ram_addr_word, bs.nwords)
            if not words.any():
                continue
            # Pages written since the previous fetch.  Legacy GET and
            # write-protect-all clear what they report, so that is every bit.
            # With manual protect a bit stays until its chunk is CLEARed: a
            # pending page of a chunk still waiting for its clear may be the
            # previous sync's bit again, so those are left out (a rewrite of
            # such a page cannot be told from it: it did not fault).  Must run
            # before the chunk marking below.
            if self.log_keeps_bits:
                wpc = max(1, (1 << bs.shift) // 64)
                uncleared = np.repeat(bs.clear_bmap, wpc)[:bs.nwords]
                found += popcount(words & ~np.where(uncleared, bs.bmap, 0))
            else:
                found += popcount(words)
            fresh = words & ~bs.bmap
            count = popcount(fresh)
            if count:
                bs.bmap |= words
                new += count
            if not last_stage:
                # Mark the clear_bmap chunks that got dirty bits (QEMU marks
                # the whole synced range; the effect is the same): a chunk
                # with no bit in this sync has nothing fetched-but-unprotected
                # for *this* consumer, and in manual-protect mode KVM keeps a
                # page's bit until it is CLEARed, so any page still waiting
                # for its re-protection is fetched (and its chunk marked)
                # again by the next sync.  One OR per
                # chunk of whole words (not a sort of every non-zero word:
                # chunk of whole words (not a sort of every non-zero word:
                # 0.3 ms instead of 15 ms for an 8 MiB bitmap 1 % dirty)
                wpc = max(1, (1 << bs.shift) // 64)
                nfull = bs.nwords // wpc
                if nfull:
                    bs.clear_bmap[:nfull] |= words[:nfull * wpc].reshape(nfull, wpc).any(axis=1)
                if nfull * wpc < bs.nwords and words[nfull * wpc:].any():
                    bs.clear_bmap[nfull] = True
        self.migration_dirty_pages += new
        self.num_dirty_pages_period += new
        self.ms.memory_global_after_dirty_log_sync()
        return SyncResult(new, time.perf_counter_ns() - t0, found)

    @property
    def pending_bytes(self) -> int:
        return int(self.migration_dirty_pages) * TARGET_PAGE_SIZE

    # -- find and test-and-clear -----------------------------------------
    def next_batch(self, max_pages: int) -> tuple[RAMBlock, NDArray[np.intp]] | None:
        """Next dirty pages: ``(block, page_indices)`` or None if all clean.

        Takes whole bitmap words (64 pages) from the cursor until at least
        ``max_pages`` pages are collected, clears their bits (test-and-clear)
        and returns their page indices in ascending order.
        """
        if self.migration_dirty_pages == 0:
            return None
        nblocks = len(self.blocks)
        for _ in range(nblocks + 1):
            bs = self.blocks[self._block_index]
            got = self._take_from_block(bs, max_pages)
            if got is not None:
                return bs.block, got
            # block exhausted from its cursor: wrap it and move on
            bs.cursor_word = 0
            self._block_index = (self._block_index + 1) % nblocks
        return None  # pragma: no cover - dirty count said otherwise

    _WINDOW_WORDS = 4096

    def _take_from_block(self, bs: _BlockState, max_pages: int) -> NDArray[np.intp] | None:
        bmap = bs.bmap
        start = bs.cursor_word
        k = (max_pages + 63) // 64
        if start + k <= bs.nwords and bmap[start] == _ALL_ONES:
            run = bmap[start:start + k]
            if (run == _ALL_ONES).all():
                # The bulk pass: k whole words of dirty pages at the cursor.
                # Same order as below: clear (protect), then test-and-clear.
                self._clear_chunks(bs, start, start + k - 1)
                run[:] = 0
                self.migration_dirty_pages -= k * 64
                bs.cursor_word = start + k
                return np.arange(start * 64, (start + k) * 64, dtype=np.int64)
        while start < bs.nwords:
            window = bmap[start:start + self._WINDOW_WORDS]
            nz = np.flatnonzero(window)
            if nz.size:
                counts = np.bitwise_count(window[nz]).astype(np.int64)
                csum = np.cumsum(counts)
                k = int(np.searchsorted(csum, max_pages)) + 1  # words to take
                k = min(k, nz.size)
                words_idx = nz[:k] + start
                self._clear_chunks(bs, int(words_idx[0]), int(words_idx[-1]))
                taken = bmap[words_idx].copy()
                bmap[words_idx] = 0  # test-and-clear, just before the read
                bits = np.unpackbits(taken.view(np.uint8), bitorder="little").reshape(k, 64)
                rows, cols = np.nonzero(bits)
                pages = words_idx[rows] * 64 + cols
                self.migration_dirty_pages -= int(pages.size)
                bs.cursor_word = int(words_idx[-1]) + 1
                return pages.astype(np.int64)
            start += self._WINDOW_WORDS
        bs.cursor_word = bs.nwords
        return None

    def _clear_chunks(self, bs: _BlockState, first_word: int, last_word: int) -> None:
        """Clear (re-protect) the pending chunks of bmap words [first_word, last_word].

        A chunk between two taken words that holds no taken word has no bmap
        bit (its bits were taken, and its clear done, before), so its flag is
        already False: taking the whole range clears exactly the chunks of
        the taken words.
        """
        if self.last_stage:
            return
        words_per_chunk = max(1, (1 << bs.shift) // 64)
        c0, c1 = first_word // words_per_chunk, last_word // words_per_chunk
        pending = np.flatnonzero(bs.clear_bmap[c0:c1 + 1]) + c0
        for chunk in pending.tolist():  # one per 2^shift pages, not per page
            bs.clear_bmap[chunk] = False
            start = (chunk << bs.shift) * TARGET_PAGE_SIZE
            size = min(1 << bs.shift, bs.npages - (chunk << bs.shift)) * TARGET_PAGE_SIZE
            self.ms.memory_region_clear_dirty_bitmap(bs.mr, start, size)


class RAMLoadState:
    """Destination: validate the block list and store incoming pages."""

    def __init__(self, blocks: Iterable[RAMBlock], *, fresh: bool = True) -> None:
        blocks = list(blocks)
        self.blocks = {b.idstr: b for b in blocks}
        self.seen_mem_size = False
        self.normal_pages = 0
        self.zero_pages = 0  # counters
        # Pages this incoming migration wrote data into (QEMU's receivedmap
        # plays a similar role).  When the destination's RAM is fresh (never
        # run, fresh anonymous mmap: all zero), a ZERO record for a page not
        # in this map needs no work at all: no read, no write, no fault.
        self.fresh = fresh
        self.written = {b.idstr: np.zeros(b.npages, dtype=bool) for b in blocks}

    @property
    def used_lengths(self) -> dict[str, int]:
        return {name: b.used_length for name, b in self.blocks.items()}

    def mark_written(self, idstr: str, idx: np.ndarray) -> None:
        """Pages written outside :meth:`load_pages` (multifd channels): a later
        ZERO record for them must really zero them."""
        self.written[idstr][idx] = True
        self.normal_pages += int(idx.size)

    def mem_size(self, blocks: Iterable[tuple[str, int]]) -> None:
        from ..errors import MigrationError

        for idstr, length in blocks:
            mine = self.blocks.get(idstr)
            if mine is None:
                raise MigrationError(f"Unknown ramblock \"{idstr}\", cannot accept migration")
            if length != mine.used_length:
                raise MigrationError(
                    f"Length mismatch: {idstr}: 0x{length:x} in != 0x{mine.used_length:x}")
        self.seen_mem_size = True

    def _block(self, idstr: str) -> RAMBlock:
        from ..errors import MigrationError

        block = self.blocks.get(idstr)
        if block is None or not self.seen_mem_size:
            raise MigrationError(f"page for unknown or unannounced block {idstr!r}")
        return block

    def load_pages(self, idstr: str, offsets: np.ndarray, data: np.ndarray) -> None:
        block = self._block(idstr)
        idx = (offsets >> TARGET_PAGE_BITS).astype(np.intp)
        if idx.size and int(idx.max()) >= block.npages:  # the decoder checked; belt and braces
            from ..errors import MigrationError
            raise MigrationError(f"page offset beyond block {idstr!r}")
        block.pages[idx] = data
        self.written[idstr][idx] = True
        self.normal_pages += int(idx.size)

    def load_zero_pages(self, idstr: str, offsets: np.ndarray) -> None:
        block = self._block(idstr)
        idx = (offsets >> TARGET_PAGE_BITS).astype(np.intp)
        if idx.size and int(idx.max()) >= block.npages:
            from ..errors import MigrationError
            raise MigrationError(f"page offset beyond block {idstr!r}")
        self.zero_pages += int(idx.size)
        if self.fresh:
            idx = idx[self.written[idstr][idx]]  # the others are still zero
            if not idx.size:
                return
        # Write only pages that are not already zero (never fault in untouched memory).
        p64 = block.pages.view(np.uint64)
        nonzero = idx[np.bitwise_or.reduce(p64[idx], axis=1) != 0]
        if nonzero.size:
            block.pages[nonzero] = 0
