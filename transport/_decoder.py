"""Sans-IO decoder of QEMU's migration stream (the receiving side).

Theory of operation
-------------------

The decoder owns one growable byte buffer.  Bytes enter it either by copy
(``receive_data(b)``) or in place: ``get_buffer()`` hands out the free tail of
the buffer, the caller ``recv_into``s it and reports the count with
``buffer_updated(n)`` (asyncio's ``BufferedProtocol`` pattern).  ``next_event()``
parses from the front and returns one event, or ``NEED_DATA``.  It never
consumes a partial record: a record is parsed only once all its bytes are
there, so any split of the byte stream yields the same records.

RAM payloads are the hot path.  A run of ``PAGE|CONTINUE`` records has a fixed
layout (be64 header + one target page, 4104 bytes), so when the buffer holds
many of them the decoder lays a strided numpy view over the buffer, checks all
headers (flags and offset bound) in one vectorised step, and returns one
:class:`RamPages` whose ``data`` is a ``(n, 4096)`` view of the pages where
they lie: the only copy of a page on the receiving side is the consumer's
scatter into guest RAM.  ``ZERO|CONTINUE`` runs (9-byte records) get the same
treatment.  The run stops before the first record that differs; that record is
parsed on its own on the next call, so a bad record is reported with its exact
offset whatever the buffering was.

Validation mirrors QEMU's loader (``qemu_loadvm_state``, ``ram_load_precopy``)
and is stricter where QEMU would misbehave: every page offset is checked
against the ``used_length`` the stream declared in MEM_SIZE, and MEM_SIZE
itself against the destination's ``max_block_bytes``, so a page can never be
written outside guest RAM.  Views handed out stay valid until the next call
into the decoder (``next_event``, ``get_buffer``, ``receive_data``).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _wire as w
from ._events import (
    NEED_DATA,
    Configuration,
    DeviceState,
    EndOfStream,
    RamEOS,
    RamMemSize,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamHeader,
    VMDescription,
    VMStateSection,
)
from ._vmstate import KNOWN_SECTIONS, LayoutError, measure_section, validate_vmdesc
from .errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._events import Event, _Sentinel

__all__ = ["ConnectionClosed", "StreamDecoder"]

_DEFAULT_BUFFER_BYTES = 8 << 20
_DEFAULT_RECV_BYTES = 1 << 20
_MAX_MEM_SIZE_BLOCKS = 4096
_BE64 = np.dtype(">u8")


class ConnectionClosed:
    """The peer closed the byte stream cleanly after :class:`EndOfStream`."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConnectionClosed)

    def __hash__(self) -> int:
        return hash(ConnectionClosed)

    def __repr__(self) -> str:
        return "ConnectionClosed()"


class _State(enum.Enum):
    HEADER = "header"  # expecting the file header
    AFTER_HEADER = "after-header"  # CONFIGURATION allowed here only
    TOP = "top"  # expecting a section type byte
    RAM = "ram"  # inside a RAM payload (until EOS)
    DEVICE = "device"  # expecting our device section payload
    VMSTATE = "vmstate"  # expecting a QEMU device section payload
    FOOTER = "footer"  # expecting the section footer
    AFTER_EOF = "after-eof"  # only VMDESCRIPTION may follow
    DONE = "done"  # nothing may follow
    ERROR = "error"


class _Sec(enum.Enum):
    RAM_OPEN = "ram"
    RAM_ENDED = "ram-ended"
    FULL = "full"


class StreamDecoder:
    """Parse a migration stream into events; no I/O.

    Args:
        page_size: the target page size (flags live below it).
        max_block_bytes: the destination's RAM blocks, ``{idstr: bytes}``.  If
            given, MEM_SIZE may only name these blocks, each no larger than
            its entry.
        max_device_state_bytes: largest device-state payload accepted.
        buffer_bytes: initial receive buffer capacity (it grows on demand for
            a single record larger than the free space).

    The decoder is not thread-safe and holds no references to caller buffers.
    """

    def __init__(
        self,
        *,
        page_size: int = w.TARGET_PAGE_SIZE,
        max_block_bytes: Mapping[str, int] | None = None,
        max_device_state_bytes: int = w.DEFAULT_MAX_DEVICE_STATE_BYTES,
        buffer_bytes: int = _DEFAULT_BUFFER_BYTES,
    ) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024: {page_size}")
        self.page_size = page_size
        self._mask = page_size - 1
        self._rec = 8 + page_size  # one PAGE|CONTINUE record
        self._max_block_bytes = dict(max_block_bytes) if max_block_bytes is not None else None
        self._max_device_state = max_device_state_bytes
        self._buf = np.empty(max(buffer_bytes, 2 * self._rec), dtype=np.uint8)
        self._mv = w.byte_view(self._buf)
        self._start = 0  # first unparsed byte in _buf
        self._end = 0  # end of received bytes in _buf
        self._base = 0  # stream offset of _buf[0]
        self._eof = False
        self._state = _State.HEADER
        self._error: RemoteProtocolError | None = None
        self._blocks: dict[str, int] | None = None  # MEM_SIZE: idstr -> used_length
        self._last_block: str | None = None  # ram_block_from_stream's remembered block
        self._sections: dict[int, _Sec] = {}
        self._cur: int | None = None  # section whose payload/footer we are in
        self._seen_ram = False
        self._machine: str | None = None  # the CONFIGURATION's machine name
        #: device sections read, for the VM description check:
        #: (idstr, instance_id, version_id, payload length)
        self._devices: list[tuple[str, int, int, int]] = []
        self._full: tuple[str, int, int] | None = None  # the open FULL section
        #: the parsed VM description (after VMDescription)
        self.vmdesc: dict[str, Any] | None = None

    # -- input -----------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Return writable free space at the end of the receive buffer.

        Fill a prefix of it (e.g. with ``sock.recv_into``) and then call
        :meth:`buffer_updated`.  At least ``sizehint`` bytes are returned
        (1 MiB if ``sizehint <= 0``).  Invalidates views from earlier events.

        Raises:
            LocalProtocolError: the peer's EOF was already reported.
        """
        if self._eof:
            raise LocalProtocolError("get_buffer() after receive_data(b'') reported EOF")
        want = sizehint if sizehint > 0 else _DEFAULT_RECV_BYTES
        if self._start == self._end:
            self._base += self._start
            self._start = self._end = 0
        cap = len(self._buf)
        if cap - self._end < want:
            live = self._end - self._start
            if cap - live >= want and self._start:
                self._buf[:live] = self._buf[self._start : self._end]
            else:
                new = np.empty(max(2 * cap, live + want), dtype=np.uint8)
                new[:live] = self._buf[self._start : self._end]
                self._buf = new
                self._mv = w.byte_view(new)
            self._base += self._start
            self._start, self._end = 0, live
        return self._mv[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        """Report that ``nbytes`` were written at the start of :meth:`get_buffer`'s view."""
        if nbytes < 0 or self._end + nbytes > len(self._buf):
            raise LocalProtocolError(f"buffer_updated({nbytes}) exceeds the buffer handed out")
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes from the peer; ``b""`` means the peer closed the stream.

        Raises:
            LocalProtocolError: data after the peer's EOF was reported.
        """
        if self._eof:
            raise LocalProtocolError("receive_data() after receive_data(b'') reported EOF")
        mv = memoryview(data).cast("B")
        n = mv.nbytes
        if n == 0:
            self._eof = True
            return
        self.get_buffer(n)[:n] = mv
        self._end += n

    # -- inspection ------------------------------------------------------
    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(unparsed bytes, peer closed)``: e.g. what follows EndOfStream."""
        return bytes(self._mv[self._start : self._end]), self._eof

    @property
    def stream_offset(self) -> int:
        """Stream offset of the first byte not yet parsed."""
        return self._base + self._start

    @property
    def blocks(self) -> dict[str, int] | None:
        """The block list from MEM_SIZE (``None`` before it arrived)."""
        return None if self._blocks is None else dict(self._blocks)

    # -- parsing ---------------------------------------------------------
    def next_event(self) -> Event | ConnectionClosed | _Sentinel:
        """Parse and return the next event, or ``NEED_DATA``.

        After :class:`EndOfStream` only a :class:`VMDescription` may follow;
        once the peer has closed, :class:`ConnectionClosed` is returned.

        Raises:
            RemoteProtocolError: the bytes are not a valid stream (raised
                again on every later call: the decoder is dead).
        """
        if self._error is not None:
            raise RemoteProtocolError(f"decoder failed earlier: {self._error.detail}", self._error.offset)
        try:
            return self._dispatch[self._state](self)
        except RemoteProtocolError as exc:
            self._error = exc
            self._state = _State.ERROR
            raise

    def _fail(self, detail: str, pos: int) -> RemoteProtocolError:
        return RemoteProtocolError(detail, self._base + pos)

    def _have(self, n: int, what: str, pos: int | None = None) -> bool:
        """True if ``n`` bytes are buffered from the parse point; raise on EOF."""
        if self._end - self._start >= n:
            return True
        if self._eof:
            where = self._start if pos is None else pos
            raise self._fail(f"stream truncated: EOF inside {what}", where)
        return False

    def _idstr(self, pos: int, what: str) -> str:
        length = self._mv[pos]
        raw = bytes(self._mv[pos + 1 : pos + 1 + length])
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise self._fail(f"{what} is not valid UTF-8: {raw!r}", pos) from None
        if not text:
            raise self._fail(f"empty {what}", pos)
        return text

    def _p_header(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(8, "the file header"):
            return NEED_DATA
        magic, version = w.FILE_HEADER.unpack_from(self._mv, p)
        if magic != w.QEMU_VM_FILE_MAGIC:
            raise self._fail(f"bad magic {magic:#010x}, expected {w.QEMU_VM_FILE_MAGIC:#010x} ('QEVM')", p)
        if version == w.QEMU_VM_FILE_VERSION_COMPAT:
            raise self._fail("SaveVM v2 format is obsolete and no longer supported", p + 4)
        if version != w.QEMU_VM_FILE_VERSION:
            raise self._fail(f"unsupported stream version {version}, expected {w.QEMU_VM_FILE_VERSION}", p + 4)
        self._start = p + 8
        self._state = _State.AFTER_HEADER
        return StreamHeader(version)

    def _p_after_header(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(1, "the first section"):
            return NEED_DATA
        if self._mv[p] != w.QEMU_VM_CONFIGURATION:
            self._state = _State.TOP
            return self._p_top()
        if not self._have(5, "the configuration section"):
            return NEED_DATA
        (length,) = w.BE32.unpack_from(self._mv, p + 1)
        if length > w.MAX_MACHINE_NAME_BYTES:
            raise self._fail(f"machine name length {length} exceeds {w.MAX_MACHINE_NAME_BYTES}", p + 1)
        if not self._have(5 + length, "the configuration section"):
            return NEED_DATA
        raw = bytes(self._mv[p + 5 : p + 5 + length])
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            raise self._fail(f"machine name is not valid UTF-8: {raw!r}", p + 5) from None
        self._start = p + 5 + length
        self._state = _State.TOP
        self._machine = name
        return Configuration(name)

    def _p_top(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(1, "a section"):
            return NEED_DATA
        kind = self._mv[p]
        if kind == w.QEMU_VM_EOF:
            self._start = p + 1
            self._state = _State.AFTER_EOF
            return EndOfStream()
        if kind in (w.QEMU_VM_SECTION_START, w.QEMU_VM_SECTION_FULL):
            return self._p_section_start_full(kind)
        if kind in (w.QEMU_VM_SECTION_PART, w.QEMU_VM_SECTION_END):
            if not self._have(5, "a section header"):
                return NEED_DATA
            (sid,) = w.BE32.unpack_from(self._mv, p + 1)
            sec = self._sections.get(sid)
            if sec is not _Sec.RAM_OPEN:
                why = "was ended" if sec is _Sec.RAM_ENDED else "is not a started iterative section"
                raise self._fail(f"{w.SECTION_TYPE_NAMES[kind]} for section id {sid}, which {why}", p)
            self._start = p + 5
            self._state = _State.RAM
            self._cur = sid
            if kind == w.QEMU_VM_SECTION_END:
                self._sections[sid] = _Sec.RAM_ENDED
                return SectionEnd(sid)
            return SectionPart(sid)
        name = w.SECTION_TYPE_NAMES.get(kind)
        if name is None:
            raise self._fail(f"unknown section type {kind:#04x}", p)
        raise self._fail(f"unexpected or unsupported section type {name} ({kind:#04x})", p)

    def _p_section_start_full(self, kind: int) -> Event | _Sentinel:
        p = self._start
        what = "a section header"
        if not self._have(6, what):
            return NEED_DATA
        sid = w.BE32.unpack_from(self._mv, p + 1)[0]
        length = self._mv[p + 5]
        if not self._have(6 + length + 8, what):
            return NEED_DATA
        idstr = self._idstr(p + 5, "section idstr")
        instance_id, version_id = w.SECTION_TAIL.unpack_from(self._mv, p + 6 + length)
        if sid in self._sections:
            raise self._fail(f"section id {sid} is already in use", p + 1)
        start = kind == w.QEMU_VM_SECTION_START
        if idstr == w.RAM_SECTION_IDSTR and start:
            expect = (w.RAM_SECTION_INSTANCE, w.RAM_SECTION_VERSION)
            if self._seen_ram:
                raise self._fail("a second 'ram' section was started", p)
        elif not start and idstr in KNOWN_SECTIONS:
            expect = (0, KNOWN_SECTIONS[idstr].version)
        else:
            raise self._fail(
                f"unknown savevm section or instance {idstr!r} {instance_id} in a {w.SECTION_TYPE_NAMES[kind]} section",
                p,
            )
        if (instance_id, version_id) != expect:
            raise self._fail(
                f"section {idstr!r}: instance {instance_id} version {version_id}, expected instance "
                f"{expect[0]} version {expect[1]}",
                p + 6 + length,
            )
        self._start = p + 6 + length + 8
        self._cur = sid
        if start:
            self._seen_ram = True
            self._sections[sid] = _Sec.RAM_OPEN
            self._state = _State.RAM
            return SectionStart(sid, idstr, instance_id, version_id)
        self._sections[sid] = _Sec.FULL
        self._full = (idstr, instance_id, version_id)
        self._state = _State.DEVICE if idstr == w.VCPU_SECTION_IDSTR else _State.VMSTATE
        return SectionFull(sid, idstr, instance_id, version_id)

    def _p_footer(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(1, "a section footer"):
            return NEED_DATA
        if self._mv[p] != w.QEMU_VM_SECTION_FOOTER:
            raise self._fail(f"missing footer for section {self._cur}: got byte {self._mv[p]:#04x}", p)
        if not self._have(5, "a section footer"):
            return NEED_DATA
        (sid,) = w.BE32.unpack_from(self._mv, p + 1)
        if sid != self._cur:
            raise self._fail(f"mismatched section id in footer: read {sid}, expected {self._cur}", p + 1)
        self._start = p + 5
        self._state = _State.TOP
        self._cur = None
        return SectionFooter(sid)

    def _p_device(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(4, "device state"):
            return NEED_DATA
        (length,) = w.BE32.unpack_from(self._mv, p)
        if length > self._max_device_state:
            raise self._fail(f"device state length {length} exceeds {self._max_device_state}", p)
        if not self._have(4 + length, "device state"):
            return NEED_DATA
        data = bytes(self._mv[p + 4 : p + 4 + length])
        self._start = p + 4 + length
        self._state = _State.FOOTER
        assert self._full is not None  # set with the DEVICE state
        self._devices.append((*self._full, 4 + length))
        return DeviceState(data)

    def _p_vmstate(self) -> Event | _Sentinel:
        p = self._start
        idstr, instance_id, version_id = self._full  # type: ignore[misc]
        try:
            measured = measure_section(self._mv, p, self._end, KNOWN_SECTIONS[idstr])
        except LayoutError as exc:
            raise self._fail(f"section {idstr!r}: {exc.detail}", p + exc.offset) from None
        if measured is None:
            if self._eof:
                raise self._fail(f"stream truncated: EOF inside section {idstr!r}", p)
            if self._end - p > self._max_device_state:
                raise self._fail(f"section {idstr!r} longer than {self._max_device_state} bytes", p)
            return NEED_DATA
        n = measured.length
        data = bytes(self._mv[p : p + n])
        self._start = p + n
        self._state = _State.FOOTER
        self._devices.append((idstr, instance_id, version_id, n))
        return VMStateSection(idstr, instance_id, version_id, data)

    def _p_after_eof(self) -> Event | ConnectionClosed | _Sentinel:
        p = self._start
        if self._end == p:
            return ConnectionClosed() if self._eof else NEED_DATA
        if self._state is _State.DONE or self._mv[p] != w.QEMU_VM_VMDESCRIPTION:
            raise self._fail(f"data after the end of the stream (byte {self._mv[p]:#04x})", p)
        if not self._have(5, "the VM description"):
            return NEED_DATA
        (length,) = w.BE32.unpack_from(self._mv, p + 1)
        if length > w.DEFAULT_MAX_VMDESC_BYTES:
            raise self._fail(f"VM description length {length} exceeds {w.DEFAULT_MAX_VMDESC_BYTES}", p + 1)
        if not self._have(5 + length, "the VM description"):
            return NEED_DATA
        data = bytes(self._mv[p + 5 : p + 5 + length])
        try:
            self.vmdesc = validate_vmdesc(data, page_size=self.page_size, machine=self._machine,
                                          sections=self._devices)
        except ValueError as exc:
            raise self._fail(str(exc), p + 5) from None
        self._start = p + 5 + length
        self._state = _State.DONE
        return VMDescription(data)

    # -- RAM payload -----------------------------------------------------
    def _p_ram(self) -> Event | _Sentinel:
        p = self._start
        if not self._have(8, "a RAM record header"):
            return NEED_DATA
        (hdr,) = w.BE64.unpack_from(self._mv, p)
        flags = hdr & self._mask
        if self._last_block is not None:
            if flags == w.PAGE_CONT and self._end - p >= 2 * self._rec:
                run = self._page_run(p)
                if run is not None:
                    return run
            elif flags == w.ZERO_CONT and self._end - p >= 18:
                zrun = self._zero_run(p)
                if zrun is not None:
                    return zrun
        addr = hdr & ~self._mask
        if flags & ~w.RAM_SAVE_FLAGS_DEFINED:
            raise self._fail(f"RAM record offset {hdr:#x} is not page aligned", p)
        if flags == w.RAM_SAVE_FLAG_EOS:
            if addr:
                raise self._fail(f"EOS record carries an offset ({addr:#x})", p)
            self._start = p + 8
            self._state = _State.FOOTER
            return RamEOS()
        if flags == w.RAM_SAVE_FLAG_MEM_SIZE:
            return self._p_mem_size(p, addr)
        kind = flags & ~w.RAM_SAVE_FLAG_CONTINUE
        if kind in (w.RAM_SAVE_FLAG_ZERO, w.RAM_SAVE_FLAG_PAGE):
            return self._p_page(p, flags, addr)
        raise self._fail(f"unknown or unsupported RAM flags {w.ram_flag_names(flags)} ({flags:#x})", p)

    def _p_mem_size(self, p: int, total: int) -> Event | _Sentinel:
        if self._blocks is not None:
            raise self._fail("a second MEM_SIZE record (RAM resizing is not supported)", p)
        q = p + 8
        remaining = total
        blocks: dict[str, int] = {}
        while remaining:
            if len(blocks) >= _MAX_MEM_SIZE_BLOCKS:
                raise self._fail(f"MEM_SIZE lists more than {_MAX_MEM_SIZE_BLOCKS} blocks", q)
            if not self._have(q + 1 - p, "a MEM_SIZE record", p):
                return NEED_DATA
            n = self._mv[q]
            if not self._have(q + 1 + n + 8 - p, "a MEM_SIZE record", p):
                return NEED_DATA
            name = self._idstr(q, "RAM block idstr")
            (length,) = w.BE64.unpack_from(self._mv, q + 1 + n)
            if name in blocks:
                raise self._fail(f"MEM_SIZE lists block {name!r} twice", q)
            if length == 0 or length & self._mask:
                raise self._fail(f"block {name!r} used_length {length:#x} is not a positive page multiple", q + 1 + n)
            if length > remaining:
                raise self._fail(
                    f"block lengths exceed the MEM_SIZE total {total:#x} (block {name!r} is {length:#x}, "
                    f"{remaining:#x} left)",
                    q + 1 + n,
                )
            if self._max_block_bytes is not None:
                limit = self._max_block_bytes.get(name)
                if limit is None:
                    raise self._fail(f"unknown ramblock {name!r}, cannot accept migration", q)
                if length > limit:
                    raise self._fail(f"block {name!r} used_length {length:#x} exceeds local size {limit:#x}", q + 1 + n)
            blocks[name] = length
            remaining -= length
            q += 1 + n + 8
        self._blocks = blocks
        self._start = q
        return RamMemSize(tuple(blocks.items()))

    def _p_page(self, p: int, flags: int, addr: int) -> Event | _Sentinel:
        q = p + 8
        if flags & w.RAM_SAVE_FLAG_CONTINUE:
            block = self._last_block
            if block is None:
                raise self._fail("CONTINUE flag before any RAM block was named", p)
        else:
            if not self._have(9, "a RAM record"):
                return NEED_DATA
            n = self._mv[q]
            if not self._have(9 + n, "a RAM record"):
                return NEED_DATA
            block = self._idstr(q, "RAM block idstr")
            q += 1 + n
        if self._blocks is None:
            raise self._fail("page record before MEM_SIZE", p)
        used = self._blocks.get(block)
        if used is None:
            raise self._fail(f"can't find block {block!r}", p + 8)
        if addr >= used:
            raise self._fail(f"illegal RAM offset {addr:#x} in block {block!r} (used_length {used:#x})", p)
        offsets = np.array([addr], dtype=np.uint64)
        if flags & w.RAM_SAVE_FLAG_ZERO:
            if not self._have(q + 1 - p, "a ZERO record"):
                return NEED_DATA
            fill = self._mv[q]
            if fill:
                raise self._fail(f"ZERO record fill byte is {fill:#04x}, must be 0", q)
            self._start = q + 1
            self._last_block = block
            return RamZeroPages(block, offsets)
        ps = self.page_size
        if not self._have(q + ps - p, "a PAGE record"):
            return NEED_DATA
        data = np.ndarray((1, ps), dtype=np.uint8, buffer=self._buf, offset=q)
        self._start = q + ps
        self._last_block = block
        return RamPages(block, offsets, data)

    def _page_run(self, p: int) -> RamPages | None:
        """Vectorised parse of consecutive ``PAGE|CONTINUE`` records at ``p``."""
        rec = self._rec
        k = (self._end - p) // rec
        hdrs = np.ndarray((k,), dtype=_BE64, buffer=self._buf, offset=p, strides=(rec,)).astype(np.uint64)
        used = self._blocks[self._last_block]  # type: ignore[index]
        ok = (hdrs & np.uint64(self._mask)) == w.PAGE_CONT
        ok &= hdrs < used  # flags are below the page size, so this bounds the offset
        run = k if ok.all() else int(ok.argmin())
        if run == 0:
            return None
        offsets = hdrs[:run] & np.uint64(~self._mask & 0xFFFFFFFFFFFFFFFF)
        data = np.ndarray((run, self.page_size), dtype=np.uint8, buffer=self._buf, offset=p + 8, strides=(rec, 1))
        self._start = p + run * rec
        return RamPages(self._last_block, offsets, data)  # type: ignore[arg-type]

    def _zero_run(self, p: int) -> RamZeroPages | None:
        """Vectorised parse of consecutive ``ZERO|CONTINUE`` records at ``p``."""
        k = (self._end - p) // 9
        hdrs = np.ndarray((k,), dtype=_BE64, buffer=self._buf, offset=p, strides=(9,)).astype(np.uint64)
        fill = np.ndarray((k,), dtype=np.uint8, buffer=self._buf, offset=p + 8, strides=(9,))
        used = self._blocks[self._last_block]  # type: ignore[index]
        ok = (hdrs & np.uint64(self._mask)) == w.ZERO_CONT
        ok &= hdrs < used
        ok &= fill == 0
        run = k if ok.all() else int(ok.argmin())
        if run == 0:
            return None
        offsets = hdrs[:run] & np.uint64(~self._mask & 0xFFFFFFFFFFFFFFFF)
        self._start = p + run * 9
        return RamZeroPages(self._last_block, offsets)  # type: ignore[arg-type]

    def _p_error(self) -> Event:  # pragma: no cover - next_event re-raises first
        raise AssertionError("decoder in ERROR state")

    _dispatch = {
        _State.HEADER: _p_header,
        _State.AFTER_HEADER: _p_after_header,
        _State.TOP: _p_top,
        _State.RAM: _p_ram,
        _State.DEVICE: _p_device,
        _State.VMSTATE: _p_vmstate,
        _State.FOOTER: _p_footer,
        _State.AFTER_EOF: _p_after_eof,
        _State.DONE: _p_after_eof,
        _State.ERROR: _p_error,
    }
