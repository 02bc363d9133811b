"""Dirty-memory clients: QEMU's ``ram_list.dirty_memory[]`` as numpy bitmaps.

Mirrors include/system/ram_addr.h and the ``physical_memory_*`` helpers of
system/physmem.c.  There is one bitmap per *client*, indexed by ram_addr page
(``ram_addr >> TARGET_PAGE_BITS``), stored as little-endian ``uint64`` words:
bit ``i`` of word ``w`` is page ``64 * w + i`` (the layout of the kernel's
``KVM_GET_DIRTY_LOG`` bitmap, so a slot bitmap ORs in word by word).

Clients (``DIRTY_MEMORY_*``):

* ``VGA`` (0): display devices, via ``memory_region_snapshot_and_clear_dirty``;
* ``CODE`` (1): TCG's translated-code invalidation (never set here: no TCG);
* ``MIGRATION`` (2): RAM migration, harvested by ``xchg_words`` in
  ``migration_bitmap_sync``.

The ordering rule this module relies on: **bits are only ever OR-ed in and
only ever cleared by the client that owns them** (``snapshot_and_clear``,
``test_and_clear``, ``xchg_words`` act on one client).  A fetch from KVM is
OR-ed into every active client, so a display consuming its VGA bits can never
steal the bits migration still has to send.

QEMU keeps the bitmaps in RCU-managed blocks of 2 Mi pages so they can grow
while readers run; here growth reallocates (``grow``), so views returned by
``bitmap()`` are only valid until the next ``grow``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ._ramblock import TARGET_PAGE_BITS

DIRTY_MEMORY_VGA = 0
DIRTY_MEMORY_CODE = 1
DIRTY_MEMORY_MIGRATION = 2
DIRTY_MEMORY_NUM = 3

DIRTY_CLIENTS_ALL = (1 << DIRTY_MEMORY_NUM) - 1
DIRTY_CLIENTS_NOCODE = DIRTY_CLIENTS_ALL & ~(1 << DIRTY_MEMORY_CODE)

#: ``global_dirty_tracking`` flags (include/system/memory.h)
GLOBAL_DIRTY_MIGRATION = 1 << 0
GLOBAL_DIRTY_DIRTY_RATE = 1 << 1
GLOBAL_DIRTY_LIMIT = 1 << 2
GLOBAL_DIRTY_MASK = GLOBAL_DIRTY_MIGRATION | GLOBAL_DIRTY_DIRTY_RATE | GLOBAL_DIRTY_LIMIT

BITS_PER_WORD = 64
_ALL_ONES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)

Words = NDArray[np.uint64]


def _low_bits(n: int) -> np.uint64:
    """Word with bits ``[0, n)`` set, ``0 <= n <= 64``."""
    return _ALL_ONES if n >= BITS_PER_WORD else np.uint64((1 << n) - 1)


def range_mask(first_bit: int, nbits: int, *, base_bit: int = 0) -> tuple[int, Words]:
    """Words covering bits ``[first_bit, first_bit + nbits)``.

    Returns ``(first_word, mask)`` where ``mask`` has one ``uint64`` per word
    from ``first_word`` (relative to ``base_bit``, which must be word aligned)
    with exactly the requested bits set.  Only the two edge words are built in
    Python; the middle is one vectorised fill.
    """
    lo = first_bit - base_bit
    hi = lo + nbits
    if nbits <= 0:
        return lo // BITS_PER_WORD, np.zeros(0, dtype=np.uint64)
    w0 = lo // BITS_PER_WORD
    w1 = (hi + BITS_PER_WORD - 1) // BITS_PER_WORD
    mask = np.full(w1 - w0, _ALL_ONES, dtype=np.uint64)
    mask[0] &= ~_low_bits(lo - w0 * BITS_PER_WORD)
    tail = hi - (w1 - 1) * BITS_PER_WORD
    mask[-1] &= _low_bits(tail)
    return w0, mask


def popcount(words: Words) -> int:
    """Number of set bits in ``words``."""
    return int(np.bitwise_count(words).sum(dtype=np.int64))


def shift_bits_up(words: Words, shift: int) -> Words:
    """Return ``words`` moved ``shift`` bits (``0 <= shift < 64``) towards
    higher bit numbers, as ``len(words) + 1`` words (vectorised carry)."""
    out = np.zeros(len(words) + 1, dtype=np.uint64)
    if shift == 0:
        out[:-1] = words
        return out
    s = np.uint64(shift)
    out[:-1] = words << s
    out[1:] |= words >> np.uint64(BITS_PER_WORD - shift)
    return out


@dataclass(frozen=True, slots=True)
class DirtyBitmapSnapshot:
    """``DirtyBitmapSnapshot``: a copy of one client's bits over whole words.

    ``start_page``/``end_page`` are ram_addr page numbers, both multiples of
    64 (the requested range widened to words, as QEMU does).
    """

    start_page: int
    end_page: int
    words: Words

    def get_dirty(self, start_page: int, npages: int) -> bool:
        """``physical_memory_snapshot_get_dirty``: any page of the range dirty."""
        if start_page < self.start_page or start_page + npages > self.end_page:
            raise ValueError(
                f"range [{start_page}, {start_page + npages}) outside snapshot "
                f"[{self.start_page}, {self.end_page})"
            )
        w0, mask = range_mask(start_page, npages, base_bit=self.start_page)
        return bool(np.any(self.words[w0 : w0 + len(mask)] & mask))

    def dirty_pages(self) -> NDArray[np.int64]:
        """ram_addr page numbers set in the snapshot (sorted)."""
        bits = np.unpackbits(self.words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).astype(np.int64) + self.start_page


class DirtyMemory:
    """Per-client dirty bitmaps over ram_addr pages (``ram_list.dirty_memory``).

    Args:
        ram_addr_size_bytes: initial size of ram_addr space; ``grow`` extends it
            (QEMU's ``dirty_memory_extend``).
    """

    def __init__(self, ram_addr_size_bytes: int = 0) -> None:
        self._npages = 0
        self._bitmaps: NDArray[np.uint64] = np.zeros((DIRTY_MEMORY_NUM, 0), dtype=np.uint64)
        self.grow(ram_addr_size_bytes)

    # -- geometry ---------------------------------------------------------
    @property
    def npages(self) -> int:
        return self._npages

    @property
    def nwords(self) -> int:
        return int(self._bitmaps.shape[1])

    def grow(self, ram_addr_size_bytes: int) -> None:
        """Cover at least ``ram_addr_size_bytes`` of ram_addr space (never shrinks)."""
        npages = (ram_addr_size_bytes + (1 << TARGET_PAGE_BITS) - 1) >> TARGET_PAGE_BITS
        if npages <= self._npages:
            return
        nwords = (npages + BITS_PER_WORD - 1) // BITS_PER_WORD
        if nwords > self.nwords:
            new = np.zeros((DIRTY_MEMORY_NUM, nwords), dtype=np.uint64)
            new[:, : self.nwords] = self._bitmaps
            self._bitmaps = new
        self._npages = npages

    def bitmap(self, client: int) -> Words:
        """The live words of ``client`` (a view, valid until the next ``grow``)."""
        words: Words = self._bitmaps[client]
        return words

    def _check(self, start_page: int, npages: int) -> None:
        if start_page < 0 or npages < 0 or start_page + npages > self._npages:
            raise ValueError(
                f"page range [{start_page}, {start_page + npages}) outside ram_addr space "
                f"of {self._npages} pages"
            )

    @staticmethod
    def _clients(clients_mask: int) -> list[int]:
        return [c for c in range(DIRTY_MEMORY_NUM) if clients_mask & (1 << c)]

    # -- setting ------------------------------------------------------------
    def set_dirty_range(self, start_page: int, npages: int, clients_mask: int) -> None:
        """``physical_memory_set_dirty_range``: mark pages dirty for each client
        in ``clients_mask`` (bit ``1 << DIRTY_MEMORY_x``)."""
        self._check(start_page, npages)
        if npages == 0:
            return
        w0, mask = range_mask(start_page, npages)
        for c in self._clients(clients_mask):
            self._bitmaps[c, w0 : w0 + len(mask)] |= mask

    def set_dirty_lebitmap(self, words: Words, start_page: int, npages: int, clients_mask: int) -> int:
        """``physical_memory_set_dirty_lebitmap``: OR a little-endian page bitmap
        (bit ``i`` = page ``start_page + i``) into every client of ``clients_mask``.

        Fast path when ``start_page`` is word aligned: whole words are OR-ed.
        Otherwise the bitmap is shifted once (vectorised) and OR-ed.  Bits at or
        beyond ``npages`` are ignored.

        Returns:
            the number of dirty pages in ``words`` (QEMU's ``num_dirty``; what the
            dirty-rate code adds to ``total_dirty_pages``).
        """
        self._check(start_page, npages)
        if npages == 0:
            return 0
        nwords = (npages + BITS_PER_WORD - 1) // BITS_PER_WORD
        src = np.asarray(words, dtype=np.uint64)[:nwords]
        if len(src) < nwords:
            raise ValueError(f"bitmap of {len(src)} words too short for {npages} pages")
        if npages % BITS_PER_WORD:
            src = src.copy()
            src[-1] &= _low_bits(npages % BITS_PER_WORD)
        count = popcount(src)
        if count == 0:
            return 0
        w0, shift = divmod(start_page, BITS_PER_WORD)
        if shift == 0:
            merged = src
        else:
            merged = shift_bits_up(src, shift)
            merged = merged[: (shift + npages + BITS_PER_WORD - 1) // BITS_PER_WORD]
        for c in self._clients(clients_mask):
            self._bitmaps[c, w0 : w0 + len(merged)] |= merged
        return count

    # -- reading and clearing --------------------------------------------------
    def get_dirty(self, client: int, start_page: int, npages: int) -> bool:
        """``physical_memory_get_dirty``: is any page of the range dirty for ``client``."""
        self._check(start_page, npages)
        if npages == 0:
            return False
        w0, mask = range_mask(start_page, npages)
        return bool(np.any(self._bitmaps[client, w0 : w0 + len(mask)] & mask))

    def dirty_pages(self, client: int, start_page: int, npages: int) -> NDArray[np.int64]:
        """ram_addr page numbers dirty for ``client`` in the range (no clearing)."""
        self._check(start_page, npages)
        w0, mask = range_mask(start_page, npages)
        sel = self._bitmaps[client, w0 : w0 + len(mask)] & mask
        bits = np.unpackbits(sel.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits).astype(np.int64) + w0 * BITS_PER_WORD

    def count(self, client: int) -> int:
        """Number of dirty pages of ``client`` (whole ram_addr space)."""
        return popcount(self._bitmaps[client])

    def test_and_clear(self, client: int, start_page: int, npages: int) -> bool:
        """``physical_memory_test_and_clear_dirty``: clear the range, return
        whether any page of it was dirty."""
        self._check(start_page, npages)
        if npages == 0:
            return False
        w0, mask = range_mask(start_page, npages)
        sl = self._bitmaps[client, w0 : w0 + len(mask)]
        hit = bool(np.any(sl & mask))
        sl &= ~mask
        return hit

    def snapshot_and_clear(self, client: int, start_page: int, npages: int) -> DirtyBitmapSnapshot:
        """``physical_memory_snapshot_and_clear_dirty`` (bitmap part): copy and
        clear ``client``'s words covering the range, widened to whole words."""
        self._check(start_page, npages)
        first = start_page // BITS_PER_WORD
        last = (start_page + npages + BITS_PER_WORD - 1) // BITS_PER_WORD
        sl = self._bitmaps[client, first:last]
        words = sl.copy()
        sl[:] = 0
        return DirtyBitmapSnapshot(first * BITS_PER_WORD, last * BITS_PER_WORD, words)

    def xchg_words(self, client: int, start_word: int, nwords: int) -> Words:
        """Return a copy of ``nwords`` words of ``client`` from ``start_word`` and
        zero them (migration's ``qatomic_xchg`` loop in
        ``physical_memory_sync_dirty_bitmap``)."""
        if start_word < 0 or nwords < 0 or start_word + nwords > self.nwords:
            raise ValueError(f"words [{start_word}, {start_word + nwords}) outside bitmap of {self.nwords}")
        sl = self._bitmaps[client, start_word : start_word + nwords]
        words = sl.copy()
        sl[:] = 0
        return words
