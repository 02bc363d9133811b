"""The return path and the hand-over messages, as a sans-IO codec.

QEMU's return path (migration/migration.c, ``migrate_send_rp_message`` and
``source_return_path_thread``) carries messages from the destination to the
source on the same socket as the stream: ``be16 type, be16 len, data[len]``.
The types and their lengths are QEMU's ``enum mig_rp_message_type`` and
``rp_cmd_args``; the only one this engine uses from QEMU is
``MIG_RP_MSG_SHUT`` (``be32`` status: 0 = the destination loaded the stream
and will not send anything more; non-zero = it failed).

Ours, used only when both sides set the ``x-handover`` capability (as QEMU
users set ``return-path`` on both sides), use the same framing with type
numbers far outside QEMU's range so a stock QEMU could never confuse them:

* ``MIG_RP_MSG_X_LOADED`` (destination -> source, ``be64`` stream bytes):
  the whole stream through EOF was received and validated, the state is
  loaded, the guest is paused and will run only on ``GO``.
* ``MIG_CMD_X_GO`` (source -> destination, after the stream's EOF, ``be64``
  stream bytes): the source has committed to never run the guest again; the
  destination owns it.
* ``MIG_CMD_X_NOGO`` (source -> destination, ``be32`` reason): the source
  keeps the guest (it resumes); the destination must never run it.

The codec is I/O free: :class:`MessageDecoder` takes bytes
(``receive_data``; ``b""`` is EOF) and returns :class:`Message` objects or
``NEED_DATA``; the ``encode_*`` functions return bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from ._events import NEED_DATA, Sentinel
from ._wire import QEMU_VM_VMDESCRIPTION
from .errors import RemoteProtocolError

__all__ = [
    "MIG_CMD_X_GO",
    "MIG_CMD_X_NOGO",
    "MIG_RP_MSG_SHUT",
    "MIG_RP_MSG_X_LOADED",
    "Message",
    "MessageDecoder",
    "PeerClosed",
    "encode_go",
    "encode_loaded",
    "encode_nogo",
    "encode_shut",
]

# QEMU's enum mig_rp_message_type (migration/migration.h), values as in QEMU.
MIG_RP_MSG_INVALID: Final = 0
MIG_RP_MSG_SHUT: Final = 1
MIG_RP_MSG_PONG: Final = 2
MIG_RP_MSG_REQ_PAGES_ID: Final = 3
MIG_RP_MSG_REQ_PAGES: Final = 4
MIG_RP_MSG_RECV_BITMAP: Final = 5
MIG_RP_MSG_RESUME_ACK: Final = 6
MIG_RP_MSG_SWITCHOVER_ACK: Final = 7

# Ours (capability x-handover only): 'M' 'G' + n, far above MIG_RP_MSG_MAX.
MIG_RP_MSG_X_LOADED: Final = 0x4D01
MIG_CMD_X_GO: Final = 0x4D02
MIG_CMD_X_NOGO: Final = 0x4D03

#: payload length of every fixed-size message type (QEMU's rp_cmd_args.len)
MESSAGE_LENGTHS: Final[dict[int, int]] = {
    MIG_RP_MSG_SHUT: 4,
    MIG_RP_MSG_PONG: 4,
    MIG_RP_MSG_REQ_PAGES: 12,
    MIG_RP_MSG_RESUME_ACK: 4,
    MIG_RP_MSG_SWITCHOVER_ACK: 0,
    MIG_RP_MSG_X_LOADED: 8,
    MIG_CMD_X_GO: 8,
    MIG_CMD_X_NOGO: 4,
}

_HDR = struct.Struct(">HH")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Message:
    """One message: its type and its value (status, byte count or reason)."""

    type: int
    value: int


@dataclass(frozen=True, slots=True)
class PeerClosed:
    """The peer closed its direction before another whole message arrived."""

    partial: int  # bytes of an unfinished message that were received


def _encode(mtype: int, payload: bytes) -> bytes:
    return _HDR.pack(mtype, len(payload)) + payload


def encode_shut(status: int) -> bytes:
    """``MIG_RP_MSG_SHUT`` exactly as QEMU's ``migrate_send_rp_shut``."""
    return _encode(MIG_RP_MSG_SHUT, _BE32.pack(status))


def encode_loaded(stream_bytes: int) -> bytes:
    return _encode(MIG_RP_MSG_X_LOADED, _BE64.pack(stream_bytes))


def encode_go(stream_bytes: int) -> bytes:
    return _encode(MIG_CMD_X_GO, _BE64.pack(stream_bytes))


def encode_nogo(reason: int = 1) -> bytes:
    return _encode(MIG_CMD_X_NOGO, _BE32.pack(reason))


class MessageDecoder:
    """Parses the messages of one direction.

    Args:
        accept: the message types this side may receive; anything else is a
            :class:`RemoteProtocolError` worded as QEMU's return-path thread
            words it ("Received invalid message 0x%04x length 0x%04x").
        skip_vmdesc: the direction is the stream's, after its EOF: one
            QEMU_VM_VMDESCRIPTION record (``0x06``, ``be32`` length, JSON) may
            come first and is skipped.  Our type numbers never start with
            byte 0x06, so the two cannot be confused.
        base: stream offset of the first byte fed (for error offsets).
    """

    def __init__(self, accept: frozenset[int] | set[int], *, skip_vmdesc: bool = False,
                 base: int = 0, max_vmdesc: int = 16 << 20) -> None:
        unknown = set(accept) - set(MESSAGE_LENGTHS)
        if unknown:
            raise ValueError(f"no fixed length known for message types {sorted(unknown)}")
        self._accept = frozenset(accept)
        self._buf = bytearray()
        self._pos = base  # stream offset of _buf[0]
        self._eof = False
        self._maybe_vmdesc = skip_vmdesc
        self._max_vmdesc = max_vmdesc
        self._error: RemoteProtocolError | None = None

    @property
    def offset(self) -> int:
        """Stream offset of the first byte not yet parsed."""
        return self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof and data:
            raise ValueError("data after EOF")
        if not data:
            self._eof = True
        self._buf += data

    def next_message(self) -> Message | PeerClosed | Sentinel:
        """A :class:`Message`, :class:`PeerClosed` or ``NEED_DATA``."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _next(self) -> Message | PeerClosed | Sentinel:
        buf = self._buf
        if self._maybe_vmdesc and buf:
            if buf[0] == QEMU_VM_VMDESCRIPTION:
                if len(buf) < 5:
                    return self._need()
                (length,) = _BE32.unpack_from(buf, 1)
                if length > self._max_vmdesc:
                    raise RemoteProtocolError(f"VM description length {length} exceeds {self._max_vmdesc}",
                                              self._pos + 1)
                if len(buf) < 5 + length:
                    return self._need()
                self._consume(5 + length)
            self._maybe_vmdesc = False
        if len(buf) < _HDR.size:
            return self._need()
        mtype, length = _HDR.unpack_from(buf)
        if mtype not in self._accept or MESSAGE_LENGTHS[mtype] != length:
            raise RemoteProtocolError(f"Received invalid message 0x{mtype:04x} length 0x{length:04x}", self._pos)
        if len(buf) < _HDR.size + length:
            return self._need()
        payload = bytes(buf[_HDR.size:_HDR.size + length])
        self._consume(_HDR.size + length)
        if length == 8:
            (value,) = _BE64.unpack(payload)
        elif length == 4:
            (value,) = _BE32.unpack(payload)
        else:
            value = 0
        return Message(mtype, value)

    def _need(self) -> PeerClosed | Sentinel:
        return PeerClosed(len(self._buf)) if self._eof else NEED_DATA
