"""QEMU 7.2's multifd wire format (migration/multifd.c, multifd.h, multifd-zstd.c), sans-IO.

With the ``multifd`` capability the main channel keeps the savevm stream
(header, sections, ZERO records, EOS, device state) and the non-zero pages
travel on ``multifd-channels`` extra connections.

* **Handshake** (``MultiFDInit_t``, 64 bytes, packed, big-endian): be32 magic
  0x11223344, be32 version 1, 16-byte UUID (QEMU's ``-uuid``, all zero by
  default; the destination refuses a different one), u8 channel id, 7 + 32
  reserved bytes.  The destination refuses an id >= its multifd-channels
  and a duplicate id.
* **Packet** (``MultiFDPacket_t``): be32 magic, be32 version, be32 flags,
  be32 pages_alloc, be32 normal_pages, be32 next_packet_size, be64
  packet_num, 4 x be64 reserved, 256-byte NUL-padded ramblock idstr, then
  be64 page offsets.  The header is always ``320 + 8 * page_count`` bytes
  (page_count = 512 KiB / page size = 128): QEMU reads exactly that much, so
  unused offset slots are sent as zeros.  Then the data: ``normal_pages``
  raw pages in offset order (compression none), or ``next_packet_size``
  bytes of zstd stream (compression zstd).
* **flags**: bit 0 SYNC; bits 1-3 the compression (0 none, 1 zlib, 2 zstd),
  set only on packets that carry pages.
* **zstd**: one zstd stream per channel for the whole migration, flushed
  (``ZSTD_e_flush``, never ended) at the end of each packet; the receiver
  keeps one decompression stream per channel and requires exactly one page
  of output per offset.
* **Sync** (7.2: once per RAM section): before every EOS on the main channel
  the source sends one SYNC packet (usually without pages) on each channel,
  after all pages it queued before; the destination, at that EOS, waits
  until every channel has read its SYNC packet, and each channel waits at its
  SYNC until the main channel reached the EOS.  So a page sent again in a
  later section can never be overwritten by an older copy still in flight
  on another channel.
* **Zero pages** are found on the main thread and sent as ZERO records on the
  main channel (7.2 has no multifd zero pages).

Later versions changed this (so this format is QEMU 7.2's, and 8.0 .. 8.2
with a ``pc-*-7.2``-or-older machine): 8.0 flushes once per RAM round with
``RAM_SAVE_FLAG_MULTIFD_FLUSH`` (0x200) on the main channel for new machine
types, and the destination tells channels apart by their first 4 bytes
rather than by connection order; 9.0 adds ``zero_pages`` (first reserved
be32) with the zero pages' offsets after the normal ones and
``zero-page-detection=multifd``; 10.0 splits the header out
(``MultiFDPacketHdr_t``) for device-state packets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

from . import _wire as w
from .errors import RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from numpy.typing import NDArray

__all__ = [
    "MULTIFD_FLAG_NOCOMP",
    "MULTIFD_FLAG_SYNC",
    "MULTIFD_FLAG_ZSTD",
    "MULTIFD_MAGIC",
    "MULTIFD_PACKET_BYTES",
    "MULTIFD_VERSION",
    "PacketHeader",
    "encode_init",
    "encode_packet_header",
    "page_count",
    "packet_header_bytes",
    "parse_init",
    "parse_packet_header",
]

MULTIFD_MAGIC: Final = 0x11223344
MULTIFD_VERSION: Final = 1
MULTIFD_FLAG_SYNC: Final = 1 << 0
MULTIFD_FLAG_COMPRESSION_MASK: Final = 7 << 1
MULTIFD_FLAG_NOCOMP: Final = 0 << 1
MULTIFD_FLAG_ZLIB: Final = 1 << 1
MULTIFD_FLAG_ZSTD: Final = 2 << 1
MULTIFD_PACKET_BYTES: Final = 512 * 1024
COMPRESSION_FLAGS: Final = {"none": MULTIFD_FLAG_NOCOMP, "zlib": MULTIFD_FLAG_ZLIB, "zstd": MULTIFD_FLAG_ZSTD}

INIT: Final = struct.Struct(">II16sB7x32x")
INIT_BYTES: Final = INIT.size  # 64
#: magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num, reserved, ramblock
_HEAD: Final = struct.Struct(">IIIIIIQ32x256s")
_HEAD_BYTES: Final = _HEAD.size  # 320
MAIN_MAGIC: Final = 0x5145564D  # "QEVM": the main channel's first 4 bytes


def page_count(page_size: int) -> int:
    """Pages per packet: MULTIFD_PACKET_SIZE / target page size (128 for 4 KiB)."""
    return MULTIFD_PACKET_BYTES // page_size


def packet_header_bytes(page_size: int) -> int:
    return _HEAD_BYTES + 8 * page_count(page_size)


def encode_init(channel_id: int, uuid: bytes = bytes(16)) -> bytes:
    if not 0 <= channel_id <= 255 or len(uuid) != 16:
        raise ValueError("channel id must be 0..255 and the uuid 16 bytes")
    return INIT.pack(MULTIFD_MAGIC, MULTIFD_VERSION, uuid, channel_id)


def parse_init(raw: bytes, *, channels: int, uuid: bytes = bytes(16)) -> int:
    """The channel id of a ``MultiFDInit_t``, checked as QEMU's receiver does."""
    magic, version, their_uuid, cid = INIT.unpack(raw)
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(f"multifd: received packet magic {magic:x} expected {MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"multifd: received packet version {version} expected {MULTIFD_VERSION}", 4)
    if their_uuid != uuid:
        raise RemoteProtocolError(f"multifd: received uuid '{their_uuid.hex()}' and expected uuid "
                                  f"'{uuid.hex()}' for channel {cid}", 8)
    if cid >= channels:
        raise RemoteProtocolError(f"multifd: received channel id {cid} is greater than number of "
                                  f"channels {channels}", 24)
    return int(cid)


@dataclass(frozen=True, slots=True)
class PacketHeader:
    flags: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    block: str  # "" when the packet carries no pages
    offsets: NDArray[np.uint64]  # byte offsets in the block, normal_pages of them

    @property
    def sync(self) -> bool:
        return bool(self.flags & MULTIFD_FLAG_SYNC)

    @property
    def compression(self) -> int:
        return self.flags & MULTIFD_FLAG_COMPRESSION_MASK


def encode_packet_header(out: NDArray[np.uint8], *, flags: int, packet_num: int, block: str,
                         offsets: NDArray[np.uint64], next_packet_size: int, page_size: int) -> memoryview:
    """Fill ``out`` (``packet_header_bytes`` long) with a packet header; return a view of it."""
    count = page_count(page_size)
    n = offsets.size
    if n > count:
        raise ValueError(f"{n} pages do not fit a {count}-page multifd packet")
    raw = block.encode()
    if len(raw) > 255:
        raise ValueError(f"ramblock idstr too long: {block!r}")
    _HEAD.pack_into(w.byte_view(out), 0, MULTIFD_MAGIC, MULTIFD_VERSION, flags, count, n, next_packet_size,
                    packet_num, raw)
    offs = out[_HEAD_BYTES:_HEAD_BYTES + 8 * count].view(">u8")
    offs[:n] = offsets
    offs[n:] = 0
    return w.byte_view(out)[: _HEAD_BYTES + 8 * count]


def parse_packet_header(raw: bytes | bytearray | memoryview, *, page_size: int, blocks: Mapping[str, int],
                        compression: int, max_data_bytes: int | None = None) -> PacketHeader:
    """Parse and check a packet header as QEMU's ``multifd_recv_unfill_packet`` and
    ``*_recv_pages`` do (and the offset alignment, which QEMU does not check).

    ``blocks`` maps idstr -> used_length.  Errors are RemoteProtocolError
    with offsets relative to the header.
    """
    count = page_count(page_size)
    magic, version, flags, pages_alloc, normal, next_size, packet_num, rb = _HEAD.unpack_from(raw, 0)
    if magic != MULTIFD_MAGIC:
        raise RemoteProtocolError(f"multifd: received packet magic {magic:x} and expected magic {MULTIFD_MAGIC:x}", 0)
    if version != MULTIFD_VERSION:
        raise RemoteProtocolError(f"multifd: received packet version {version} and expected version "
                                  f"{MULTIFD_VERSION}", 4)
    if flags & ~(MULTIFD_FLAG_SYNC | MULTIFD_FLAG_COMPRESSION_MASK):
        raise RemoteProtocolError(f"multifd: unknown packet flags {flags:#x}", 8)
    if pages_alloc > count:
        raise RemoteProtocolError(f"multifd: received packet with {pages_alloc} pages and expected maximum "
                                  f"pages are {count}", 12)
    if normal > pages_alloc:
        raise RemoteProtocolError(f"multifd: received packet with {normal} pages and expected maximum pages "
                                  f"are {pages_alloc}", 16)
    if normal == 0:
        return PacketHeader(flags, 0, next_size, packet_num, "", np.empty(0, np.uint64))
    if flags & MULTIFD_FLAG_COMPRESSION_MASK != compression:
        raise RemoteProtocolError(f"multifd: flags received {flags & MULTIFD_FLAG_COMPRESSION_MASK:#x} flags "
                                  f"expected {compression:#x}", 8)
    if compression == MULTIFD_FLAG_NOCOMP and next_size not in (0, normal * page_size):
        raise RemoteProtocolError(f"multifd: next_packet_size {next_size} for {normal} raw pages", 20)
    if max_data_bytes is not None and next_size > max_data_bytes:
        raise RemoteProtocolError(f"multifd: packet data of {next_size} bytes exceeds {max_data_bytes}", 20)
    name = rb.split(b"\0", 1)[0].decode(errors="replace")
    used = blocks.get(name)
    if used is None:
        raise RemoteProtocolError(f"multifd: unknown ram block {name}", 64)
    offsets = np.frombuffer(raw, dtype=">u8", count=normal, offset=_HEAD_BYTES).astype(np.uint64)
    bad = (offsets > used - page_size) | (offsets % np.uint64(page_size) != 0)
    if bad.any():
        i = int(bad.argmax())
        raise RemoteProtocolError(f"multifd: offset too long {int(offsets[i])} (max {used - page_size}) "
                                  f"or not page aligned", _HEAD_BYTES + 8 * i)
    return PacketHeader(flags, normal, next_size, packet_num, name, offsets)
