"""Migration URIs: QEMU's ``tcp:``, ``unix:`` and ``file:`` addresses and their parser.

Each address says whether it carries bytes both ways (``bidirectional``): a
return path needs that, and :func:`transport.decide_return_path` asks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .errors import BadURIError

__all__ = ["Address", "FileAddress", "TcpAddress", "UnixAddress", "parse_uri"]


@dataclass(frozen=True, slots=True)
class TcpAddress:
    host: str  #: "" = all addresses (listen side only)
    port: int

    #: a socket carries bytes both ways: QEMU's return path rides on it
    bidirectional: ClassVar[bool] = True

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    bidirectional: ClassVar[bool] = True

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True, slots=True)
class FileAddress:
    path: str
    offset: int = 0

    #: a file is written by one side and read later by the other: no return path
    bidirectional: ClassVar[bool] = False

    @property
    def uri(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


Address = TcpAddress | UnixAddress | FileAddress


def parse_uri(uri: str) -> Address:
    """Parse a QEMU migration URI.

    Raises:
        BadURIError: malformed, or a transport/option we do not support.
    """
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise BadURIError(uri, "expected 'tcp:HOST:PORT', 'unix:PATH' or 'file:PATH'")
    if scheme == "tcp":
        if "," in rest:
            raise BadURIError(uri, "tcp socket options are not supported")
        if rest.startswith("["):
            host, bracket, port_s = rest[1:].partition("]")
            if not bracket or not port_s.startswith(":"):
                raise BadURIError(uri, "IPv6 host must be written as [ADDR]:PORT")
            port_s = port_s[1:]
        else:
            host, colon, port_s = rest.rpartition(":")
            if not colon:
                raise BadURIError(uri, "missing ':PORT'")
            if ":" in host:
                raise BadURIError(uri, "IPv6 host must be written as [ADDR]:PORT")
        if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
            raise BadURIError(uri, f"port must be a number in 0..65535, not {port_s!r}")
        return TcpAddress(host, int(port_s))
    if scheme == "unix":
        if not rest:
            raise BadURIError(uri, "missing socket path")
        return UnixAddress(rest)
    if scheme == "file":
        path, _, opts = rest.partition(",")
        if not path:
            raise BadURIError(uri, "missing file path")
        offset = 0
        if opts:
            key, eq, value = opts.partition("=")
            if key != "offset" or not eq:
                raise BadURIError(uri, f"unsupported file option {opts!r} (only offset=N)")
            try:
                offset = int(value, 0)
            except ValueError:
                raise BadURIError(uri, f"offset must be an integer, not {value!r}") from None
            if offset < 0:
                raise BadURIError(uri, "offset must be >= 0")
        return FileAddress(path, offset)
    if scheme in ("exec", "fd", "rdma", "vsock", "channels"):
        raise BadURIError(uri, f"the {scheme!r} transport is not supported")
    raise BadURIError(uri, f"unknown transport {scheme!r}")
