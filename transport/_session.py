"""One migration stream session per end: the stream grammar and its return path.

The codec (:class:`~transport.StreamEncoder` / :class:`~transport.StreamDecoder`)
knows records; a session knows a *migration*: which sections come in which
order, which section ids they get, what goes after EOF, and what the two
ends say to each other on the return path.  Like the codec it does no I/O
(h11's ``Connection`` over its reader and writer): the source session returns
the bytes to write; the destination session takes the bytes read and returns
events.  The engine above it decides nothing about the stream's shape.

Theory of operation
-------------------

A stream is one of three kinds (:class:`StreamKind`), fixed when the source
starts:

* ``NATIVE``: RAM, then our ``migrator-vcpus`` section.  Only our destination
  loads it.
* ``RAM_ONLY`` (``x-ram-only``) and ``QEMU_DEVICES`` (``x-qemu-devices``):
  RAM, then nothing or QEMU's ``-M none`` device sections: a stock QEMU
  loads them.

The return path (:class:`ReturnPath`) is decided once, by
:func:`decide_return_path`, from the stream kind, the channel and the
``x-handover`` capability:

=============  =================  ==========  ==================
stream kind    channel            x-handover  return path
=============  =================  ==========  ==================
NATIVE         tcp:, unix:        off         SHUT
NATIVE         tcp:, unix:        on          HANDOVER
NATIVE         file:              any         NONE
RAM_ONLY       any                any         NONE
QEMU_DEVICES   any                any         NONE
=============  =================  ==========  ==================

A file is read later by another process: nothing can come back.  A stock
QEMU opens a return path only when the source asks for one in the stream
(``MIG_CMD_OPEN_RETURN_PATH``, capability ``return-path``), which we never
send, so a stream meant for it has none.  The destination learns the kind
only at EOF (the device sections come last); until then it may still send
SHUT(1) when it fails on a socket, which a NATIVE source reads and a stock
one never looks at.

Section order, both ends: the header and CONFIGURATION; ``ram`` START (with
MEM_SIZE), any number of PARTs, one END, each closed by EOS and its footer;
then the device sections (FULL); EOF; the VM description.  Ids are given in
that order starting at 1, as QEMU's ``savevm_state`` numbers its handlers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from . import _wire as w
from ._decoder import ConnectionClosed, StreamDecoder
from ._encoder import EncodedPages, StreamEncoder
from ._events import (Configuration, DeviceState, EndOfStream, RamEOS, RamMemSize, RamPages,
                      RamZeroPages, SectionEnd, SectionFooter, SectionFull, SectionPart, SectionStart,
                      StreamHeader, VMDescription, VMStateSection)
from ._return_path import (MIG_CMD_X_GO, MIG_CMD_X_NOGO, MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED, Message,
                           MessageDecoder, PeerClosed, encode_go, encode_loaded, encode_nogo, encode_shut)
from ._vmstate import KNOWN_SECTIONS
from .channel import Address, parse_uri
from .errors import LocalProtocolError, RemoteProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    import numpy as np
    from numpy.typing import ArrayLike, NDArray

    from ._events import Sentinel

__all__ = [
    "MACHINE_NAME",
    "DestinationSession",
    "GoAhead",
    "Loaded",
    "NoGo",
    "ReturnPath",
    "Shut",
    "SourceSession",
    "StreamKind",
    "decide_return_path",
]

#: Our machine is QEMU's ``-M none`` with RAM: one block "ram" at guest-physical
#: 0 and no devices.  Stock QEMU requires the CONFIGURATION section to name the
#: destination's machine type, so a RAM-only stream loads into ``-M none``.
MACHINE_NAME: Final = "none"


class StreamKind(enum.Enum):
    """What follows the RAM: who can load the stream."""

    NATIVE = "migrator"  #: our ``migrator-vcpus`` section: our destination only
    RAM_ONLY = "x-ram-only"  #: nothing: a stock ``-M none`` QEMU loads it
    QEMU_DEVICES = "x-qemu-devices"  #: QEMU's ``-M none`` sections: a stock QEMU loads it


class ReturnPath(enum.Enum):
    """What the destination says back, and so where the source's point of no return is."""

    NONE = "none"  #: nothing comes back: EOF on the wire is the point of no return
    SHUT = "shut"  #: QEMU's ``MIG_RP_MSG_SHUT`` after the destination loaded (and runs)
    HANDOVER = "x-handover"  #: LOADED, then the source's GO or NOGO, then SHUT


def decide_return_path(kind: StreamKind, channel: Address | str, *, handover: bool) -> ReturnPath:
    """The return-path decision table of this module's essay.

    Args:
        kind: the stream's kind.
        channel: the channel's address or migration URI.
        handover: the ``x-handover`` capability of this side.

    Raises:
        BadURIError: ``channel`` is a URI we cannot parse.
    """
    address = parse_uri(channel) if isinstance(channel, str) else channel
    if not address.bidirectional or kind is not StreamKind.NATIVE:
        return ReturnPath.NONE
    return ReturnPath.HANDOVER if handover else ReturnPath.SHUT


# -- return-path events ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Shut:
    """``MIG_RP_MSG_SHUT``: 0 = loaded (and running or about to); else failed."""

    status: int


@dataclass(frozen=True, slots=True)
class Loaded:
    """``MIG_RP_MSG_X_LOADED``: the destination loaded the whole stream and waits, paused."""

    stream_bytes: int


@dataclass(frozen=True, slots=True)
class GoAhead:
    """``MIG_CMD_X_GO`` for exactly the bytes received: the destination owns the guest."""

    stream_bytes: int


@dataclass(frozen=True, slots=True)
class NoGo:
    """``MIG_CMD_X_NOGO``: the source keeps the guest; the destination must never run it."""

    reason: int


def _message_event(msg: Message) -> Shut | Loaded | GoAhead | NoGo:
    if msg.type == MIG_RP_MSG_SHUT:
        return Shut(msg.value)
    if msg.type == MIG_RP_MSG_X_LOADED:
        return Loaded(msg.value)
    if msg.type == MIG_CMD_X_GO:
        return GoAhead(msg.value)
    return NoGo(msg.value)


class _Phase(enum.Enum):
    START = "start"
    OPENED = "opened"  # source: header and configuration written
    RAM = "ram"  # the ram section is started and open (between START/PART/END and its footer)
    ITERATING = "iterating"  # between two ram sections
    RAM_DONE = "ram-done"  # the END section is closed: device sections, then EOF
    EOF = "eof"  # EOF and the description are out/in
    LOADED = "loaded"  # destination: LOADED sent, GO or NOGO due / source: LOADED received
    DECIDED = "decided"  # GO or NOGO sent/received


_BEFORE_EOF: Final = frozenset({_Phase.START, _Phase.OPENED, _Phase.RAM, _Phase.ITERATING, _Phase.RAM_DONE})


class SourceSession:
    """The sending end of one migration stream; no I/O.

    Every method returns the bytes to write next, in order, or raises
    :class:`LocalProtocolError` with the session unchanged (except for a
    device payload the encoder finds malformed: the section is open by then,
    and the stream cannot be finished).

    Args:
        kind: what follows the RAM (and so who can load the stream).
        channel: the address (or URI) the stream goes to.
        handover: this side's ``x-handover`` capability.
        machine: the CONFIGURATION's machine type name.
    """

    def __init__(self, kind: StreamKind, channel: Address | str, *, handover: bool = False,
                 machine: str = MACHINE_NAME, page_size: int = w.TARGET_PAGE_SIZE) -> None:
        self.kind = kind
        #: decided once, here: see :func:`decide_return_path`
        self.return_path = decide_return_path(kind, channel, handover=handover)
        self._machine = machine
        self._enc = StreamEncoder(page_size)
        self._phase = _Phase.START
        self._next_id = 1
        self._ram_id = 0
        self._devices = 0
        self._ended = False  # the ram END section was opened
        self._rp = MessageDecoder({MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED})
        self._loaded: int | None = None
        #: every byte this session produced (what the destination counts in LOADED/GO)
        self.bytes_out = 0

    def _out(self, data: bytes) -> bytes:
        self.bytes_out += len(data)
        return data

    def _require(self, *phases: _Phase, what: str) -> None:
        if self._phase not in phases:
            raise LocalProtocolError(f"{what} is not allowed now (session phase {self._phase.value})")

    def _new_id(self) -> int:
        sid = self._next_id
        self._next_id += 1
        return sid

    # -- the stream -------------------------------------------------------------
    def open(self) -> bytes:
        """The file header and CONFIGURATION (before multifd channels connect)."""
        self._require(_Phase.START, what="the stream's header")
        out = self._enc.header() + self._enc.configuration(self._machine)
        self._phase = _Phase.OPENED
        return self._out(out)

    def ram_start(self, blocks: Iterable[tuple[str, int]]) -> bytes:
        """The ``ram`` START section with MEM_SIZE (QEMU's ``ram_save_setup``);
        close it with :meth:`ram_close`."""
        self._require(_Phase.OPENED, what="the ram START section")
        enc = self._enc
        sid = self._next_id
        out = (enc.section_start(sid, w.RAM_SECTION_IDSTR, w.RAM_SECTION_INSTANCE, w.RAM_SECTION_VERSION)
               + enc.ram_mem_size(blocks))
        self._ram_id = self._new_id()
        self._phase = _Phase.RAM
        return self._out(out)

    def ram_part(self) -> bytes:
        """A ``ram`` PART section (one ``ram_save_iterate``)."""
        self._require(_Phase.ITERATING, what="a ram PART section")
        out = self._enc.section_part(self._ram_id)
        self._phase = _Phase.RAM
        return self._out(out)

    def ram_end(self) -> bytes:
        """The ``ram`` END section (``ram_save_complete``): the last one."""
        self._require(_Phase.ITERATING, what="the ram END section")
        out = self._enc.section_end(self._ram_id)
        self._phase = _Phase.RAM
        self._ended = True
        return self._out(out)

    def ram_pages(self, block_idstr: str, block_pages: NDArray[np.uint8], page_indices: ArrayLike, *,
                  detect_zero: bool = True) -> EncodedPages:
        """Page records (see :meth:`StreamEncoder.ram_pages`) inside an open ``ram`` section."""
        self._require(_Phase.RAM, what="page records")
        enc = self._enc.ram_pages(block_idstr, block_pages, page_indices, detect_zero=detect_zero)
        self.bytes_out += enc.nbytes
        return enc

    def ram_zero_pages(self, block_idstr: str, block_pages: NDArray[np.uint8], page_indices: ArrayLike, *,
                       detect_zero: bool = True) -> tuple[EncodedPages, NDArray[np.intp]]:
        """multifd: ZERO records here, the other pages for the channels
        (see :meth:`StreamEncoder.ram_zero_pages`)."""
        self._require(_Phase.RAM, what="page records")
        enc, nonzero = self._enc.ram_zero_pages(block_idstr, block_pages, page_indices, detect_zero=detect_zero)
        self.bytes_out += enc.nbytes
        return enc, nonzero

    def ram_close(self) -> bytes:
        """EOS and the footer of the open ``ram`` section."""
        self._require(_Phase.RAM, what="EOS")
        out = self._enc.eos() + self._enc.section_footer(self._ram_id)
        self._phase = _Phase.RAM_DONE if self._ended else _Phase.ITERATING
        return self._out(out)

    def device_state(self, payload: bytes) -> bytes:
        """Our ``migrator-vcpus`` section (a NATIVE stream's only device section)."""
        self._require(_Phase.RAM_DONE, what="the device section")
        if self.kind is not StreamKind.NATIVE:
            raise LocalProtocolError(f"a {self.kind.value} stream carries no {w.VCPU_SECTION_IDSTR!r} section")
        if self._devices:
            raise LocalProtocolError(f"the {w.VCPU_SECTION_IDSTR!r} section was already sent")
        sid = self._next_id
        enc = self._enc
        out = (enc.section_full(sid, w.VCPU_SECTION_IDSTR, w.VCPU_SECTION_INSTANCE, w.VCPU_SECTION_VERSION)
               + enc.device_state(payload) + enc.section_footer(sid))
        self._new_id()
        self._devices += 1
        return self._out(out)

    def qemu_device(self, idstr: str, payload: bytes) -> bytes:
        """One of QEMU's ``-M none`` device sections (a QEMU_DEVICES stream)."""
        self._require(_Phase.RAM_DONE, what="a device section")
        if self.kind is not StreamKind.QEMU_DEVICES:
            raise LocalProtocolError(f"a {self.kind.value} stream carries no QEMU device sections")
        layout = KNOWN_SECTIONS.get(idstr)
        if layout is None:
            raise LocalProtocolError(f"no layout known for QEMU section {idstr!r}")
        sid = self._next_id
        enc = self._enc
        out = enc.section_full(sid, idstr, 0, layout.version) + enc.vmstate(payload) + enc.section_footer(sid)
        self._new_id()
        self._devices += 1
        return self._out(out)

    def eof(self) -> bytes:
        """EOF and QEMU's VM description of every section written.

        Raises:
            LocalProtocolError: the RAM END section is not closed yet, a NATIVE
                stream lacks its device section, or EOF was already sent.
        """
        self._require(_Phase.RAM_DONE, what="EOF")
        if self.kind is StreamKind.NATIVE and not self._devices:
            raise LocalProtocolError(f"a native stream needs its {w.VCPU_SECTION_IDSTR!r} section before EOF")
        out = self._enc.eof() + self._enc.vmdescription()
        self._phase = _Phase.EOF
        return self._out(out)

    @property
    def eof_sent(self) -> bool:
        return self._phase in (_Phase.EOF, _Phase.LOADED, _Phase.DECIDED)

    # -- the return path ------------------------------------------------------------
    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes read from the return path; ``b""``: the destination closed it."""
        if self.return_path is ReturnPath.NONE:
            raise LocalProtocolError("this stream has no return path")
        self._rp.receive_data(data)

    def next_event(self) -> Shut | Loaded | PeerClosed | Sentinel:
        """The destination's next message, :class:`PeerClosed` or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: a garbled message; a SHUT(0) before our EOF
                (nothing is loaded before the whole stream); a LOADED before
                EOF, twice, or for another byte count than was sent.
        """
        msg = self._rp.next_message()
        if not isinstance(msg, Message):
            return msg  # PeerClosed or NEED_DATA
        event = _message_event(msg)
        if isinstance(event, Shut):
            if event.status == 0 and not self.eof_sent:
                raise RemoteProtocolError("SHUT(0) before the end of the stream", self._rp.offset - 8)
            if self.eof_sent:
                self._phase = _Phase.DECIDED  # the destination has said its last word
            return event
        assert isinstance(event, Loaded)  # the decoder accepts nothing else
        if self._phase is not _Phase.EOF:
            raise RemoteProtocolError("LOADED before the end of the stream, twice or after SHUT", self._rp.offset - 12)
        if self.return_path is not ReturnPath.HANDOVER:
            return event  # a hand-over destination, and we do not hand over: the engine says so
        if event.stream_bytes != self.bytes_out:
            raise RemoteProtocolError(f"destination loaded {event.stream_bytes} stream bytes, "
                                      f"the source sent {self.bytes_out}", self._rp.offset - 12)
        self._loaded = event.stream_bytes
        self._phase = _Phase.LOADED
        return event

    def go(self) -> bytes:
        """``MIG_CMD_X_GO`` for the bytes the destination loaded: it owns the guest now."""
        self._require(_Phase.LOADED, what="GO")  # only reached with x-handover
        assert self._loaded is not None
        self._phase = _Phase.DECIDED
        return encode_go(self._loaded)

    def nogo(self) -> bytes:
        """``MIG_CMD_X_NOGO``, or ``b""`` when no destination could be waiting for
        our word (no hand-over, EOF not sent, or GO already sent)."""
        if self.return_path is not ReturnPath.HANDOVER or not self.eof_sent or self._phase is _Phase.DECIDED:
            return b""
        self._phase = _Phase.DECIDED
        return encode_nogo()


class DestinationSession:
    """The receiving end of one migration stream; no I/O.

    Feed it bytes (``receive_data``, or ``get_buffer`` + ``buffer_updated``)
    and take events from :meth:`next_event`: only payloads come out
    (:class:`RamMemSize`, :class:`RamPages`, :class:`RamZeroPages`,
    :class:`RamEOS`, :class:`DeviceState`, :class:`VMStateSection`), then
    :class:`EndOfStream` and, if the source sends one, :class:`VMDescription`;
    the structure (header, configuration, section order and ids) is checked
    here.  After :meth:`end_stream` the same calls carry the return path:
    :class:`GoAhead` / :class:`NoGo` or :class:`PeerClosed`.

    Args:
        channel: the address (or URI) the stream comes from.
        handover: this side's ``x-handover`` capability.
        max_block_bytes: the destination's RAM blocks (see :class:`StreamDecoder`).
        machine: our machine type name; the CONFIGURATION must name it.
    """

    def __init__(self, channel: Address | str, *, handover: bool = False,
                 max_block_bytes: Mapping[str, int] | None = None, machine: str = MACHINE_NAME,
                 page_size: int = w.TARGET_PAGE_SIZE) -> None:
        self._address = parse_uri(channel) if isinstance(channel, str) else channel
        self._handover = handover
        self._machine = machine
        self._dec = StreamDecoder(page_size=page_size, max_block_bytes=max_block_bytes)
        self._rp: MessageDecoder | None = None
        self._phase = _Phase.START
        self._device_idstrs: set[str] = set()
        self._native = False
        self._ending = False  # inside the ram END section
        self.stream_bytes = 0  #: the stream's length through its description (after end_stream)
        #: stream offset of the last DeviceState's payload
        self.device_state_offset: int | None = None

    # -- input ---------------------------------------------------------------------
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to read stream bytes into (see :meth:`StreamDecoder.get_buffer`)."""
        if self._rp is not None:
            raise LocalProtocolError("get_buffer() is for the stream; use receive_data() after end_stream()")
        return self._dec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self._rp is not None:
            raise LocalProtocolError("buffer_updated() is for the stream; use receive_data() after end_stream()")
        self._dec.buffer_updated(nbytes)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the source; ``b""`` means it closed the connection."""
        if self._rp is not None:
            self._rp.receive_data(data)
        else:
            self._dec.receive_data(data)

    @property
    def stream_offset(self) -> int:
        return self._dec.stream_offset

    # -- decisions -------------------------------------------------------------------
    @property
    def return_path(self) -> ReturnPath:
        """The decision table's answer, known once the stream ended (before, the
        stream kind is open: a socket counts as a SHUT return path)."""
        if self._phase in _BEFORE_EOF:
            return ReturnPath.SHUT if self._address.bidirectional else ReturnPath.NONE
        return decide_return_path(self.kind, self._address, handover=self._handover)

    @property
    def kind(self) -> StreamKind:
        if self._native:
            return StreamKind.NATIVE
        return StreamKind.QEMU_DEVICES if self._device_idstrs else StreamKind.RAM_ONLY

    # -- the stream -------------------------------------------------------------------
    def next_event(self) -> (RamMemSize | RamPages | RamZeroPages | RamEOS | DeviceState | VMStateSection
                             | EndOfStream | VMDescription | ConnectionClosed | GoAhead | NoGo | PeerClosed
                             | Sentinel):
        """The next payload or return-path event, or ``NEED_DATA``.

        Raises:
            RemoteProtocolError: bad bytes or a section out of order (with
                the stream offset); the session is dead after it.
        """
        if self._rp is not None:
            return self._next_message()
        while True:
            offset = self._dec.stream_offset
            event = self._dec.next_event()
            if isinstance(event, StreamHeader | SectionFooter):
                continue
            if isinstance(event, Configuration):
                if event.name != self._machine:  # QEMU's wording
                    raise RemoteProtocolError(f"Machine type received is '{event.name}' and local is "
                                              f"'{self._machine}'", offset)
                continue
            if isinstance(event, SectionStart):
                self._phase = _Phase.RAM
                continue
            if isinstance(event, SectionPart | SectionEnd):
                if self._phase is not _Phase.ITERATING:
                    raise RemoteProtocolError(f"section {event.section_id} continued while another is open", offset)
                self._phase = _Phase.RAM
                self._ending = isinstance(event, SectionEnd)
                continue
            if isinstance(event, RamEOS):
                self._phase = _Phase.RAM_DONE if self._ending else _Phase.ITERATING
                return event
            if isinstance(event, SectionFull):
                if self._phase is not _Phase.RAM_DONE:
                    raise RemoteProtocolError(f"device section {event.idstr!r} before the final RAM section", offset)
                if event.idstr in self._device_idstrs or (event.idstr == w.VCPU_SECTION_IDSTR and self._native):
                    raise RemoteProtocolError(f"section '{event.idstr}' {event.instance_id} appears twice", offset)
                if event.idstr == w.VCPU_SECTION_IDSTR:
                    self._native = True
                else:
                    self._device_idstrs.add(event.idstr)
                continue
            if isinstance(event, DeviceState):
                self.device_state_offset = self._dec.stream_offset - len(event.data)
                return event
            if isinstance(event, EndOfStream):
                if self._phase is not _Phase.RAM_DONE:
                    raise RemoteProtocolError("stream ended before the final RAM section", offset)
                self._phase = _Phase.EOF
                return event
            return event  # pages, VMStateSection, VMDescription, closed or NEED_DATA

    def end_stream(self) -> None:
        """The stream (through its VM description, if any) is over: what the
        decoder holds beyond it and every later byte is the return path."""
        if self._phase is not _Phase.EOF:
            raise LocalProtocolError(f"end_stream() before EOF (session phase {self._phase.value})")
        trailing, closed = self._dec.trailing_data
        self.stream_bytes = self._dec.stream_offset
        self._rp = MessageDecoder({MIG_CMD_X_GO, MIG_CMD_X_NOGO}, skip_vmdesc=True, base=self.stream_bytes)
        if trailing:
            self._rp.receive_data(trailing)
        if closed:
            self._rp.receive_data(b"")

    def _next_message(self) -> GoAhead | NoGo | PeerClosed | Sentinel:
        assert self._rp is not None
        msg = self._rp.next_message()
        if not isinstance(msg, Message):
            return msg  # PeerClosed or NEED_DATA
        event = _message_event(msg)
        assert isinstance(event, GoAhead | NoGo)
        if self._phase is not _Phase.LOADED:
            raise RemoteProtocolError("a go/no-go before this destination reported LOADED", self._rp.offset - 8)
        if isinstance(event, GoAhead) and event.stream_bytes != self.stream_bytes:
            raise RemoteProtocolError(f"go-ahead for {event.stream_bytes} stream bytes, "
                                      f"{self.stream_bytes} were received", self._rp.offset - 12)
        self._phase = _Phase.DECIDED
        return event

    # -- the return path ----------------------------------------------------------------
    def shut(self, status: int) -> bytes:
        """``MIG_RP_MSG_SHUT(status)``, or ``b""`` when nobody reads it.

        Raises:
            LocalProtocolError: SHUT(0) (loaded) before the stream's EOF.
        """
        if status == 0 and self._phase in _BEFORE_EOF:
            raise LocalProtocolError("SHUT(0) before the end of the stream: nothing is loaded yet")
        if self.return_path is ReturnPath.NONE and not (status and self._address.bidirectional):
            return b""  # a failure on a socket is always told: a native source may be reading
        return encode_shut(status)

    def loaded(self) -> bytes:
        """``MIG_RP_MSG_X_LOADED(stream bytes)``: loaded, paused, waiting for the source's word."""
        if self._rp is None or self.return_path is not ReturnPath.HANDOVER or self._phase is not _Phase.EOF:
            raise LocalProtocolError("LOADED is sent once, after end_stream(), with x-handover on a socket")
        self._phase = _Phase.LOADED
        return encode_loaded(self.stream_bytes)
