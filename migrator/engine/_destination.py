"""IncomingMigration: the destination end of a migration (receive, validate, load, hand over).

SETUP when listening, ACTIVE on the first byte; nothing is loaded into a
vCPU, acknowledged or resumed before the whole stream through EOF was
received and every section validated
(:func:`migrator.engine._devstate.validate_device_state`); on any error the
destination is FAILED, acknowledges SHUT(1) and its vCPUs never run.  The
stream's grammar and the return path are :class:`transport.DestinationSession`'s;
who owns the guest is explained in :mod:`migrator.engine._ownership`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import trio

from memory import TARGET_PAGE_SIZE
from transport import (NEED_DATA, DestinationSession, DeviceState, EndOfStream, GoAhead, NoGo,
                       ProtocolError, RamEOS, RamMemSize, RamPages, RamZeroPages, ReturnPath, VMDescription,
                       VMStateSection, listen_channel, parse_uri)

from . import _multifd
from ._counters import MigrationCounters, error_desc, leaf_error
from ._devstate import validate_device_state
from ._history import DestinationTimeline
from ._qemu_devices import QemuDeviceState
from ._ram import RAMLoadState
from ._status import MigrationStatus as S
from ..errors import MigrationError

if TYPE_CHECKING:
    import socket

    from transport import Channel

    from ._seams import DestinationVM

__all__ = ["IncomingMigration"]

#: after EOF, how long the destination waits for the VM description (QEMU
#: blocks on it; a source that sends none is accepted, as QEMU only warns).
VMDESC_WAIT_S = 2.0

#: our device state and its stream offset (or None), and QEMU's device sections
_Received = tuple[tuple[bytes, int] | None, list[VMStateSection]]


class IncomingMigration:
    """One incoming migration: receive, validate, load; resume only at the end.

    ``vm`` is the destination VM (``migrator.qmp._vm.VM``): its ``ram_blocks()``,
    ``vcpus``, ``machine``, ``caps``, ``params``, ``state``, ``autostart``,
    ``vm_start()`` / ``set_runstate()``, ``qemu_devices`` and ``log``.
    """

    def __init__(self, vm: DestinationVM, uri: str) -> None:
        self.vm = vm
        self.uri = uri
        # An incoming VM never ran and loaded no image: its RAM is fresh zeros.
        self.ram = RAMLoadState([b for b, _ in vm.ram_blocks()], fresh=True)
        self.error_desc: str | None = None
        self.counters = MigrationCounters()
        #: wall-clock moments of this migration (x-query-migration-history here)
        self.timeline = DestinationTimeline()
        #: set once listening succeeded (migrate-incoming may be retried before)
        self.listening = trio.Event()
        #: hand-over progress (x-handover): "", "waiting-for-go", "go", "nogo", "no-go-ahead"
        self.handover = ""
        #: loaded and valid, but the source's word never came: the operator decides
        self.undecided = False
        self._mfd: _multifd.MultifdReceiver | None = None

    def _stamp(self, name: str) -> None:
        setattr(self.timeline, name, time.time() * 1000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        vm = self.vm
        vm.state.goto(S.SETUP)
        chan = None
        try:
            listener = await listen_channel(self.uri)
        except (OSError, ValueError) as exc:
            self.error_desc = error_desc(exc)
            vm.state.goto(S.FAILED)
            task_status.started()
            raise MigrationError(f"Failed to listen on {self.uri}: {exc}") from exc
        task_status.started()
        self.listening.set()
        mfd_socks = None
        try:
            try:
                if vm.caps.multifd:
                    if not parse_uri(self.uri).bidirectional:
                        await listener.aclose()
                        raise MigrationError("multifd needs a tcp: or unix: incoming URI")
                    chan, mfd_socks = await _multifd.accept_channels(listener, vm.params.multifd_channels)
                else:
                    async with listener:
                        chan = await listener.accept()
            except (MigrationError, OSError, ProtocolError, BaseExceptionGroup) as exc:
                # e.g. a multifd channel's handshake is garbage: failed, never runs
                leaf = leaf_error(exc)
                if isinstance(leaf, trio.Cancelled):
                    raise
                self._fail(leaf)
                return
            self._stamp("accepted_unix_ms")
            await self.process(chan, mfd_socks)
        finally:
            if chan is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await chan.aclose()
                    except Exception:  # noqa: BLE001 - closing a dead channel
                        pass

    async def process(self, chan: Channel, mfd_socks: list[socket.socket] | None = None) -> None:
        """Receive, validate and load the stream from ``chan``, then hand over.

        Ordering rule: nothing is acknowledged, loaded into a vCPU or resumed
        before the whole stream through EOF was received and every section
        validated; with ``x-handover`` the vCPUs run only after the source's
        GO, which it sends only after it committed to never run again.
        """
        vm = self.vm
        session = DestinationSession(self.uri, handover=vm.caps.x_handover,
                                     max_block_bytes={b.idstr: b.used_length for b in self.ram.blocks.values()})
        self.counters.start_ns = time.perf_counter_ns()
        loaded = False
        source_running = True  # a RAM-only stream carries no run state
        runstate = None
        try:
            if mfd_socks is None:
                device_state, qemu_sections = await self._receive(chan, session)
            else:
                device_state, qemu_sections = await self._receive_multifd(chan, session, mfd_socks)
            self._stamp("stream_received_unix_ms")
            if device_state is not None:
                payload, offset = device_state
                machine = vm.machine
                valid = validate_device_state(payload, offset=offset, accel=machine.accel.kind,
                                              npages=machine.ram_block.used_length // TARGET_PAGE_SIZE,
                                              nvcpus=machine.smp)
                if valid.handover and session.return_path is not ReturnPath.HANDOVER:
                    # It resumes the guest if no LOADED comes (a timeout, a
                    # close): running here at EOF could make two copies.
                    raise MigrationError("the source hands the guest over (x-handover) and waits for "
                                         "this destination's LOADED; set x-handover here too")
                try:
                    vm.vcpus.load_state(valid.vcpu_state)
                except ValueError as exc:  # not for this VM (e.g. another --smp)
                    raise MigrationError(f"cannot load the vCPU state: {exc}") from exc
                source_running = valid.running
            if qemu_sections:  # a stock QEMU's sections, decoded and checked by transport
                qdev = QemuDeviceState.from_sections(qemu_sections)
                vm.qemu_devices = qdev
                if qdev.runstate is not None:
                    runstate = qdev.runstate
                    source_running = runstate == "running"
            self._stamp("device_state_loaded_unix_ms")
            loaded = True
        except Exception as exc:  # noqa: BLE001 - any failure -> FAILED
            leaf = leaf_error(exc)
            if not isinstance(leaf, (MigrationError, OSError, ProtocolError)):
                vm.log(f"incoming migration failed with an unexpected error: {leaf!r}")
            self._fail(leaf)
            await self._ack(chan, session.shut(1))
        handover = session.return_path is ReturnPath.HANDOVER
        if loaded and handover:
            loaded = await self._wait_for_go(chan, session)
        if loaded:
            # QEMU (process_incoming_migration_bh): start only if the source
            # was running (or sent no run state) and autostart is on; other
            # received run states (globalstate: prelaunch, paused...) are
            # taken over as they are.  The run state is set BEFORE the
            # status says completed, as there: a client that sees
            # "completed" must never read "inmigrate" from query-status.
            # Then migration_incoming_state_destroy sends SHUT(0).
            if source_running and vm.autostart:
                await vm.vm_start()
                self._stamp("resumed_unix_ms")
            else:
                vm.set_runstate("paused" if source_running else (runstate or "paused"))
            vm.state.goto(S.COMPLETED)
            if not handover:
                self._stamp("acknowledged_unix_ms")  # just before the reply goes out
            await self._ack(chan, session.shut(0))
        self.counters.total_time_ms = (time.perf_counter_ns() - self.counters.start_ns) // 1_000_000

    def _fail(self, exc: BaseException | str) -> None:
        self.error_desc = exc if isinstance(exc, str) else error_desc(exc)
        if self.vm.state.status in (S.SETUP, S.ACTIVE):
            self.vm.state.goto(S.FAILED)

    async def _wait_for_go(self, chan: Channel, session: DestinationSession) -> bool:
        """x-handover: LOADED, then wait, paused, for the source's word."""
        self.handover = "waiting-for-go"
        self._stamp("acknowledged_unix_ms")  # LOADED is the acknowledgement the source waits for
        await self._ack(chan, session.loaded())
        timeout_s = self.vm.params.x_return_path_timeout / 1000
        why = f"no go-ahead from the source within x-return-path-timeout ({timeout_s * 1000:.0f} ms)"
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    event = session.next_event()
                except ProtocolError as exc:
                    why = f"invalid hand-over message from the source: {exc}"
                    break
                if isinstance(event, GoAhead):
                    self.handover = "go"
                    return True
                if isinstance(event, NoGo):
                    self.handover = "nogo"
                    self._fail("the source kept the guest (it resumes): this destination never runs it")
                    return False
                if event is not NEED_DATA:
                    why = "the source closed the connection without a go-ahead"
                    break
                try:
                    data = await chan.receive_some(4096)
                except OSError as exc:
                    why = f"the connection to the source failed before the go-ahead: {error_desc(exc)}"
                    break
                session.receive_data(data)
        # The guest is loaded and valid, but the source never said whether it
        # committed: it may be running.  Stay paused; the operator decides.
        self.handover = "no-go-ahead"
        self.undecided = True
        self._fail(f"{why}; the guest is loaded and stays paused: if the source is not running "
                   "(postmigrate), 'cont' here starts it")
        self.vm.set_runstate("paused")
        return False

    async def _receive_vmdesc(self, chan: Channel, session: DestinationSession) -> None:
        """After EOF: the VM description, which the decoder checks against the
        sections it read (a mismatch fails the load).  A source that sends
        none and closes, or stays silent, is accepted with QEMU's warning."""
        with trio.move_on_after(VMDESC_WAIT_S):
            while True:
                event = session.next_event()
                if event is NEED_DATA:
                    await chan.receive_into(session)
                    continue
                if isinstance(event, VMDescription):
                    return
                break  # ConnectionClosed
        self.vm.log("Expected vmdescription section, but got none")

    async def _ack(self, chan: Channel, message: bytes) -> None:
        if not message:
            return  # the session decided nobody reads it (no return path)
        try:
            await chan.send_all([message])
        except OSError:
            pass  # the source is gone: nothing to tell it

    async def _receive_multifd(self, chan: Channel, session: DestinationSession,
                               socks: list[socket.socket]) -> _Received:
        """The main stream plus N multifd channels writing pages into guest RAM."""
        p = self.vm.params
        if p.multifd_compression not in ("none", "zstd"):
            for s in socks:
                s.close()
            raise MigrationError(f"multifd-compression '{p.multifd_compression}' is not supported (none, zstd)")
        mfd = _multifd.MultifdReceiver(socks, self.ram, compression=p.multifd_compression,
                                       page_size=TARGET_PAGE_SIZE)
        self._mfd = mfd
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(mfd.run)
                result = await self._receive(chan, session)
                nursery.cancel_scope.cancel()  # the channels wait for a next packet that never comes
        except BaseExceptionGroup as group:
            raise leaf_error(group) from None
        finally:
            mfd.close()
        return result

    async def _receive(self, chan: Channel, session: DestinationSession) -> _Received:
        """Receive the whole stream and its VM description; returns our device
        state with its stream offset (or None) and QEMU's device sections, in
        stream order.  The session checks the structure; this loads payloads."""
        device_state = None
        qemu_sections: list[VMStateSection] = []
        active = False
        while True:
            event = session.next_event()
            if event is NEED_DATA:
                n = await chan.receive_into(session)
                if n and not active:
                    active = True
                    self._stamp("first_byte_unix_ms")
                    self.vm.state.goto(S.ACTIVE)
            elif isinstance(event, RamMemSize):
                self.ram.mem_size(event.blocks)
            elif isinstance(event, RamPages):
                self.ram.load_pages(event.block, event.offsets, event.data)
            elif isinstance(event, RamZeroPages):
                self.ram.load_zero_pages(event.block, event.offsets)
            elif isinstance(event, RamEOS):
                if self._mfd is not None:
                    await self._mfd.sync()  # every channel's SYNC for this section (rule 3)
            elif isinstance(event, DeviceState):
                assert session.device_state_offset is not None
                device_state = (event.data, session.device_state_offset)
            elif isinstance(event, VMStateSection):
                qemu_sections.append(event)
            elif isinstance(event, EndOfStream):
                await self._receive_vmdesc(chan, session)
                # LOADED and GO count every byte of the main channel, the VM
                # description included (the source's bytes_sent)
                session.end_stream()
                return device_state, qemu_sections
            else:  # pragma: no cover - the session produced something new
                raise MigrationError(f"unexpected stream event {event!r}")
