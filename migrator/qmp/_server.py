"""The QMP server: a thin trio adapter around :class:`~migrator.qmp._protocol.QMPConnection`.

Per client, one task reads requests and runs them one at a time, in order
(QEMU without OOB does the same); clients do not wait for each other.

Everything sent to a client -- greeting, replies, events -- goes through one
bounded FIFO per client, written by one writer task.  That single writer is
the per-connection write lock: messages never interleave on the wire.  The
FIFO also gives QEMU's ordering for free: QEMU writes an event into every
monitor's output buffer the moment it is emitted, so an event raised by a
command (``stop`` -> ``STOP``) reaches that client *before* the command's
reply.  Here the handler's ``emit_event`` queues the event before the reply
is queued, with the same result.  And since the ``qmp_capabilities`` reply is
queued before the connection starts accepting events, no event can overtake
it (qemu.qmp would fail the handshake).

:meth:`QMPServer.emit_event` never blocks: it stamps the event once and
queues it with ``send_nowait`` on every negotiated client, so a slow client
cannot stall the engine.  A client whose FIFO is full is disconnected, since
it could no longer see a coherent event stream.  Replies, in contrast, wait
for room: that only slows down the client that is not reading.

Failures of one client (resets, broken pipes, even bugs in our own code
triggered by it) end that client's session only; they are logged, never
propagated into the server's nursery.  ``trio.Cancelled`` always propagates.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import trio

from ._commands import CommandTable, command
from ._protocol import (
    CLOSED,
    DEFAULT_VERSION,
    MAX_MESSAGE_BYTES,
    NEED_DATA,
    ErrorReply,
    Event,
    Greeting,
    QMPConnection,
    Request,
    Return,
    VersionInfo,
    encode,
)
from ..errors import ErrorClass, LocalProtocolError

__all__ = ["QMPServer", "QMPServerStatistics"]

logger = logging.getLogger("migrator.qmp")

_RECEIVE_BYTES = 64 * 1024
_DRAIN_SECONDS = 10.0
_WRITE_BATCH_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class QMPServerStatistics:
    """Point-in-time counts, from :meth:`QMPServer.statistics`."""

    connected_clients: int
    negotiated_clients: int
    events_emitted: int


class _Client:
    __slots__ = ("conn", "stream", "outgoing_send", "outgoing_receive", "cancel_scope", "label")

    def __init__(self, stream: trio.abc.Stream, conn: QMPConnection, max_queued: int, label: str) -> None:
        self.stream = stream
        self.conn = conn
        # bytes to write, or an Event to set once everything before it is written
        self.outgoing_send, self.outgoing_receive = trio.open_memory_channel[bytes | trio.Event](max_queued)
        self.cancel_scope = trio.CancelScope()
        self.label = label


class _Builtins:
    """Commands every QMP server has (monitor/qmp-cmds-control.c)."""

    def __init__(self, server: QMPServer) -> None:
        self._server = server

    @command("query-version")
    def query_version(self) -> dict[str, Any]:
        return self._server.version.to_qmp()

    @command("query-commands")
    def query_commands(self) -> list[dict[str, str]]:
        # qmp_capabilities is executed by the connection, but QEMU lists it too.
        return [{"name": "qmp_capabilities"}] + [{"name": n} for n in self._server.commands.names()]

    @command("quit")
    def quit(self) -> None:
        # The server acts once the reply is on the wire; see QMPServer._quit.
        return None


class QMPServer:
    """A QMP server for one process (one "QEMU"), serving any number of clients.

    Args:
        commands: the application's commands.  ``query-version``,
            ``query-commands`` and ``quit`` are added (a clash raises
            ``ValueError``); ``qmp_capabilities`` is handled per connection.
        name: a label for log messages (``"src"``, ``"dst"``...).
        version: what the greeting and ``query-version`` report.
        max_queued_events: per-client output FIFO length; an event that finds
            it full disconnects that client.
        max_message_bytes: the largest request accepted (QEMU: 64 MiB).

    Attributes:
        quit_requested: a ``trio.Event`` set once a client's ``quit`` got its
            ``{}`` reply and ``SHUTDOWN`` event written (or could not be, within
            ``_DRAIN_SECONDS``).  The owner should then shut the process down,
            e.g. by cancelling the nursery that runs the server.
        commands: the full :class:`CommandTable`, builtins included.
    """

    def __init__(
        self,
        commands: CommandTable,
        *,
        name: str = "qmp",
        version: VersionInfo = DEFAULT_VERSION,
        max_queued_events: int = 1024,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.name = name
        self.version = version
        self.quit_requested = trio.Event()
        table = CommandTable.from_objects(_Builtins(self))
        table.update(commands)
        self.commands = table
        self._max_queued_events = max_queued_events
        self._max_message_bytes = max_message_bytes
        self._clients: set[_Client] = set()
        self._events_emitted = 0

    # -- listening -----------------------------------------------------------

    async def serve_unix(
        self,
        path: str | os.PathLike[str],
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on a unix socket until cancelled; use with ``nursery.start``.

        Like QEMU's ``-qmp unix:PATH,server``, a stale socket at ``path`` is
        replaced.  The socket file is removed on exit if it is still ours.
        ``task_status.started`` receives the list of listeners.

        Raises:
            OSError: binding failed (nothing is left listening then).
        """
        path = os.fspath(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _remove_stale_socket(path)
            await sock.bind(path)
            sock.listen()
            bound = os.stat(path)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        logger.info("%s: QMP listening on unix:%s", self.name, path)
        try:
            await trio.serve_listeners(self.handle_stream, [listener], task_status=task_status)
        finally:
            try:
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (bound.st_dev, bound.st_ino):
                    os.unlink(path)
            except FileNotFoundError:
                pass

    async def serve_tcp(
        self,
        host: str,
        port: int,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Listen on TCP until cancelled (``port=0`` picks one; read it from the
        listeners passed to ``task_status.started``)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        logger.info("%s: QMP listening on tcp:%s:%d", self.name, host, port)
        await trio.serve_listeners(self.handle_stream, listeners, task_status=task_status)

    # -- one client ----------------------------------------------------------

    async def handle_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one client on ``stream`` until it hangs up, then close it.

        Usable directly with any ``trio.abc.Stream`` (e.g. a memory stream in
        tests).  Returns normally whatever the client did.  Replies still
        queued when the client half-closes are flushed (for up to
        ``_DRAIN_SECONDS``) before the stream is closed.
        """
        label = _peer_label(stream)
        conn = QMPConnection(max_message_bytes=self._max_message_bytes)
        client = _Client(stream, conn, self._max_queued_events, label)
        self._clients.add(client)
        logger.info("%s: client %s connected", self.name, label)
        try:
            with client.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_loop, client)
                    try:
                        await self._serve_requests(client)
                    finally:
                        # The writer drains what is queued, then stops.
                        client.outgoing_send.close()
                        client.cancel_scope.deadline = trio.current_time() + _DRAIN_SECONDS
        except Exception:
            logger.exception("%s: client %s: session failed", self.name, label)
        finally:
            self._clients.discard(client)
            client.outgoing_send.close()
            await trio.aclose_forcefully(stream)
            logger.info("%s: client %s disconnected", self.name, label)

    async def _serve_requests(self, client: _Client) -> None:
        conn = client.conn
        await self._queue(client, conn.send(Greeting(self.version)))
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await client.stream.receive_some(_RECEIVE_BYTES)
                except trio.BrokenResourceError:
                    data = b""  # connection reset: same as EOF
                conn.receive_data(data)
            elif event is CLOSED:
                return
            elif isinstance(event, Request):
                reply = await self.commands.dispatch(event)
                await self._queue(client, self._encode_reply(conn, event, reply))
                if event.command == "quit" and isinstance(reply, Return):
                    await self._quit(client)
            else:
                assert isinstance(event, (Return, ErrorReply))
                await self._queue(client, conn.send(event))
                if conn.accepts_events:
                    logger.debug("%s: client %s negotiated", self.name, client.label)

    def _encode_reply(self, conn: QMPConnection, request: Request, reply: Return | ErrorReply) -> bytes:
        try:
            return conn.send(reply)
        except LocalProtocolError as exc:
            # A handler returned something JSON cannot carry: report it to the
            # client rather than leave it waiting for a reply that never comes.
            logger.error("%s: reply to %s: %s", self.name, request.command, exc)
            return conn.send(request.error(ErrorClass.GENERIC_ERROR, str(exc)))

    async def _quit(self, client: _Client) -> None:
        # QEMU: {"return": {}}, then SHUTDOWN {"guest": false, "reason": "host-qmp-quit"}.
        # The owner may tear everything down as soon as quit_requested is set,
        # so first let this client's writer put the reply and the event on the
        # wire (bounded, and unconditionally followed by the request).
        self.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        try:
            flushed = trio.Event()
            await client.outgoing_send.send(flushed)
            with trio.move_on_after(_DRAIN_SECONDS):
                await flushed.wait()
        finally:
            self.quit_requested.set()

    @staticmethod
    async def _queue(client: _Client, data: bytes) -> None:
        # Waits for room: backpressure on this client's own requests only.
        await client.outgoing_send.send(data)

    async def _write_loop(self, client: _Client) -> None:
        # Write whatever is queued in one send_all: a burst of events then
        # costs one syscall, and the writer keeps pace with emit_event.
        receive = client.outgoing_receive
        async for item in receive:
            chunks: list[bytes] = []
            flushed: list[trio.Event] = []
            size = 0
            while True:
                if isinstance(item, trio.Event):
                    flushed.append(item)  # "everything queued before me is written"
                else:
                    chunks.append(item)
                    size += len(item)
                if size >= _WRITE_BATCH_BYTES:
                    break
                try:
                    item = receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            if chunks:
                try:
                    await client.stream.send_all(b"".join(chunks))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    logger.info("%s: client %s: write failed: %r", self.name, client.label, exc)
                    client.cancel_scope.cancel()
                    return
            for event in flushed:
                event.set()

    # -- events --------------------------------------------------------------

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        """Send event ``name`` to every client that has completed negotiation.

        Synchronous and non-blocking: call it from any task in the server's
        trio thread (``trio.from_thread.run_sync`` from other threads).  The
        event is stamped with the wall clock now; ``data=None`` omits "data".

        Raises:
            LocalProtocolError: ``data`` cannot be encoded as JSON (nothing is sent).
        """
        payload = encode(Event.now(name, data))
        self._events_emitted += 1
        for client in list(self._clients):
            if not client.conn.accepts_events:
                continue
            try:
                client.outgoing_send.send_nowait(payload)
            except trio.WouldBlock:
                logger.warning(
                    "%s: client %s has %d unread messages; disconnecting it",
                    self.name,
                    client.label,
                    self._max_queued_events,
                )
                self._clients.discard(client)  # no more events for it, even before it is gone
                client.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client is on its way out

    def statistics(self) -> QMPServerStatistics:
        return QMPServerStatistics(
            connected_clients=len(self._clients),
            negotiated_clients=sum(1 for c in self._clients if c.conn.accepts_events),
            events_emitted=self._events_emitted,
        )


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISSOCK(st.st_mode):
        os.unlink(path)


def _peer_label(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    if sock is None:
        return f"{type(stream).__name__}@{id(stream):x}"
    try:
        peer = sock.getpeername()
    except OSError:
        peer = None
    if sock.family == socket.AF_UNIX:
        return f"unix:fd{sock.fileno()}"
    return f"{peer}"
