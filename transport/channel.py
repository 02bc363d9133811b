"""trio channels that carry the migration stream: ``tcp:``, ``unix:``, ``file:``.

The channel only moves bytes; the codec objects (no I/O) do the rest.  The
receive side reads straight into the decoder's buffer (``recv_into`` of
``decoder.get_buffer()``), so page data is copied once on its way from the
kernel to guest RAM (the consumer's scatter).

Facts that shaped this module (measured on the project's 2-core machines,
see python-stack.md section 5):

* ``trio.socket`` ``send``/``recv_into`` on MiB-sized buffers runs close to a
  blocking socket; ``SocketStream.receive_some`` allocates per call and is
  2-3x slower on unix sockets, so it is not used for page data.
* Non-blocking ``sendmsg`` often sends only part of the iovec list (thousands
  of times per GiB on unix sockets with default buffers): the list is trimmed
  and the call repeated.  A 4 MiB ``SO_SNDBUF``/``SO_RCVBUF`` makes partial
  sends rare and gains 10-25 %.
* On TCP the writer was woken for every ~150 KiB of freed send buffer (about
  6000 partial ``sendmsg`` per GiB here), and each wake-up costs a trip
  through trio's scheduler: the sender burnt 0.25-0.3 CPU-s/GB against 0.1
  for a blocking ``sendall``.  ``TCP_NOTSENT_LOWAT`` = 4 MiB (writable only
  when less than half of it is still unsent) cuts that to ~100-200 partial
  sends and 0.15 CPU-s/GB.  Unix sockets need no such help.
* The TCP reader had the mirror problem: woken for every few hundred KiB
  that arrived (~470 reads per GiB, each a trip through the scheduler, the
  decoder and the scatter).  ``SO_RCVLOWAT`` = 1 MiB on the accepted socket
  makes epoll report it readable only once 1 MiB is queued (or the peer
  closed, or the receive window is nearly shut): ~270 reads per GiB.  A
  pause or the end of the stream can leave less than that queued for good,
  so a read that waited ``RCVLOWAT_WAIT_S`` (2 ms) drops the mark to 1 byte
  for one read.  A non-blocking read never waits for the mark, so nothing
  that arrived is held back by more than those 2 ms.  Unix sockets ignore
  the mark in poll (any queued byte makes them readable) and batch well
  without it.
* trio has no unix listener helper, so the listening socket is bound by hand.
  Like QEMU, a stale socket file at the path is unlinked before binding.

URIs follow QEMU's ``migrate``/``-incoming`` syntax: ``tcp:HOST:PORT``
(``tcp:[::1]:PORT`` for IPv6; an empty host listens on all addresses),
``unix:PATH``, ``file:PATH[,offset=N]`` (QEMU >= 8.2).  ``exec:``, ``fd:``,
``rdma:`` and socket options (``,ipv4`` ...) are not supported.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket as _stdsocket
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ._address import Address, FileAddress, TcpAddress, UnixAddress, parse_uri
from ._events import NEED_DATA
from .errors import BadURIError, ChannelError

if TYPE_CHECKING:
    from ._decoder import ConnectionClosed, StreamDecoder
    from ._events import Event

__all__ = [
    "Address",
    "Channel",
    "ChannelListener",
    "FileAddress",
    "TcpAddress",
    "UnixAddress",
    "listen_channel",
    "open_channel",
    "parse_uri",
    "serve_once",
]

SOCKET_BUFFER_BYTES = 4 << 20
TCP_NOTSENT_LOWAT_BYTES = 4 << 20
_TCP_NOTSENT_LOWAT = getattr(_stdsocket, "TCP_NOTSENT_LOWAT", 25)  # linux/tcp.h
RECV_CHUNK_BYTES = 4 << 20
TCP_RCVLOWAT_BYTES = 1 << 20
RCVLOWAT_WAIT_S = 0.002
FILE_CHUNK_BYTES = 8 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024




@contextlib.contextmanager
def _translate(what: str) -> Iterator[None]:
    """Turn OSError into ChannelError (keeping errno); never touch Cancelled."""
    try:
        yield
    except ChannelError:
        raise
    except OSError as exc:
        code, detail = exc.errno, exc.strerror or str(exc)
        if code is None:  # trio.open_tcp_stream: the per-address errors are the cause
            inner = _first_oserror(exc.__cause__)
            if inner is not None:
                code, detail = inner.errno, f"{detail}: {inner.strerror or inner}"
        raise ChannelError(code if code is not None else errno.EIO, f"{what}: {detail}") from exc
    except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
        raise ChannelError(errno.EPIPE, f"{what}: {exc}") from exc


def _first_oserror(exc: BaseException | None) -> OSError | None:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            if (found := _first_oserror(sub)) is not None:
                return found
        return None
    return exc if isinstance(exc, OSError) and exc.errno is not None else None


def _advance(views: list[memoryview], i: int, nbytes: int) -> int:
    """Skip ``nbytes`` written from ``views[i:]`` (a partial vectored write):
    drop the fully written views, trim a partly written one in place; return
    the index of the first view with bytes left."""
    while nbytes:
        v = views[i]
        if nbytes >= v.nbytes:
            nbytes -= v.nbytes
            i += 1
        else:
            views[i] = v[nbytes:]
            nbytes = 0
    return i


def _as_bytes_views(buffers: Sequence[Any]) -> list[memoryview]:
    views = []
    for b in buffers:
        mv = memoryview(b)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        if mv.nbytes:
            views.append(mv)
    return views


# -- channels ----------------------------------------------------------------
class BufferedReceiver(Protocol):
    """What :meth:`Channel.receive_into` reads into: a :class:`StreamDecoder`
    or a :class:`DestinationSession` (asyncio's ``BufferedProtocol`` shape)."""

    def get_buffer(self, sizehint: int = -1) -> memoryview: ...

    def buffer_updated(self, nbytes: int) -> None: ...

    def receive_data(self, data: bytes | bytearray | memoryview) -> None: ...


class Channel(ABC):
    """One end of a migration stream.

    Attributes:
        bytes_sent, bytes_received: totals moved through this channel.
        has_return_path: whether the other end can talk back (sockets yes,
            files no), as QEMU's return path.
    """

    has_return_path: bool = False

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0

    @abstractmethod
    async def send_all(self, buffers: Sequence[Any]) -> None:
        """Write every byte of ``buffers`` (bytes-like objects), in order.

        The buffers must stay unchanged until this returns (the encoder's
        staging buffers do, until its next ``ram_pages`` call).

        Raises:
            ChannelError: the write failed; how much was written is unknown.

        If cancelled, part of the buffers may have been written: the stream is
        then unusable and the channel should be closed.
        """

    @abstractmethod
    async def receive_into(self, decoder: BufferedReceiver, sizehint: int = RECV_CHUNK_BYTES) -> int:
        """Read once into ``decoder``'s buffer; at end of stream report EOF to it.

        Returns:
            The byte count (0 at end of stream, after ``receive_data(b"")``).
        """

    async def receive_some(self, max_bytes: int) -> bytes:
        """Read up to ``max_bytes`` (return path); ``b""`` at end of stream."""
        raise ChannelError(errno.EOPNOTSUPP, "this channel has no return path")

    async def send_eof(self) -> None:  # noqa: B027 - optional hook
        """Tell the peer nothing more will be sent (sockets: shutdown SHUT_WR)."""

    @abstractmethod
    async def aclose(self) -> None:
        """Close the channel (idempotent)."""

    async def next_event(self, decoder: StreamDecoder) -> Event | ConnectionClosed:
        """Return the decoder's next event, receiving as needed.

        Raises:
            RemoteProtocolError: from the decoder (including truncation).
            ChannelError: from the channel.
        """
        while True:
            event = decoder.next_event()
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            await self.receive_into(decoder)

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class SocketChannel(Channel):
    """A connected stream socket (tcp or unix)."""

    has_return_path = True

    def __init__(self, sock: trio.socket.SocketType, peer: str, *, rcvlowat: int = 0) -> None:
        super().__init__()
        self._sock = sock
        self._rcvlowat = 0
        if rcvlowat:
            with contextlib.suppress(OSError):
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, rcvlowat)
                self._rcvlowat = rcvlowat
        self.peer = peer
        self._closed = False
        self.partial_sends = 0  #: sendmsg calls that sent only part of their iovecs

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelError(errno.EBADF, f"channel to {self.peer} is closed")

    async def send_all(self, buffers: Sequence[Any]) -> None:
        self._check_open()
        views = _as_bytes_views(buffers)
        if not views:
            await trio.lowlevel.checkpoint()
            return
        i = 0
        with _translate(f"send to {self.peer}"):
            while i < len(views):
                batch = views[i : i + _IOV_MAX]
                sent = await self._sock.sendmsg(batch)
                self.bytes_sent += sent
                if sent < sum(v.nbytes for v in batch):
                    self.partial_sends += 1
                i = _advance(views, i, sent)

    async def receive_into(self, decoder: BufferedReceiver, sizehint: int = RECV_CHUNK_BYTES) -> int:
        self._check_open()
        view = decoder.get_buffer(sizehint)
        with _translate(f"receive from {self.peer}"):
            if self._rcvlowat:
                n = await self._recv_lowat(view)
            else:
                n = await self._sock.recv_into(view)
        if n:
            decoder.buffer_updated(n)
            self.bytes_received += n
        else:
            decoder.receive_data(b"")
        return n

    async def _recv_lowat(self, view: memoryview) -> int:
        with trio.move_on_after(RCVLOWAT_WAIT_S):
            return await self._sock.recv_into(view)
        # Less than the low-water mark arrived in time (a pause in the
        # stream, or its end): take whatever is (or next becomes) there.
        self._sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, 1)
        try:
            return await self._sock.recv_into(view)
        finally:
            with contextlib.suppress(OSError):  # closed meanwhile: never mask the real outcome
                self._sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, self._rcvlowat)

    async def receive_some(self, max_bytes: int) -> bytes:
        self._check_open()
        if self._rcvlowat:
            # Message-sized reads (the return path, the hand-over after the
            # stream's EOF): a low-water mark would hide a 12-byte message
            # from poll() forever.  The stream is over: drop it for good.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, 1)
            self._rcvlowat = 0
        with _translate(f"receive from {self.peer}"):
            data = await self._sock.recv(max_bytes)
        self.bytes_received += len(data)
        return data

    async def peek(self, nbytes: int) -> bytes:
        """Wait for and return the first ``nbytes`` without consuming them
        (QEMU >= 8.0 tells the main channel from multifd ones this way)."""
        self._check_open()
        with _translate(f"receive from {self.peer}"):
            if self._rcvlowat:  # the mark would hold a short first message back
                self._sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, 1)
            try:
                while True:
                    data = await self._sock.recv(nbytes, _stdsocket.MSG_PEEK)
                    if len(data) >= nbytes or not data:
                        return data
                    await trio.sleep(0.001)  # fewer bytes queued than asked: look again shortly
            finally:
                if self._rcvlowat:
                    with contextlib.suppress(OSError):
                        self._sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, self._rcvlowat)

    def detach_blocking(self) -> _stdsocket.socket:
        """Hand the connection over as a blocking stdlib socket (for a worker
        thread); this channel is closed afterwards."""
        self._check_open()
        self._closed = True
        sock = _stdsocket.socket(fileno=self._sock.detach())
        sock.setblocking(True)
        if self._rcvlowat:  # blocking reads of whole messages need no mark
            with contextlib.suppress(OSError):
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_RCVLOWAT, 1)
        return sock

    async def send_eof(self) -> None:
        self._check_open()
        with _translate(f"shutdown to {self.peer}"):
            self._sock.shutdown(_stdsocket.SHUT_WR)
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._sock.close()
        await trio.lowlevel.checkpoint()


class FileChannel(Channel):
    """A regular file, written by the source or read by the destination.

    File I/O is blocking, so each call runs in a worker thread
    (``trio.to_thread.run_sync``) on large chunks.
    """

    has_return_path = False

    def __init__(self, fd: int, path: str, *, writable: bool) -> None:
        super().__init__()
        self._fd = fd
        self.path = path
        self._writable = writable
        self._closed = False

    def _check_open(self, write: bool) -> None:
        if self._closed:
            raise ChannelError(errno.EBADF, f"file channel {self.path} is closed")
        if write != self._writable:
            raise ChannelError(errno.EBADF, f"file channel {self.path} is {'write' if self._writable else 'read'}-only")

    async def send_all(self, buffers: Sequence[Any]) -> None:
        self._check_open(write=True)
        views = _as_bytes_views(buffers)
        if not views:
            await trio.lowlevel.checkpoint()
            return
        with _translate(f"write to {self.path}"):
            self.bytes_sent += await trio.to_thread.run_sync(self._writev_all, views)

    def _writev_all(self, views: list[memoryview]) -> int:
        total = 0
        i = 0
        while i < len(views):
            n = os.writev(self._fd, views[i : i + _IOV_MAX])
            total += n
            i = _advance(views, i, n)
        return total

    async def receive_into(self, decoder: BufferedReceiver, sizehint: int = FILE_CHUNK_BYTES) -> int:
        self._check_open(write=False)
        view = decoder.get_buffer(sizehint)
        with _translate(f"read from {self.path}"):
            n = await trio.to_thread.run_sync(os.readv, self._fd, [view])
        if n:
            decoder.buffer_updated(n)
            self.bytes_received += n
        else:
            decoder.receive_data(b"")
        return n

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            with _translate(f"close {self.path}"):
                os.close(self._fd)
        await trio.lowlevel.checkpoint()


# -- opening -----------------------------------------------------------------
def _set_buffers(sock: trio.socket.SocketType) -> None:
    for opt in (_stdsocket.SO_SNDBUF, _stdsocket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(_stdsocket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


async def open_channel(uri: str) -> Channel:
    """Open the source side of a migration stream (QEMU's ``migrate URI``).

    ``tcp:``/``unix:`` connect; ``file:`` creates or truncates the file and
    writes from ``offset``.

    Raises:
        BadURIError: the URI is invalid or unsupported.
        ChannelError: connecting or opening failed.
    """
    addr = parse_uri(uri)
    if isinstance(addr, FileAddress):
        with _translate(f"open {addr.path}"):
            fd = await trio.to_thread.run_sync(os.open, addr.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            if addr.offset:
                os.lseek(fd, addr.offset, os.SEEK_SET)
        return FileChannel(fd, addr.path, writable=True)
    if isinstance(addr, TcpAddress):
        if not addr.host:
            raise BadURIError(uri, "a host is required to connect")
        with _translate(f"connect to {addr.uri}"):
            stream = await trio.open_tcp_stream(addr.host, addr.port)
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(_stdsocket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, TCP_NOTSENT_LOWAT_BYTES)
    else:
        with _translate(f"connect to {addr.uri}"):
            stream = await trio.open_unix_socket(addr.path)
    sock = stream.socket
    _set_buffers(sock)
    return SocketChannel(sock, addr.uri)


class ChannelListener:
    """A bound, listening endpoint that accepts ONE incoming stream.

    Create with :func:`listen_channel`.  ``uri`` is the bound address (with
    the real port for ``tcp:HOST:0``).  Use as an async context manager.
    """

    def __init__(self, addr: Address, sock: trio.socket.SocketType | None, uri: str) -> None:
        self._addr = addr
        self._sock = sock
        self.uri = uri
        self._closed = False

    async def accept(self, *, keep_listening: bool = False) -> Channel:
        """Wait for the one incoming stream, then stop listening (unless
        ``keep_listening``: multifd accepts its channels on the same socket).

        Raises:
            ChannelError: accepting (or opening the file) failed.
        """
        if self._closed:
            raise ChannelError(errno.EBADF, f"listener {self.uri} is closed")
        addr = self._addr
        if isinstance(addr, FileAddress):
            with _translate(f"open {addr.path}"):
                fd = await trio.to_thread.run_sync(os.open, addr.path, os.O_RDONLY)
                if addr.offset:
                    os.lseek(fd, addr.offset, os.SEEK_SET)
            await self.aclose()
            return FileChannel(fd, addr.path, writable=False)
        assert self._sock is not None
        with _translate(f"accept on {self.uri}"):
            conn, peer = await self._sock.accept()
        if not keep_listening:
            await self.aclose()
        _set_buffers(conn)
        if isinstance(addr, TcpAddress):
            conn.setsockopt(_stdsocket.IPPROTO_TCP, _stdsocket.TCP_NODELAY, 1)
            return SocketChannel(conn, f"{self.uri} <- {peer or 'peer'}", rcvlowat=TCP_RCVLOWAT_BYTES)
        return SocketChannel(conn, f"{self.uri} <- {peer or 'peer'}")

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                if isinstance(self._addr, UnixAddress):
                    with contextlib.suppress(OSError):
                        os.unlink(self._addr.path)
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> ChannelListener:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def listen_channel(uri: str) -> ChannelListener:
    """Bind the destination side of a stream (QEMU's ``-incoming URI``).

    ``tcp:``/``unix:`` bind and listen now; ``file:`` only checks the file
    exists (it is opened by ``accept``).

    Raises:
        BadURIError: the URI is invalid or unsupported.
        ChannelError: binding failed (address in use, no such file...).
    """
    addr = parse_uri(uri)
    if isinstance(addr, FileAddress):
        with _translate(f"open {addr.path}"):
            st = await trio.Path(addr.path).stat()
        if not stat.S_ISREG(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
            raise ChannelError(errno.EINVAL, f"{addr.path} is not a regular file")
        return ChannelListener(addr, None, addr.uri)
    if isinstance(addr, TcpAddress):
        with _translate(f"resolve {addr.uri}"):
            infos = await trio.socket.getaddrinfo(
                addr.host or None, addr.port, type=_stdsocket.SOCK_STREAM, flags=_stdsocket.AI_PASSIVE
            )
        family, type_, proto, _, sockaddr = infos[0]
        sock = trio.socket.socket(family, type_, proto)
        with _translate(f"listen on {addr.uri}"):
            try:
                sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
                _set_buffers(sock)  # before listen: accepted sockets inherit, window scaling sees it
                await sock.bind(sockaddr)
                sock.listen(16)
            except BaseException:
                sock.close()
                raise
        host, port = sock.getsockname()[:2]
        bound = TcpAddress(addr.host if addr.host else host, port)
        return ChannelListener(addr, sock, bound.uri)
    sock = trio.socket.socket(_stdsocket.AF_UNIX, _stdsocket.SOCK_STREAM)
    with _translate(f"listen on {addr.uri}"):
        try:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(addr.path).st_mode):
                    os.unlink(addr.path)  # QEMU unlinks a stale socket before bind
            _set_buffers(sock)
            await sock.bind(addr.path)
            sock.listen(16)
        except BaseException:
            sock.close()
            raise
    return ChannelListener(addr, sock, addr.uri)


async def serve_once(uri: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> Channel:
    """Listen on ``uri``, report the bound URI via ``task_status``, accept one stream.

    For ``nursery.start`` users that need the bound address before a peer
    connects; returns the accepted channel (when awaited directly).
    """
    listener = await listen_channel(uri)
    async with listener:
        task_status.started(listener.uri)
        return await listener.accept()
