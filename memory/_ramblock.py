"""RAM blocks: guest RAM backed by anonymous ``mmap``, exposed as numpy views.

Mirrors QEMU's ``RAMBlock`` (include/exec/ramblock.h) and ``ram_list``: every
block has an ``idstr``, an ``offset`` in the global *ram_addr* space (where the
per-client dirty bitmaps live), a ``used_length`` and a host mapping.

Rules this module keeps:

* Guest RAM is never copied: ``host`` and ``pages`` are views of the one
  mapping, whose address (``host_addr``) is what a real
  ``KVM_SET_USER_MEMORY_REGION`` takes.  The mapping is a ``memfd``
  (``MAP_SHARED``), so other processes (the simulated KVM's vCPU
  processes) map the same pages: :func:`shared_mapping_of` finds the memfd
  behind a host address.
* Blocks are placed in ram_addr space at offsets aligned to 64 pages, so a
  slot's little-endian dirty bitmap ORs into the global bitmaps word by word
  (QEMU's fast path in ``physical_memory_set_dirty_lebitmap``).
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

TARGET_PAGE_BITS = 12
TARGET_PAGE_SIZE = 1 << TARGET_PAGE_BITS
#: ram_addr alignment of blocks: one uint64 bitmap word of pages.
RAM_ADDR_ALIGN = 64 * TARGET_PAGE_SIZE
#: Python < 3.12 does not export MAP_NORESERVE; this is the Linux value.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


#: host address -> (memfd, size) of every live RAM block mapping
_SHARED: dict[int, tuple[int, int]] = {}


def shared_mapping_of(addr: int) -> tuple[int, int, int] | None:
    """(memfd, mapping address, size) of the RAM block mapping containing
    ``addr``, or None if ``addr`` is not in one."""
    for base, (fd, size) in _SHARED.items():
        if base <= addr < base + size:
            return fd, base, size
    return None


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _release(addr: int, fd: int) -> None:
    _SHARED.pop(addr, None)
    os.close(fd)


class RAMBlock:
    """One block of guest RAM.

    Attributes:
        idstr: QEMU's block name (``"pc.ram"``), as sent in the stream.
        offset: start in ram_addr space (bytes, 64-page aligned).
        used_length: size in bytes (a multiple of the target page size).
        host: ``uint8`` view of the whole block (no copy).
        pages: ``(npages, TARGET_PAGE_SIZE)`` ``uint8`` view (no copy).
        host_addr: the mapping's address (for real KVM memslots).
    """

    def __init__(self, idstr: str, size_bytes: int, offset: int = 0) -> None:
        if size_bytes <= 0 or size_bytes % TARGET_PAGE_SIZE:
            raise ValueError(f"RAM block size must be a positive multiple of {TARGET_PAGE_SIZE}: {size_bytes}")
        if len(idstr.encode()) > 255 or not idstr:
            raise ValueError(f"bad RAM block idstr {idstr!r}")
        self.idstr = idstr
        self.offset = offset
        self.used_length = size_bytes
        self.max_length = size_bytes
        self.page_size = TARGET_PAGE_SIZE
        # a memfd: sparse (tmpfs pages appear on first touch, like an
        # anonymous mapping), and shareable with the vCPU processes
        self.fd = os.memfd_create(f"migrator-ram-{idstr}"[:249], 0)
        os.ftruncate(self.fd, size_bytes)
        self._mmap = mmap.mmap(self.fd, size_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.host = np.frombuffer(self._mmap, dtype=np.uint8)
        self.pages = self.host.reshape(-1, TARGET_PAGE_SIZE)
        self.host_addr = self.host.ctypes.data
        _SHARED[self.host_addr] = (self.fd, size_bytes)
        self._finalizer = weakref.finalize(self, _release, self.host_addr, self.fd)

    @property
    def npages(self) -> int:
        return self.used_length >> TARGET_PAGE_BITS

    def prefault(self) -> None:
        """Make every page present and writable, keeping its content.

        A first write to a page costs a page fault (~2 us per 4 KiB page
        here, 0.5 s per GiB), which a migration destination would otherwise
        pay on its receiving core (QEMU: 1.9 s vs 0.52 s pre-faulted for a
        1 GiB guest).  ``MADV_POPULATE_WRITE`` (Linux >= 5.14; Python 3.11's
        mmap module lacks the name, 23 is its value) does it in the kernel;
        the fallback stores into byte 0 of every page with a ufunc (a plain
        ``pages[:, 0] = pages[:, 0]`` is optimised away by numpy).
        """
        try:
            self._mmap.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
        except OSError:
            col = self.pages[:, 0]
            np.bitwise_or(col, 0, out=col)

    def close(self) -> None:
        # numpy views export the mmap buffer: drop them before closing.
        self.host = self.pages = None  # type: ignore[assignment]
        self._finalizer()
        try:
            self._mmap.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping dies with it

    def __repr__(self) -> str:
        return f"RAMBlock({self.idstr!r}, offset={self.offset:#x}, used_length={self.used_length:#x})"


class RAMList:
    """All RAM blocks, laid out in ram_addr space (QEMU's ``ram_list``)."""

    def __init__(self) -> None:
        self.blocks: list[RAMBlock] = []
        self._next_offset = 0

    def alloc(self, idstr: str, size_bytes: int) -> RAMBlock:
        if any(b.idstr == idstr for b in self.blocks):
            raise ValueError(f"duplicate RAM block {idstr!r}")
        block = RAMBlock(idstr, size_bytes, offset=self._next_offset)
        self._next_offset = _align_up(block.offset + size_bytes, RAM_ADDR_ALIGN)
        self.blocks.append(block)
        return block

    def find(self, idstr: str) -> RAMBlock | None:
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        return None

    @property
    def ram_addr_size(self) -> int:
        """Size of ram_addr space covered by blocks (bytes, 64-page aligned)."""
        return self._next_offset

    def total_bytes(self) -> int:
        return sum(b.used_length for b in self.blocks)
