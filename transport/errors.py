"""Errors raised by :mod:`transport`.

Hierarchy::

    TransportError                  root of everything this package raises
     +-- ProtocolError              the byte stream or its use breaks the format
     |    +-- RemoteProtocolError   the peer sent bad bytes (carries the stream offset)
     |    +-- LocalProtocolError    our caller misused the codec API
     +-- ChannelError (OSError)     a channel failed: refused, reset, closed file...
     +-- BadURIError (ValueError)   a migration URI we cannot parse or do not support

``ChannelError`` is also an ``OSError`` (with the original ``errno``) and
``BadURIError`` also a ``ValueError``, so callers that only know the standard
hierarchy still catch them.  The original exception is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BadURIError",
    "ChannelError",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
    "TransportError",
]


class TransportError(Exception):
    """Root of every error raised by :mod:`transport`."""


class ProtocolError(TransportError):
    """The migration stream format was violated (by the peer or by us)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid migration stream.

    Attributes:
        offset: byte offset in the stream of the record (or field) at fault.
        detail: the message without the offset suffix.
    """

    def __init__(self, detail: str, offset: int) -> None:
        super().__init__(f"{detail} (at stream offset {offset})")
        self.detail = detail
        self.offset = offset


class LocalProtocolError(ProtocolError):
    """The codec API was used in a way the format does not allow.

    The codec's state is unchanged when this is raised.
    """


class ChannelError(TransportError, OSError):
    """A channel operation failed (socket or file I/O).

    ``errno`` and ``strerror`` are those of the underlying ``OSError`` when
    there is one (``__cause__``).
    """


class BadURIError(TransportError, ValueError):
    """A migration URI is malformed or uses an unsupported transport."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(f"invalid migration URI {uri!r}: {reason}")
        self.uri = uri
        self.reason = reason
