"""The QMP connection, without I/O.

Theory of operation
-------------------

A :class:`QMPConnection` is the server side of one QMP session, as a plain
synchronous object in the style of h11: the I/O adapter (``_server.py``) feeds
it bytes with :meth:`~QMPConnection.receive_data` (``b""`` means EOF), pulls
protocol events with :meth:`~QMPConnection.next_event`, and turns messages
into bytes with :meth:`~QMPConnection.send`.  ("Event" here is h11's word for
"something that happened on the connection"; QMP's own asynchronous
notifications are the :class:`Event` *message* records.)

Facts from the QMP specification (docs/interop/qmp-spec.rst) and QEMU's
monitor (monitor/qmp.c, qapi/qmp-dispatch.c, qobject/json-streamer.c) that
this module encodes:

* Input is a *stream* of JSON values, not lines (spec section 2.1): qemu.qmp's
  ``QMPClient`` sends objects with no separator, and one ``recv`` may hold half
  a request or three.  QEMU's json-streamer delimits a value by counting
  braces and brackets at the token level; we do the same with a
  string-aware byte scanner (:class:`_JSONSplitter`) and hand each delimited
  value to ``json.JSONDecoder.raw_decode``.  A value that is not valid JSON
  gives one ``GenericError "JSON parse error, ..."`` reply (never with an
  ``id``) and the stream continues after it.  Limits, as in json-streamer.c:
  64 MiB per value ("JSON token size limit exceeded") and nesting 1024
  ("JSON nesting depth limit exceeded").
* Output is one JSON object per line; QEMU's monitor writes ``\\r\\n``.
  Clients (qemu.qmp) ``readline()``, so the terminator is mandatory.
* The greeting (spec 2.2) is ``{"QMP": {"version": VersionInfo,
  "capabilities": [...]}}``, where ``VersionInfo`` is exactly what
  ``query-version`` returns.  We offer no capabilities: QEMU offers ``oob``
  only on monitors with an I/O thread.
* After the greeting the session is in *capabilities negotiation* mode
  (spec 2.3 and 4): only ``qmp_capabilities`` exists; any other command gets
  ``CommandNotFound "Expecting capabilities negotiation with
  'qmp_capabilities'"`` and no events are delivered.  A second
  ``qmp_capabilities`` in command mode gets ``CommandNotFound "Capabilities
  negotiation is already complete, command ignored"``.
* A request (spec 2.3) is an object with ``execute`` (a string), optional
  ``arguments`` (an object) and optional ``id`` (any JSON value, echoed
  verbatim in the reply, including ``null``).  Any other member is refused
  (``exec-oob`` too, since OOB is not offered).  QEMU reads the ``id`` before
  checking the rest, so even a malformed request gets its ``id`` back; a
  non-object gets "QMP input must be a JSON object" without one.
* Events are ``{"event", "data"?, "timestamp": {"seconds", "microseconds"}}``
  (spec 2.5); ``data`` is omitted when the event has none.

Ordering rule the server relies on: a connection starts accepting events only
once the *reply* to ``qmp_capabilities`` has been passed to :meth:`send`.
qemu.qmp reads the negotiation reply with a bare ``recv`` and fails the
connection if an event arrives first.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from transport import Sentinel as _Sentinel

from ..errors import ErrorClass, LocalProtocolError

__all__ = [
    "CLOSED",
    "DEFAULT_VERSION",
    "MAX_MESSAGE_BYTES",
    "NEED_DATA",
    "NO_ID",
    "ConnectionState",
    "ErrorReply",
    "Event",
    "Greeting",
    "QMPConnection",
    "Request",
    "Return",
    "VersionInfo",
    "encode",
]


#: Returned by :meth:`QMPConnection.next_event` when more bytes are needed.
NEED_DATA: Final = _Sentinel("NEED_DATA")
#: Returned by :meth:`QMPConnection.next_event` once the peer's EOF was consumed.
CLOSED: Final = _Sentinel("CLOSED")
#: The ``id`` of a request that carried none (``None`` is a valid JSON id: ``null``).
NO_ID: Final = _Sentinel("NO_ID")

# Limits from QEMU's qobject/json-streamer.c (MAX_TOKEN_SIZE, MAX_NESTING).
MAX_MESSAGE_BYTES: Final = 64 << 20
MAX_NESTING: Final = 1024


# ---------------------------------------------------------------------------
# Message records


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """QEMU's ``VersionInfo``: the ``query-version`` reply and the greeting's ``version``."""

    major: int
    minor: int
    micro: int
    package: str = ""

    def to_qmp(self) -> dict[str, Any]:
        return {
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        }


#: The version we claim: QEMU 10.2.0's QMP, with our package string.
DEFAULT_VERSION: Final = VersionInfo(10, 2, 0, "migrator-0.1")


@dataclass(frozen=True, slots=True)
class Greeting:
    """The server's first message (spec 2.2)."""

    version: VersionInfo = DEFAULT_VERSION
    capabilities: tuple[str, ...] = ()

    def to_qmp(self) -> dict[str, Any]:
        return {"QMP": {"version": self.version.to_qmp(), "capabilities": list(self.capabilities)}}


@dataclass(frozen=True, slots=True)
class Request:
    """A well-formed command for the application to execute (spec 2.3).

    ``arguments`` is the raw JSON object (not yet validated against the
    command's schema).  ``id`` is the client's id of any JSON type, or
    :data:`NO_ID` when the request had none.
    """

    command: str
    arguments: Mapping[str, Any] = field(default_factory=dict)
    id: Any = NO_ID

    @property
    def has_id(self) -> bool:
        return self.id is not NO_ID

    def reply(self, value: Any = None) -> Return:
        """The success reply; ``None`` becomes ``{}`` as for QAPI commands without 'returns'."""
        return Return({} if value is None else value, self.id)

    def error(self, error_class: str, desc: str) -> ErrorReply:
        """The error reply, carrying this request's id."""
        return ErrorReply(str(error_class), desc, self.id)


@dataclass(frozen=True, slots=True)
class Return:
    """``{"return": value, "id"?}`` (spec 2.4.1)."""

    value: Any = field(default_factory=dict)
    id: Any = NO_ID

    def to_qmp(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"return": self.value}
        if self.id is not NO_ID:
            msg["id"] = self.id
        return msg


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """``{"error": {"class", "desc"}, "id"?}`` (spec 2.4.2)."""

    error_class: str
    desc: str
    id: Any = NO_ID

    def to_qmp(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"error": {"class": str(self.error_class), "desc": self.desc}}
        if self.id is not NO_ID:
            msg["id"] = self.id
        return msg


@dataclass(frozen=True, slots=True)
class Event:
    """An asynchronous QMP event (spec 2.5).  Use :meth:`now` to stamp it."""

    name: str
    data: Mapping[str, Any] | None = None
    seconds: int = 0
    microseconds: int = 0

    @classmethod
    def now(cls, name: str, data: Mapping[str, Any] | None = None) -> Event:
        """Stamp with the wall clock, as QEMU does (``g_get_real_time``)."""
        usec = time.time_ns() // 1000
        return cls(name, data, usec // 1_000_000, usec % 1_000_000)

    def to_qmp(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"event": self.name}
        if self.data is not None:
            msg["data"] = dict(self.data)
        msg["timestamp"] = {"seconds": self.seconds, "microseconds": self.microseconds}
        return msg


Reply = Return | ErrorReply
Message = Greeting | Return | ErrorReply | Event


def encode(message: Message) -> bytes:
    """One message as wire bytes: JSON text plus ``\\r\\n``.

    QEMU's JSON writer uses ", " and ": " separators and escapes non-ASCII;
    its monitor turns each "\\n" into "\\r\\n".  NaN and Infinity are not JSON.

    Raises:
        LocalProtocolError: the message holds something JSON cannot carry.
    """
    try:
        text = json.dumps(message.to_qmp(), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(message).__name__} as JSON: {exc}") from exc
    return text.encode("ascii") + b"\r\n"


# ---------------------------------------------------------------------------
# JSON stream splitting


@dataclass(frozen=True, slots=True)
class _Fault:
    """A value that could not be delimited or decoded: answer with GenericError."""

    desc: str


_NON_WS = re.compile(rb"[^ \t\r\n]")
_CONTAINER_SPECIAL = re.compile(rb'[{}\[\]"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_BARE_END = re.compile(rb'[ \t\r\n{}\[\]",:]')
_OPENERS = frozenset(b"{[")
_STRAY_STRUCTURAL = frozenset(b"}],:")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")


class _JSONSplitter:
    """Cut a byte stream into candidate JSON values without decoding them.

    Like QEMU's json-streamer, a value ends when the brackets opened since its
    first byte are balanced again; brackets inside strings do not count, and a
    backslash escapes the next byte.  A top-level scalar (``1``, ``true``, a
    bare word) ends at whitespace or a structural character; a top-level
    string ends at its closing quote.  Scanning resumes where it stopped, so
    feeding one byte at a time costs O(1) per byte, and consumed bytes are
    dropped once per :meth:`feed`, so a large pipelined batch is not copied
    once per value.

    All JSON structural characters are ASCII, and UTF-8 never uses ASCII bytes
    inside a multi-byte sequence, so scanning bytes is safe.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_NESTING) -> None:
        self._buf = bytearray()
        self._max_bytes = max_bytes
        self._max_depth = max_depth
        self._eof = False
        self._start = 0  # first byte of the current value (or where the next may begin)
        self._reset()

    def _reset(self) -> None:
        self._kind: str | None = None  # None | "container" | "string" | "bare"
        self._pos = self._start  # scan position
        self._depth = 0
        self._in_string = False
        self._dropped = 0  # bytes of an over-long value already discarded
        self._too_deep = False

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes held in memory (for tests of the size limit)."""
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        if not data:
            self._eof = True
            return
        if self._start:
            del self._buf[: self._start]
            self._pos -= self._start
            self._start = 0
        self._buf += data

    def next_value(self) -> bytes | _Fault | None:
        """The next delimited value, a fault, or None if more data is needed."""
        buf = self._buf
        if self._kind is None:
            m = _NON_WS.search(buf, self._start)
            if m is None:
                self._start = self._pos = len(buf)
                return None
            self._start = m.start()
            first = buf[self._start]
            if first in _OPENERS:
                self._kind, self._depth, self._pos = "container", 1, self._start + 1
            elif first == _QUOTE:
                self._kind, self._in_string, self._pos = "string", True, self._start + 1
            elif first in _STRAY_STRUCTURAL:
                # json-streamer hands the lone token to the parser, which wants a value.
                self._start = self._pos = self._start + 1
                return _Fault("JSON parse error, expecting value")
            else:
                self._kind, self._pos = "bare", self._start

        if self._kind == "bare":
            m = _BARE_END.search(buf, self._pos)
            if m is None and not self._eof:
                self._pos = len(buf)
                self._bound_memory()
                return None
            return self._take(len(buf) if m is None else m.start())

        while True:
            if self._in_string:
                m = _STRING_SPECIAL.search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    self._bound_memory()
                    return None
                at = m.start()
                if buf[at] == _BACKSLASH:
                    if at + 1 >= len(buf):  # the escaped byte has not arrived yet
                        self._pos = at
                        self._bound_memory()
                        return None
                    self._pos = at + 2
                    continue
                self._pos = at + 1
                self._in_string = False
                if self._kind == "string":
                    return self._take(self._pos)
                continue
            m = _CONTAINER_SPECIAL.search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                self._bound_memory()
                return None
            at = m.start()
            self._pos = at + 1
            ch = buf[at]
            if ch == _QUOTE:
                self._in_string = True
            elif ch in _OPENERS:
                self._depth += 1
                if self._depth > self._max_depth:
                    self._too_deep = True
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._take(self._pos)

    def _bound_memory(self) -> None:
        # Once a value is over the limit, keep scanning it to find its end but
        # let feed() drop what was scanned; it is reported when it ends.
        # Everything before the scan position has been scanned (a pending
        # backslash sits *at* the position, so it is kept).
        scanned = self._pos - self._start
        if self._dropped + scanned > self._max_bytes:
            self._dropped += scanned
            self._start = self._pos

    def _take(self, end: int) -> bytes | _Fault:
        size = self._dropped + end - self._start
        too_deep = self._too_deep
        value = bytes(self._buf[self._start : end])
        self._start = end
        self._reset()
        if size > self._max_bytes:
            return _Fault("JSON token size limit exceeded")
        if too_deep:
            return _Fault("JSON nesting depth limit exceeded")
        return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate key")
        obj[key] = value
    return obj


def _no_constants(name: str) -> Any:
    # Python accepts NaN/Infinity/-Infinity; JSON and QEMU do not.
    raise ValueError(f"invalid keyword '{name}'")


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
_KEYWORD = re.compile(r"[a-z]+")


def _decode(raw: bytes) -> Any | _Fault:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return _Fault("JSON parse error, invalid UTF-8 sequence in string")
    try:
        value, end = _DECODER.raw_decode(text)
    except RecursionError:
        return _Fault("JSON nesting depth limit exceeded")
    except json.JSONDecodeError as exc:
        if raw[:1] not in (b"{", b"[", b'"'):
            return _Fault(_describe_bare(text))
        msg = exc.msg
        return _Fault(f"JSON parse error, {msg[:1].lower()}{msg[1:]}")
    except ValueError as exc:  # from our hooks
        return _Fault(f"JSON parse error, {exc}")
    if end != len(text):
        return _Fault(_describe_bare(text))
    return value


def _describe_bare(text: str) -> str:
    shown = text if len(text) <= 64 else text[:64] + "..."
    if _KEYWORD.fullmatch(text):
        return f"JSON parse error, invalid keyword '{shown}'"
    return f"JSON parse error, stray '{shown}'"


# ---------------------------------------------------------------------------
# The connection


class ConnectionState(enum.Enum):
    """Where a QMP session is (QEMU: which command list ``mon->commands`` points to)."""

    GREETING = "greeting"  #: nothing sent yet; the greeting must go first
    NEGOTIATING = "negotiating"  #: capabilities negotiation mode
    READY = "ready"  #: command mode
    CLOSED = "closed"  #: the peer's EOF has been consumed


_QMP_CAPABILITIES = "qmp_capabilities"
_EXPECTING_NEGOTIATION = "Expecting capabilities negotiation with 'qmp_capabilities'"
_ALREADY_NEGOTIATED = "Capabilities negotiation is already complete, command ignored"
#: QEMU's QMPCapability enum.
_KNOWN_QMP_CAPABILITIES = ("oob",)


class QMPConnection:
    """The server side of one QMP session, without I/O.

    Usage, by the I/O adapter::

        conn = QMPConnection()
        write(conn.send(Greeting(version)))
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                conn.receive_data(await read())       # b"" at EOF
            elif ev is CLOSED:
                break
            elif isinstance(ev, Request):              # for the application
                write(conn.send(await execute(ev)))    # a Return or ErrorReply
            else:                                      # the connection's own answer
                write(conn.send(ev))

    Requests must be answered in order, each before the next
    :meth:`next_event` (QEMU without OOB runs one command per monitor at a
    time).  The connection itself answers what does not need the
    application: malformed input, the negotiation gate and
    ``qmp_capabilities``.  Those answers come out of :meth:`next_event` as
    ready-made :class:`Return` / :class:`ErrorReply` records.
    """

    def __init__(self, *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._splitter = _JSONSplitter(max_message_bytes)
        self._state = ConnectionState.GREETING
        self._offered: tuple[str, ...] = ()
        self._enabled: tuple[str, ...] = ()
        self._negotiation_reply: Return | None = None
        self._events_allowed = False

    # -- state -------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def accepts_events(self) -> bool:
        """True once the ``qmp_capabilities`` reply has been sent (see module docstring)."""
        return self._events_allowed

    @property
    def enabled_capabilities(self) -> tuple[str, ...]:
        """QMP capabilities the client enabled with ``qmp_capabilities``."""
        return self._enabled

    # -- input -------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` signals EOF.

        Raises:
            LocalProtocolError: data after EOF was already signalled.
        """
        if self._splitter.eof:
            raise LocalProtocolError("receive_data() called after EOF")
        self._splitter.feed(bytes(data))

    def next_event(self) -> Request | Return | ErrorReply | _Sentinel:
        """The next thing that happened on the connection.

        Returns:
            :class:`Request` for the application to execute and answer;
            :class:`Return` / :class:`ErrorReply` already decided by the
            connection, to be passed to :meth:`send` as is; :data:`NEED_DATA`;
            or :data:`CLOSED` once the peer's EOF is reached (a partial value
            pending at EOF is dropped, as QEMU resets its parser on close).

        Raises:
            LocalProtocolError: the greeting has not been sent yet.
        """
        if self._state is ConnectionState.GREETING:
            raise LocalProtocolError("the greeting must be sent before reading requests")
        if self._state is ConnectionState.CLOSED:
            return CLOSED
        chunk = self._splitter.next_value()
        if chunk is None:
            if self._splitter.eof:
                self._state = ConnectionState.CLOSED
                return CLOSED
            return NEED_DATA
        if isinstance(chunk, _Fault):
            return ErrorReply(ErrorClass.GENERIC_ERROR, chunk.desc)
        value = _decode(chunk)
        if isinstance(value, _Fault):
            return ErrorReply(ErrorClass.GENERIC_ERROR, value.desc)
        return self._check_request(value)

    def _check_request(self, obj: Any) -> Request | Return | ErrorReply:
        # Mirrors qmp_dispatch() + qmp_dispatch_check_obj() + monitor_qmp_dispatch().
        if not isinstance(obj, dict):
            return ErrorReply(ErrorClass.GENERIC_ERROR, "QMP input must be a JSON object")
        req_id = obj.get("id", NO_ID)

        def fail(desc: str, error_class: str = ErrorClass.GENERIC_ERROR) -> ErrorReply:
            return ErrorReply(error_class, desc, req_id)

        for key, value in obj.items():
            if key == "execute":
                if not isinstance(value, str):
                    return fail("QMP input member 'execute' must be a string")
            elif key == "arguments":
                if not isinstance(value, dict):
                    return fail("QMP input member 'arguments' must be an object")
            elif key != "id":
                return fail(f"QMP input member '{key}' is unexpected")
        if "execute" not in obj:
            return fail("QMP input lacks member 'execute'")
        command: str = obj["execute"]
        arguments: dict[str, Any] = obj.get("arguments", {})

        if command == _QMP_CAPABILITIES:
            return self._qmp_capabilities(arguments, req_id)
        if self._state is ConnectionState.NEGOTIATING:
            # Only qmp_capabilities exists in negotiation mode; QEMU rewrites the
            # CommandNotFound desc to point at it.
            return fail(_EXPECTING_NEGOTIATION, ErrorClass.COMMAND_NOT_FOUND)
        return Request(command, arguments, req_id)

    def _qmp_capabilities(self, arguments: dict[str, Any], req_id: Any) -> Return | ErrorReply:
        # Arguments are visited first ({'*enable': ['QMPCapability']}), then
        # qmp_qmp_capabilities() checks the mode, then qmp_caps_accept().
        def fail(desc: str, error_class: str = ErrorClass.GENERIC_ERROR) -> ErrorReply:
            return ErrorReply(error_class, desc, req_id)

        enable = arguments.get("enable", [])
        if "enable" in arguments:
            if not isinstance(enable, list):
                return fail("Invalid parameter type for 'enable', expected: array")
            for i, cap in enumerate(enable):
                if not isinstance(cap, str):
                    return fail(f"Invalid parameter type for 'enable[{i}]', expected: string")
                if cap not in _KNOWN_QMP_CAPABILITIES:
                    # QEMU names list elements "null" in enum errors (visit_type_enum
                    # gets name == NULL inside a list).
                    return fail(f"Parameter 'null' does not accept value '{cap}'")
        for key in arguments:
            if key != "enable":
                return fail(f"Parameter '{key}' is unexpected")
        if self._state is not ConnectionState.NEGOTIATING:
            return fail(_ALREADY_NEGOTIATED, ErrorClass.COMMAND_NOT_FOUND)
        unavailable = [cap for cap in enable if cap not in self._offered]
        if unavailable:
            return fail(f"Capability {', '.join(unavailable)} not available")
        self._enabled = tuple(dict.fromkeys(enable))
        self._state = ConnectionState.READY
        reply = Return({}, req_id)
        self._negotiation_reply = reply
        return reply

    # -- output ------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """Encode a message for the wire (one JSON object plus ``\\r\\n``).

        The first message must be the :class:`Greeting`.  An :class:`Event`
        encodes to ``b""`` until the session accepts events (QEMU skips
        monitors still negotiating), so callers may broadcast blindly.

        Raises:
            LocalProtocolError: out-of-order greeting, or a value that is not
                JSON-serialisable (nothing is emitted then).
        """
        if isinstance(message, Greeting):
            if self._state is not ConnectionState.GREETING:
                raise LocalProtocolError("the greeting was already sent")
            data = encode(message)
            self._offered = tuple(message.capabilities)
            self._state = ConnectionState.NEGOTIATING
            return data
        if self._state is ConnectionState.GREETING:
            raise LocalProtocolError("the greeting must be the first message")
        if isinstance(message, Event):
            if not self._events_allowed:
                return b""
            return encode(message)
        if not isinstance(message, (Return, ErrorReply)):
            raise LocalProtocolError(f"cannot send {type(message).__name__}")
        data = encode(message)
        if message is self._negotiation_reply:
            self._negotiation_reply = None
            self._events_allowed = True
        return data
