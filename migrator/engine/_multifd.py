"""multifd channel workers: QEMU 7.2's extra page channels (wire format in transport._multifd).

Threads and the GIL
-------------------
Each channel is a blocking stdlib socket driven by one trio task that hands
every packet to ``trio.to_thread.run_sync``, so N channels move data on up
to N cores at once.  Per packet the work is, and the GIL is released in:

* ``socket.sendmsg`` / ``socket.recvmsg_into`` (the kernel copy, the bulk
  of the work with compression ``none``): released for the whole syscall;
* zstd ``compress`` / ``decompress`` (python-zstandard's C backend):
  released while the compressor runs;
* the gather of a packet's pages for zstd (``np.take`` into a contiguous
  512 KiB buffer) and the scatter of decompressed pages into guest RAM
  (numpy slice assignment): numpy releases the GIL inside copy loops of
  plain dtypes;
* building the iovec list and parsing the header hold it (a few us per
  512 KiB packet: per run of consecutive pages, never per page).

With compression ``none`` no page is copied in user space at all: the
sender's iovecs point into guest RAM (runs of consecutive pages), and the
receiver's ``recvmsg_into`` iovecs are numpy views of the destination's
guest RAM at the offsets the header named, so the kernel writes the pages
straight into place.

Ordering rules (each one loses or corrupts a page if broken)
------------------------------------------------------------
1. *Bit cleared before the read.*  The main task test-and-clears a page's
   bmap bit (``RAMSaveState.next_batch``) before queueing it; the channel
   thread reads the page later.  A write after the clear is logged (the
   chunk was re-protected before the batch was handed out), so a page read
   late carries that write *and* is sent again later: never lost.
2. *At most one copy of a page between two SYNCs.*  Channels are not
   ordered with each other, so a page must not be queued twice before the
   next SYNC.  A page is queued only when its bmap bit is taken, and bits
   are set again only by a dirty-bitmap sync; the engine syncs only between
   RAM sections (QEMU's ``migration_iteration_run`` too), and every section
   ends with a multifd SYNC, so each page is queued at most once per
   section.  A bitmap sync inside a section would break this (QEMU 8.0+,
   which flushes once per round instead, flushes when the cursor wraps for
   the same reason).
3. *SYNC after the pages.*  A channel writes its SYNC packet only after
   every packet queued to it before; the main channel's EOS is written only
   after every channel wrote its SYNC.  The receiver at that EOS waits for
   every channel's SYNC and holds each channel there until the main channel
   reached the EOS; so a ZERO record on the main channel and a multifd copy
   of the same page are always applied in stream order.
4. *Receiver marks what it wrote.*  Pages written through a channel are
   marked in ``RAMLoadState.written`` so a later ZERO record for them is
   not skipped as "still fresh".
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import trio

from transport import ProtocolError, RemoteProtocolError
from transport import _multifd as mf
from transport import _wire as w
from transport.channel import SocketChannel, _advance  # the shared partial-iovec helper
from transport.errors import ChannelError

from ..errors import MigrationError

if TYPE_CHECKING:
    import zstandard

    from transport import Channel, ChannelListener

    from ._ram import RAMLoadState

__all__ = ["MultifdReceiver", "MultifdSender", "accept_channels", "connect_channels"]

_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
#: packets per worker-thread call on the sending side (8 x 512 KiB)
JOB_PACKETS = 8
#: packets a receiving worker reads per thread call at most (it returns
#: earlier at a SYNC packet or at EOF)
RECV_PACKETS = 64
SOCKET_BUFFER_BYTES = 4 << 20


def _runs(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) positions of runs of consecutive pages in ``idx``."""
    if idx.size == 0:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [idx.size]))


def _page_views(pages: np.ndarray, idx: np.ndarray) -> list[memoryview]:
    """Views of guest RAM for ``idx`` (ascending), one per run of consecutive pages."""
    starts, ends = _runs(idx)
    return [w.byte_view(pages[idx[a]:idx[a] + (b - a)]).cast("B")
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]


def _sendmsg_all(sock: socket.socket, views: list[memoryview]) -> int:
    total = 0
    i = 0
    while i < len(views):
        n = sock.sendmsg(views[i:i + _IOV_MAX])
        total += n
        i = _advance(views, i, n)
    return total


def _recv_exact_into(sock: socket.socket, views: list[memoryview]) -> int:
    """Fill every view (recvmsg_into); returns bytes read, < total only at EOF."""
    total = 0
    i = 0
    while i < len(views):
        n = sock.recvmsg_into(views[i:i + _IOV_MAX])[0]
        if n == 0:
            return total
        total += n
        i = _advance(views, i, n)
    return total


def _set_buffers(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER_BYTES)


def _compressor(compression: str, level: int) -> zstandard.ZstdCompressionObj | None:
    if compression == "none":
        return None
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=level).compressobj()
    raise MigrationError(f"multifd-compression '{compression}' is not supported (none, zstd)")


# -- source ---------------------------------------------------------------------
@dataclass
class _Job:
    idstr: str
    pages: np.ndarray | None  # the block, (npages, page_size); None for a bare SYNC
    idx: np.ndarray
    sync: "_Barrier | None" = None


@dataclass
class _Barrier:
    """Every channel writes its SYNC packet, then waits here until all did."""

    n: int
    arrived: int = 0
    done: trio.Event = field(default_factory=trio.Event)


class _SendChannel:
    def __init__(self, sock: socket.socket, cid: int, *, compression: str, level: int, page_size: int) -> None:
        self.sock, self.cid, self.page_size = sock, cid, page_size
        self.shift = page_size.bit_length() - 1
        self.flag = mf.COMPRESSION_FLAGS[compression]
        self.cobj = _compressor(compression, level)
        self.per_packet = mf.page_count(page_size)
        self.headers = np.zeros((JOB_PACKETS, mf.packet_header_bytes(page_size)), dtype=np.uint8)
        self.scratch = np.empty((self.per_packet, page_size), dtype=np.uint8) if self.cobj else None
        self.packets = 0

    def packets_in(self, job: _Job) -> int:
        return max(1, -(-job.idx.size // self.per_packet))

    def send_blocking(self, job: _Job, packet_num: int) -> int:
        """Runs in a worker thread: the job's packets (up to JOB_PACKETS, each
        header + pages, numbered from ``packet_num``), all written with one
        vectored write for ``none``."""
        iov: list[memoryview] = []
        total = 0
        n_all = job.idx.size
        for k, s in enumerate(range(0, max(n_all, 1), self.per_packet)):
            idx = job.idx[s:s + self.per_packet]
            n = idx.size
            flags = mf.MULTIFD_FLAG_SYNC if job.sync is not None else 0
            data: list[memoryview] = []
            size = 0
            if n:
                assert job.pages is not None  # only a bare SYNC has no pages, and no indices
                flags |= self.flag
                if self.cobj is None:
                    data = _page_views(job.pages, idx)  # guest RAM itself: no user-space copy
                    size = n * self.page_size
                else:
                    import zstandard

                    assert self.scratch is not None  # allocated with the compressor
                    buf = self.scratch[:n]
                    np.take(job.pages, idx, axis=0, out=buf, mode="clip")  # one read of guest RAM
                    out = (self.cobj.compress(w.byte_view(buf.reshape(-1)))
                           + self.cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
                    data = [memoryview(out)]
                    size = len(out)
            offsets = idx.astype(np.uint64) << np.uint64(self.shift)
            head = mf.encode_packet_header(self.headers[k], flags=flags, packet_num=packet_num + k,
                                           block=job.idstr if n else "", offsets=offsets, next_packet_size=size,
                                           page_size=self.page_size)
            self.packets += 1
            if self.cobj is not None:  # the compressed buffer is per packet: write it now
                total += _sendmsg_all(self.sock, [head, *data])
            else:
                iov += [head, *data]
        if iov:
            total += _sendmsg_all(self.sock, iov)
        return total


class MultifdSender:
    """The source's N channels: ``queue`` pages, ``sync`` before each EOS.

    Create with :func:`multifd_sender` (``async with``): the channel tasks run
    in its nursery; an error on any channel cancels the rest and is raised
    from the ``async with``.
    """

    def __init__(self, socks: list[socket.socket], *, compression: str, level: int, page_size: int,
                 on_sent: Callable[[int], None] | None = None) -> None:
        self._on_sent = on_sent  # called with the bytes of each packet once written
        self.channels = [_SendChannel(s, i, compression=compression, level=level, page_size=page_size)
                         for i, s in enumerate(socks)]
        self.page_size = page_size
        self._per_packet = mf.page_count(page_size)
        self._send_jobs, self._recv_jobs = trio.open_memory_channel[_Job](len(socks))
        self._packet_num = 0
        self.bytes_sent = 0  #: multifd bytes written (query-migrate multifd-bytes)

    def close(self) -> None:
        for ch in self.channels:
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_RDWR)
            ch.sock.close()

    async def _run(self, ch: _SendChannel) -> None:
        async with self._recv_jobs.clone() as jobs:
            async for job in jobs:
                num = self._packet_num  # QEMU: one global packet counter
                self._packet_num += ch.packets_in(job)
                try:
                    n = await trio.to_thread.run_sync(ch.send_blocking, job, num, abandon_on_cancel=True)
                except OSError as exc:
                    raise ChannelError(exc.errno or errno.EIO, f"multifd channel {ch.cid}: {exc.strerror or exc}") from exc
                self.bytes_sent += n
                if self._on_sent is not None:
                    self._on_sent(n)
                if job.sync is not None:
                    bar = job.sync
                    bar.arrived += 1
                    if bar.arrived == bar.n:
                        bar.done.set()
                    await bar.done.wait()  # take no other job until every channel synced

    async def queue(self, idstr: str, pages: np.ndarray, idx: np.ndarray) -> None:
        """Queue non-zero pages (ascending indices) in packets of up to 128;
        waits while every channel is busy (QEMU: the next free channel).  A
        channel takes up to JOB_PACKETS packets per worker-thread call (one
        thread hand-off and one ``sendmsg`` per 4 MiB instead of per 512 KiB)."""
        step = self._per_packet * JOB_PACKETS
        for s in range(0, idx.size, step):
            await self._send_jobs.send(_Job(idstr, pages, idx[s:s + step]))

    async def sync(self) -> None:
        """``multifd_send_sync_main``: a SYNC packet on every channel, after all
        queued pages; returns when every channel has written it (rule 3)."""
        bar = _Barrier(len(self.channels))
        for _ in self.channels:
            await self._send_jobs.send(_Job("", None, np.empty(0, np.intp), bar))
        await bar.done.wait()


@contextlib.asynccontextmanager
async def multifd_sender(socks: list[socket.socket], *, compression: str, level: int, page_size: int,
                         on_sent: Callable[[int], None] | None = None) -> AsyncIterator[MultifdSender]:
    """Run a :class:`MultifdSender` over ``socks`` for the body of the ``async with``.

    On a normal exit the channels write what is queued and stop; on an error
    (or cancellation) they are cancelled.  The sockets are closed either way.
    """
    sender = MultifdSender(socks, compression=compression, level=level, page_size=page_size, on_sent=on_sent)
    try:
        async with trio.open_nursery() as nursery:
            for ch in sender.channels:
                nursery.start_soon(sender._run, ch)
            try:
                yield sender
            finally:
                sender._send_jobs.close()  # the channel tasks drain their queue and end
    finally:
        sender.close()


async def connect_channels(uri: str, n: int) -> list[socket.socket]:
    """Open the N multifd connections (after the main one) and send each its
    ``MultiFDInit_t`` (channel ids 0..N-1, QEMU's all-zero default UUID)."""
    from transport import TcpAddress, UnixAddress, parse_uri

    addr = parse_uri(uri)
    if not isinstance(addr, (TcpAddress, UnixAddress)):
        raise MigrationError("multifd needs a tcp: or unix: migration URI (QEMU 7.2 has no multifd over files)")

    def connect(cid: int) -> socket.socket:
        if isinstance(addr, TcpAddress):
            sock = socket.create_connection((addr.host, addr.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(addr.path)
        _set_buffers(sock)
        sock.sendall(mf.encode_init(cid))
        return sock

    socks: list[socket.socket] = []
    try:
        for cid in range(n):  # in order: QEMU 7.2 maps channels by connection order
            socks.append(await trio.to_thread.run_sync(connect, cid))
    except OSError as exc:
        for s in socks:
            s.close()
        raise MigrationError(f"multifd: failed to connect channel {len(socks)}: {exc.strerror or exc}") from exc
    return socks


# -- destination ------------------------------------------------------------------
class _RecvChannel:
    def __init__(self, sock: socket.socket, cid: int, *, compression: str, page_size: int) -> None:
        self.sock, self.cid, self.page_size = sock, cid, page_size
        self.shift = page_size.bit_length() - 1
        self.flag = mf.COMPRESSION_FLAGS[compression]
        self.header = bytearray(mf.packet_header_bytes(page_size))
        self.dobj: zstandard.ZstdDecompressionObj | None = None
        if compression == "zstd":
            import zstandard

            self.dobj = zstandard.ZstdDecompressor().decompressobj()
        self.packets = 0
        self.pages = 0

    def recv_many_blocking(self, ram: RAMLoadState) -> mf.PacketHeader | None:
        """Runs in a worker thread: packets until a SYNC (returned), EOF (None)
        or RECV_PACKETS of them (the last header): one thread hand-off per
        many packets."""
        for _ in range(RECV_PACKETS):
            hdr = self.recv_blocking(ram)
            if hdr is None or hdr.sync:
                return hdr
        return hdr

    def recv_blocking(self, ram: RAMLoadState) -> mf.PacketHeader | None:
        """Runs in a worker thread: one packet into guest RAM; None at a clean EOF."""
        got = _recv_exact_into(self.sock, [memoryview(self.header)])
        if got == 0:
            return None
        if got < len(self.header):
            raise RemoteProtocolError(f"multifd channel {self.cid}: EOF inside a packet header", got)
        ps = self.page_size
        hdr = mf.parse_packet_header(self.header, page_size=ps, blocks=ram.used_lengths, compression=self.flag,
                                     max_data_bytes=2 * mf.MULTIFD_PACKET_BYTES)
        self.packets += 1
        n = hdr.normal_pages
        if n == 0:
            return hdr
        block = ram.blocks[hdr.block]
        idx = (hdr.offsets >> np.uint64(self.shift)).astype(np.intp)
        if self.dobj is None:
            if (np.diff(idx) > 0).all():
                views = _page_views(block.pages, idx)  # straight into guest RAM
                want = n * ps
                if _recv_exact_into(self.sock, views) != want:
                    raise RemoteProtocolError(f"multifd channel {self.cid}: EOF inside packet data", 0)
            else:  # offsets out of order or repeated: read to a buffer, then place in order
                buf = np.empty((n, ps), dtype=np.uint8)
                if _recv_exact_into(self.sock, [w.byte_view(buf).cast("B")]) != n * ps:
                    raise RemoteProtocolError(f"multifd channel {self.cid}: EOF inside packet data", 0)
                block.pages[idx] = buf  # numpy applies repeats in order: the last copy wins
        else:
            comp = bytearray(hdr.next_packet_size)
            if _recv_exact_into(self.sock, [memoryview(comp)]) != len(comp):
                raise RemoteProtocolError(f"multifd channel {self.cid}: EOF inside packet data", 0)
            out = self.dobj.decompress(comp)
            if len(out) != n * ps:
                raise RemoteProtocolError(f"multifd channel {self.cid}: zstd packet decompressed to {len(out)} "
                                          f"bytes, expected {n * ps}", 0)
            block.pages[idx] = np.frombuffer(out, dtype=np.uint8).reshape(n, ps)
        ram.mark_written(hdr.block, idx)
        self.pages += n
        return hdr


class MultifdReceiver:
    """The destination's N channels; ``sync()`` at every EOS of the main channel."""

    def __init__(self, socks: list[socket.socket], ram: RAMLoadState, *, compression: str,
                 page_size: int) -> None:
        self.channels = [_RecvChannel(s, i, compression=compression, page_size=page_size)
                         for i, s in enumerate(socks)]
        self.ram = ram
        self._synced = trio.Semaphore(0, max_value=len(socks))
        self._resume = [trio.Semaphore(0, max_value=1) for _ in socks]
        self._failed: BaseException | None = None
        self._failed_event = trio.Event()
        self.bytes_received = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every channel until it reaches EOF (or fails: then raise)."""
        try:
            async with trio.open_nursery() as nursery:
                for ch in self.channels:
                    nursery.start_soon(self._run, ch)
                task_status.started()
        finally:
            self.close()

    async def _run(self, ch: _RecvChannel) -> None:
        try:
            while True:
                hdr = await trio.to_thread.run_sync(ch.recv_many_blocking, self.ram, abandon_on_cancel=True)
                if hdr is None:
                    return
                if hdr.sync:
                    self._synced.release()
                    await self._resume[ch.cid].acquire()  # hold until the main channel's EOS (rule 3)
        except (OSError, ProtocolError, ValueError) as exc:
            self._failed = exc
            self._failed_event.set()
            raise

    async def sync(self) -> None:
        """``multifd_recv_sync_main``: wait for every channel's SYNC, then let them go on."""
        for _ in self.channels:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as n:
                    async def fail_watch() -> None:
                        await self._failed_event.wait()
                        scope.cancel()
                    n.start_soon(fail_watch)
                    await self._synced.acquire()
                    n.cancel_scope.cancel()
            if self._failed is not None:
                raise MigrationError(f"multifd channel failed: {self._failed}")
        for sem in self._resume:
            sem.release()

    def close(self) -> None:
        for ch in self.channels:
            with contextlib.suppress(OSError):
                ch.sock.shutdown(socket.SHUT_RDWR)
            ch.sock.close()


async def accept_channels(listener: ChannelListener, n: int) -> tuple[Channel, list[socket.socket]]:
    """Accept the main channel and N multifd channels on one listener, told apart
    by their first 4 bytes (QEMU >= 8.0 does the same; 7.2 connects the main
    channel first, so both orders work).  Returns ``(main, [sockets by id])``."""
    main = None
    socks: dict[int, socket.socket] = {}
    try:
        while main is None or len(socks) < n:
            chan = await listener.accept(keep_listening=True)
            if not isinstance(chan, SocketChannel):  # listen_channel gives sockets for tcp:/unix:
                await chan.aclose()
                raise MigrationError("multifd needs a tcp: or unix: incoming URI")
            magic = await chan.peek(4)
            if magic == mf.MAIN_MAGIC.to_bytes(4, "big") and main is None:
                main = chan
                continue
            if magic != mf.MULTIFD_MAGIC.to_bytes(4, "big"):
                await chan.aclose()
                raise MigrationError(f"unexpected connection: first bytes {magic.hex()} are neither a "
                                     "migration stream nor a multifd channel")
            sock = chan.detach_blocking()
            try:
                init = await trio.to_thread.run_sync(_recv_init, sock)
                cid = mf.parse_init(init, channels=n)
            except BaseException:
                sock.close()
                raise
            if cid in socks:
                sock.close()
                raise MigrationError(f"multifd: received duplicated channel {cid}")
            socks[cid] = sock
    except BaseException:
        for s in socks.values():
            s.close()
        if main is not None:
            await main.aclose()
        raise
    finally:
        await listener.aclose()
    return main, [socks[i] for i in range(n)]


def _recv_init(sock: socket.socket) -> bytes:
    buf = bytearray(mf.INIT_BYTES)
    if _recv_exact_into(sock, [memoryview(buf)]) != len(buf):
        raise MigrationError("multifd: channel closed during its handshake")
    return bytes(buf)
