"""OutgoingMigration: the source end of a migration, QEMU's migration thread.

It follows migration/migration.c:

* setup: stream header + CONFIGURATION, ``ram_save_setup`` (bmap all ones,
  ``memory_global_dirty_log_start(MIGRATION)``, first sync = dirty-sync-count
  1), the ``ram`` START section with the MEM_SIZE block list; SETUP -> ACTIVE.
* iterations (``migration_iteration_run``): pending = dirty pages x page
  size (an estimate, no sync); only when it is at most the threshold is it
  replaced by an exact figure, which **syncs**; complete when pending is 0
  or below the threshold, where threshold = expected_bw x downtime-limit and
  expected_bw = ``avail-switchover-bandwidth`` if set, else the bandwidth
  (bytes/ms over >= 100 ms windows); otherwise ``ram_save_iterate`` (a PART
  section: send dirty pages while under the rate limit, for at most 50 ms).
  With ``x-predictive-switchover`` (ours, off by default) the test is
  instead "the predicted stop-and-copy time fits in downtime-limit", see
  :mod:`migrator.engine._switchover`.
* switchover: downtime starts, vCPUs stop, ACTIVE -> DEVICE, last-stage sync,
  every remaining page (unthrottled), the device section (vCPU/workload
  state, unless ``x-ram-only``), EOF, then the hand-over on the return path
  (below); COMPLETED.
* cancel (``migrate_cancel``) -> CANCELLING -> CANCELLED; any error ->
  FAILED.  Before the point of no return (below) the source stops dirty
  logging and resumes its vCPUs if they were running: it keeps running with
  its memory intact (the engine only ever *reads* source RAM).

The destination is :class:`migrator.engine._destination.IncomingMigration`;
the stream grammar and the return path are :class:`transport.SourceSession`'s.

Who owns the guest, and when the source may resume it, is
:mod:`migrator.engine._ownership`'s essay; :class:`Ownership` keeps the record.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import trio

from memory import GLOBAL_DIRTY_MIGRATION, TARGET_PAGE_SIZE
from memory.kvm import DirtyLogMode
from transport import (NEED_DATA, Loaded, PeerClosed, ProtocolError, ReturnPath, Shut, SourceSession,
                       StreamKind, open_channel)

from . import _multifd
from ._convergence import AutoConverge, RateWindows, VcpuWriteRates
from ._counters import MigrationCounters, error_desc, leaf_error
from ._devstate import pack_device_state
from ._ownership import Fate, Ownership
from ._history import DowntimeBreakdown, DowntimePrediction, IterationRecord, MigrationHistory
from ._qemu_devices import QemuDeviceState
from ._ram import RAMSaveState
from ._status import MigrationStatus as S
from ._switchover import SwitchoverModel
from ..errors import MigrationError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from transport import Channel

    from ._seams import MigrationParametersView, SourceVM

__all__ = ["OutgoingMigration"]

#: QEMU's MAX_WAIT: one ram_save_iterate sends for at most 50 ms.
MAX_WAIT_S = 0.050
#: pages gathered and sent per batch (4 MiB: a quarter of the per-batch
#: Python and trio overhead of 1 MiB batches; the socket buffers are 4 MiB).
BATCH_PAGES = 1024
#: ... but at most 1/16 of a rate-limit window's budget, and no fewer than
#: this (1 MiB), so a real max-bandwidth is kept as closely as before.
MIN_BATCH_PAGES = 256
#: auto-converge: sync at least every 5 s (QEMU's periodic throttle timer).
PERIODIC_SYNC_S = 5.0
#: how long the source tries to tell a waiting destination NOGO while it fails
NOGO_SEND_S = 1.0


class OutgoingMigration:
    """One outgoing migration; ``await run()`` inside the VM's nursery.

    ``vm`` provides: ``ms`` (MemorySystem), ``ram_blocks()`` -> [(RAMBlock,
    MemoryRegion)], ``vcpus`` (controller), ``vm_stop(reason)`` /
    ``vm_start()`` (which emit STOP/RESUME), ``kvm_listener`` (statistics),
    ``params``, ``caps``, ``emit_event``, ``state`` (MigrationState).
    """

    def __init__(self, vm: SourceVM, uri: str) -> None:
        self.vm = vm
        self.uri = uri
        self.caps = vm.caps  # capabilities cannot change while migrating
        self.counters = MigrationCounters()
        self.ram: RAMSaveState | None = None
        self.cancel_scope = trio.CancelScope()
        self.switchover = SwitchoverModel(lambda: self.vm.params, self.counters, self._expected_stop_ns)
        self._stopped_vm = False
        self._vm_was_running = False
        self._dirty_log_started = False
        self._session: SourceSession | None = None
        self._chan: Channel | None = None
        #: QEMU's 100 ms windows: the rate limit and the bandwidth estimate
        #: (migration_rate_limit / migration_update_counters) share them
        self.windows = RateWindows(lambda: self.vm.params, self.counters, self.switchover)
        self._last_sync_ns = 0
        self._period_start_ns = 0
        self._bytes_xfer_prev = 0
        self._auto_converge = AutoConverge()
        self._vcpu_rates = VcpuWriteRates()
        self._iteration_record: IterationRecord | None = None
        self._iter_bytes0 = 0
        self._iter_send_ns = 0
        self._iter_start_ns = 0
        self._last_wp_ns_before_sync = 0
        self._prev_sync_ns: int | None = None
        self._prediction: DowntimePrediction | None = None
        #: who may run the guest (see _ownership); the session decides the return path
        self.owner = Ownership()
        self._multifd: _multifd.MultifdSender | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def params(self) -> MigrationParametersView:
        """Current parameters: QEMU lets migrate-set-parameters act mid-migration."""
        return self.vm.params

    @property
    def session(self) -> SourceSession:
        assert self._session is not None, "the session exists from run() on"
        return self._session

    @property
    def chan(self) -> Channel:
        assert self._chan is not None, "the channel is open from run() on"
        return self._chan

    def _stream_kind(self) -> StreamKind:
        if self.caps.x_ram_only:
            return StreamKind.RAM_ONLY
        if self.caps.x_qemu_devices or self.vm.qemu_devices is not None:
            return StreamKind.QEMU_DEVICES  # the sections a stock -M none QEMU expects
        return StreamKind.NATIVE

    # -- public -------------------------------------------------------------
    def _expected_stop_ns(self) -> int:
        """What stopping the vCPUs would take now (the prediction's stop term): the
        controller's own measurement while they run, 0 for a paused guest."""
        vcpus = self.vm.vcpus
        return vcpus.expected_stop_ns() if vcpus.running else 0

    def cancel(self) -> None:
        """``migrate_cancel``: CANCELLING now, CANCELLED when the task ends."""
        state = self.vm.state
        if self.owner.committed:
            return  # past the point of no return: nothing left to cancel
        if state.status in (S.SETUP, S.ACTIVE, S.DEVICE):
            state.goto(S.CANCELLING)
            self.cancel_scope.cancel()

    async def run(self) -> None:
        vm, c = self.vm, self.counters
        c.start_ns = time.perf_counter_ns()
        # QEMU (migrate_fd_connect): expected-downtime starts at downtime-limit
        # until migration_update_counters has an estimate
        c.expected_downtime_ms = self.params.downtime_limit
        c.history = MigrationHistory(label=vm.label, status="setup", setup=vm.describe_setup(),
                                     start_unix_ms=time.time() * 1000)
        vm.state.goto(S.SETUP)
        error: BaseException | None = None
        try:
            with self.cancel_scope:
                self._session = SourceSession(self._stream_kind(), self.uri, handover=self.caps.x_handover)
                self._chan = await open_channel(self.uri)
                async with contextlib.AsyncExitStack() as self._stack:  # multifd channels, if any
                    await self._setup()
                    await self._iterate_until_converged()
                    await self._complete()
        except BaseExceptionGroup as group:  # from the multifd channels' nursery
            leaf = leaf_error(group)
            if not isinstance(leaf, Exception):
                raise
            error = leaf
        except MigrationError as exc:
            error = exc
        except OSError as exc:  # channel errors: peer died, refused...
            error = exc
        except Exception as exc:  # protocol errors and bugs: fail, keep the VM
            if not isinstance(exc, ProtocolError):
                vm.log(f"migration failed with an unexpected error: {exc!r}")
            error = exc
        finally:
            with trio.CancelScope(shield=True):
                await self._finish(error)

    # -- setup --------------------------------------------------------------
    async def _send(self, data: bytes | Sequence[bytes | memoryview], *, account: bool = True) -> None:
        buffers = [data] if isinstance(data, bytes) else list(data)
        n = sum(memoryview(b).nbytes for b in buffers)
        await self.chan.send_all(buffers)
        if account:
            self._account(n)

    def _account(self, n: int) -> None:
        """Book ``n`` bytes (main channel or multifd) as QEMU does: transferred,
        precopy or downtime bytes, and the rate limiter's window."""
        c = self.counters
        c.transferred += n
        if self._stopped_vm:
            c.downtime_bytes += n
        else:
            c.precopy_bytes += n
        self.windows.limiter.account(n)

    async def _open_multifd(self) -> None:
        """With the multifd capability: connect the channels (after the main
        channel's header, as QEMU does) and start their workers."""
        p = self.params
        if p.multifd_compression not in ("none", "zstd"):
            raise MigrationError(f"multifd-compression '{p.multifd_compression}' is not supported (none, zstd)")
        assert self._stack is not None
        socks = await _multifd.connect_channels(self.uri, p.multifd_channels)
        sender = _multifd.multifd_sender(socks, compression=p.multifd_compression, level=p.multifd_zstd_level,
                                         page_size=TARGET_PAGE_SIZE, on_sent=self._account_multifd)
        self._multifd = await self._stack.enter_async_context(sender)

    def _account_multifd(self, n: int) -> None:
        """A multifd packet was written (compressed size with zstd, as QEMU counts)."""
        self.counters.multifd_bytes += n
        self._account(n)

    async def _close_ram_section(self) -> None:
        """Before every EOS: multifd's SYNC on all channels (7.2: once per section)."""
        if self._multifd is not None:
            await self._multifd.sync()
        await self._send(self.session.ram_close())

    async def _setup(self) -> None:
        vm, session, c = self.vm, self.session, self.counters
        self.windows.start()
        await self._send(session.open())
        if self.caps.multifd:
            await self._open_multifd()
        # ram_save_setup
        # manual protect keeps fetched bits in KVM until cleared (rule 4)
        keeps = vm.kvm_listener.mode is DirtyLogMode.MANUAL_PROTECT
        self.ram = ram = RAMSaveState(vm.ms, vm.ram_blocks(), clear_bitmap_shift=self.params.x_clear_bitmap_shift,
                                      log_keeps_bits=keeps)
        vm.ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
        self._dirty_log_started = True
        self._period_start_ns = time.perf_counter_ns()
        self._sync(first=True)
        await self._send(session.ram_start((bs.block.idstr, bs.block.used_length) for bs in ram.blocks))
        await self._close_ram_section()
        c.setup_time_ms = (time.perf_counter_ns() - c.start_ns) // 1_000_000
        vm.state.goto(S.ACTIVE)

    # -- dirty sync (migration_bitmap_sync) ---------------------------------
    def _protect_ns(self) -> int:
        """Re-protection time so far: WP-all ioctls (fast path) and CLEARs (manual)."""
        st = self.vm.kvm_listener_stats()
        return int(st["write_protect_time_ns"] + st["clear_time_ns"])

    def _sync(self, *, first: bool = False, last_stage: bool = False) -> None:
        vm, c = self.vm, self.counters
        ram = self.ram
        assert ram is not None
        self._close_iteration_record()
        self._last_wp_ns_before_sync = self._protect_ns()
        pending_before = ram.pending_bytes
        result = ram.bitmap_sync(last_stage)
        c.dirty_sync_count = ram.dirty_sync_count
        c.dirty_bytes_last_sync = ram.pending_bytes
        now = time.perf_counter_ns()
        # Exact rate: the dirty bits this sync fetched over the time since the
        # previous fetch.  Both ends are syncs, so every page written in
        # between is in exactly one of them (a page written twice counts once,
        # as a dirty *page* should).
        interval_ms = 0.0 if self._prev_sync_ns is None else (now - self._prev_sync_ns) / 1e6
        self._prev_sync_ns = now
        exact_rate = result.found_dirty_pages * 1000 / interval_ms if interval_ms > 0 else 0.0
        vcpu_rates = self._vcpu_rates.sample(vm.vcpus, interval_ms)
        if not last_stage:
            self.switchover.last_sync_ms = result.sync_ns / 1e6
        if not first and not last_stage and now - self._period_start_ns > 1_000_000_000:
            self._trigger_throttle()
            period_ms = (now - self._period_start_ns) / 1e6
            c.dirty_pages_rate = int(ram.num_dirty_pages_period * 1000 / period_ms)
            self._period_start_ns = now
            ram.num_dirty_pages_period = 0
            self._bytes_xfer_prev = c.transferred
        self._last_sync_ns = now
        if self.caps.events:
            vm.emit_event("MIGRATION_PASS", {"pass": c.dirty_sync_count})
        expected_bw_ms = c.switchover_bandwidth_bytes_per_ms  # what threshold_bytes was built from
        prediction = self.switchover.predict(ram.pending_bytes)
        rec = IterationRecord(
            iteration=c.dirty_sync_count,
            time_ms=(now - c.start_ns) / 1e6,
            dirty_pages=result.new_dirty_pages,
            remaining_bytes=ram.pending_bytes,
            bandwidth_bytes_per_s=c.bandwidth_bytes_per_ms * 1000.0,
            dirty_rate_pages_per_s=float(c.dirty_pages_rate),
            expected_downtime_ms=(ram.pending_bytes / expected_bw_ms) if expected_bw_ms else 0.0,
            sync_time_ms=result.sync_ns / 1e6,
            throttle_pct=vm.vcpus.throttle_pct,
            final=last_stage,
            interval_ms=interval_ms,
            found_dirty_pages=result.found_dirty_pages,
            exact_dirty_rate_pages_per_s=exact_rate,
            switchover_bandwidth_bytes_per_s=expected_bw_ms * 1000.0,
            threshold_bytes=c.threshold_bytes,
            pending_before_bytes=pending_before,
            predicted_downtime_ms=0.0 if prediction is None else prediction.total_ms,
            vcpu_write_rates_pages_per_s=vcpu_rates,
        )
        self._iteration_record = rec
        self._iter_bytes0 = c.transferred
        self._iter_send_ns = 0
        self._iter_start_ns = now
        c.history.iterations.append(rec)

    def _close_iteration_record(self) -> None:
        rec = self._iteration_record
        if rec is None:
            return
        c = self.counters
        rec.bytes = c.transferred - self._iter_bytes0
        rec.sending_ms = self._iter_send_ns / 1e6
        rec.throughput_bytes_per_s = rec.bytes / (self._iter_send_ns / 1e9) if self._iter_send_ns else 0.0
        self.switchover.iteration_closed(self._iter_send_ns, rec.throughput_bytes_per_s)
        # protection of this iteration: in the sync (WP-all) plus lazy CLEARs while sending
        rec.write_protect_time_ms = (self._protect_ns() - self._last_wp_ns_before_sync) / 1e6
        rec.duration_ms = (time.perf_counter_ns() - self._iter_start_ns) / 1e6
        self._iteration_record = None

    def _trigger_throttle(self) -> None:
        """migration_trigger_throttle + mig_throttle_guest_down (ram.c)."""
        c = self.counters
        if not self.caps.auto_converge:
            return
        assert self.ram is not None
        new = self._auto_converge.next_throttle(
            self.params, c.cpu_throttle_percentage, bytes_xfer_period=c.transferred - self._bytes_xfer_prev,
            bytes_dirty_period=self.ram.num_dirty_pages_period * TARGET_PAGE_SIZE)
        if new is not None:
            c.cpu_throttle_percentage = new
            self.vm.vcpus.set_throttle(new)

    # -- iterations -----------------------------------------------------------
    async def _iterate_until_converged(self) -> None:
        c, ram, sw = self.counters, self.ram, self.switchover
        assert ram is not None
        # The decision is taken right after a sync, on that sync's exact
        # pending, and marked on its row; the row's threshold-bytes is the
        # one this test used.
        while True:
            self.windows.update()
            pending = ram.pending_bytes
            synced = False
            previous = self._iteration_record.remaining_bytes if self._iteration_record else None
            if sw.may_sync(pending):
                self._sync()
                synced = True
                pending = ram.pending_bytes
            elif (self.caps.auto_converge and c.dirty_sync_count > 1
                  and time.perf_counter_ns() - self._last_sync_ns > PERIODIC_SYNC_S * 1e9):
                self._sync()
                synced = True
                pending = ram.pending_bytes
            if synced and sw.fits(pending, previous):
                assert self._iteration_record is not None  # the sync opened it
                self._iteration_record.switchover = True
                self._prediction = sw.predict(pending)
                return
            await self._ram_save_iterate()
            await self.windows.rate_limit()

    async def _send_pages(self, *, deadline_ns: int | None, limited: bool) -> bool:
        """Send dirty pages; True when none are left."""
        session, ram, c = self.session, self.ram, self.counters
        assert ram is not None
        while True:
            limiter = self.windows.limiter
            if limited and limiter.over_budget():
                return False
            if deadline_ns is not None and time.perf_counter_ns() > deadline_ns:
                return False
            want = BATCH_PAGES
            if limited and limiter.budget_bytes:
                want = max(MIN_BATCH_PAGES, min(want, limiter.budget_bytes // 16 // TARGET_PAGE_SIZE))
            # multifd: no bitmap sync inside a section (rule 2 in _multifd)
            # sending time = finding, gathering and sending a batch (the
            # whole per-byte cost of the sender, which the last stage pays too)
            t0, b0 = time.perf_counter_ns(), c.transferred
            batch = ram.next_batch(want)
            if batch is None:
                return True
            block, idx = batch
            mfd = self._multifd
            # zero-page-detection: none sends every page as data; legacy and
            # multifd both detect on the main thread (QEMU 7.2 has no multifd
            # zero pages; 9.0's "multifd" moves the check into the channels)
            detect = self.params.zero_page_detection != "none"
            if mfd is not None:
                (buffers, _, zero), nonzero = session.ram_zero_pages(block.idstr, block.pages, idx,
                                                                     detect_zero=detect)
                normal = int(nonzero.size)
                await mfd.queue(block.idstr, block.pages, nonzero)
            else:
                buffers, normal, zero = session.ram_pages(block.idstr, block.pages, idx, detect_zero=detect)
            c.normal += normal
            c.duplicate += zero
            rec = self._iteration_record
            if rec is not None:
                rec.normal_pages += normal
                rec.zero_pages += zero
            self.windows.pages += normal + zero
            await self._send(buffers)
            spent = time.perf_counter_ns() - t0
            self._iter_send_ns += spent
            self.switchover.sent(spent, c.transferred - b0)

    async def _ram_save_iterate(self) -> None:
        await self._send(self.session.ram_part())
        deadline = time.perf_counter_ns() + int(MAX_WAIT_S * 1e9)
        await self._send_pages(deadline_ns=deadline, limited=True)
        await self._close_ram_section()

    # -- switchover -------------------------------------------------------------
    async def _complete(self) -> None:
        vm, c, session = self.vm, self.counters, self.session
        bd = DowntimeBreakdown()
        t0 = time.perf_counter_ns()
        self._vm_was_running = vm.vcpus.running
        runstate = vm.runstate  # QEMU's global_state_store, before the stop
        # Not cancellable half-way: a cancel while the vCPUs acknowledge the
        # stop would leave them stopped with nobody to resume them (the stop
        # is bounded; the cancel is delivered at the next checkpoint, and
        # _finish resumes).
        with trio.CancelScope(shield=True):
            await vm.vm_stop("finish-migrate")
        self._stopped_vm = True
        t1 = time.perf_counter_ns()
        bd.stop_vcpus_ms = (t1 - t0) / 1e6
        vm.state.goto(S.DEVICE)
        # ram_save_complete: last-stage sync, everything left, unthrottled
        self._sync(last_stage=True)
        t2 = time.perf_counter_ns()
        bd.final_sync_ms = (t2 - t1) / 1e6
        await self._send(session.ram_end())
        await self._send_pages(deadline_ns=None, limited=False)
        await self._close_ram_section()
        self._close_iteration_record()
        t3 = time.perf_counter_ns()
        bd.last_pages_ms = (t3 - t2) / 1e6
        if session.kind is StreamKind.QEMU_DEVICES:
            qdev = vm.qemu_devices or QemuDeviceState()
            for idstr, payload in qdev.sections(ran_ns=vm.ran_ns(), runstate=runstate):
                await self._send(session.qemu_device(idstr, payload))
        elif session.kind is StreamKind.NATIVE:
            await self._send(session.device_state(pack_device_state(
                self._vm_was_running, vm.vcpus.save_state(),
                handover=session.return_path is ReturnPath.HANDOVER)))
        rp = session.return_path
        self.owner.eof_due(rp)  # the send may fail after handing the byte over
        await self._send(session.eof())  # EOF, then QEMU's JSON description of every section
        self.owner.eof_sent(rp)
        t4 = time.perf_counter_ns()
        bd.device_state_ms = (t4 - t3) / 1e6
        if rp is not ReturnPath.NONE:
            await self._handover()
        t5 = time.perf_counter_ns()
        bd.destination_resume_ms = (t5 - t4) / 1e6
        bd.total_ms = (t5 - t0) / 1e6
        c.downtime_ms = int(round(bd.total_ms))
        c.history.downtime = bd
        c.history.downtime_prediction = self._prediction

    async def _rp_event(self, timeout_s: float) -> Shut | Loaded | str:
        """The next return-path message, or why none came (closed, timeout, garbage)."""
        session = self.session
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    event = session.next_event()
                except ProtocolError as exc:
                    return f"the destination sent an invalid return-path message: {exc}"
                if isinstance(event, Shut | Loaded):
                    return event
                if isinstance(event, PeerClosed) or event is not NEED_DATA:
                    return "the destination closed the return path before acknowledging the migration"
                try:
                    data = await self.chan.receive_some(4096)
                except OSError as exc:
                    return f"the return path failed: {error_desc(exc)}"
                session.receive_data(data)
        return f"no acknowledgement from the destination within x-return-path-timeout ({self.params.x_return_path_timeout} ms)"

    async def _handover(self) -> None:
        """After EOF: the return-path exchange that decides who owns the guest.

        With ``x-handover`` (both sides): wait for LOADED, commit, send GO,
        then wait (bounded) for the destination's final SHUT(0).  Without
        it: wait for QEMU's SHUT.  Every outcome is recorded in
        ``owner``; :meth:`_finish` acts on them.
        """
        timeout_s = self.params.x_return_path_timeout / 1000
        first = await self._rp_event(timeout_s)
        if isinstance(first, str):
            # Lost, late, garbled.  With x-handover the destination cannot run
            # without GO: _finish resumes us.  Without it, it may be running:
            # dest_may_run is set and _finish leaves the guest paused.
            raise MigrationError(first)
        if isinstance(first, Shut):
            if first.status != 0:
                # QEMU's SHUT(1): the destination failed and will not run.
                self.owner.dest_may_run = False
                raise MigrationError(f"destination failed to load the migration (status {first.status})")
            self.owner.committed = True  # SHUT(0): it loaded and runs (a peer without x-handover)
            return
        # LOADED (for exactly the bytes we sent: the session checked): the
        # destination is loaded, paused, waiting for us.
        if self.session.return_path is not ReturnPath.HANDOVER:
            self.owner.dest_may_run = False  # it waits for a GO we will never send
            raise MigrationError("the destination uses x-handover (it waits for the go-ahead); "
                                 "set the capability on both sides")
        # The point of no return: commit first, then tell the destination.
        # Once GO may be on the wire the source never resumes by itself.
        self.owner.committed = True
        self.owner.dest_may_run = True
        try:
            await self.chan.send_all([self.session.go()])
        except OSError as exc:
            self.vm.log(f"sending the go-ahead failed ({error_desc(exc)}): the guest stays paused here; "
                        "the destination runs it only if it got the go-ahead")
            self.owner.note = "go-ahead not confirmed"
            return
        final = await self._rp_event(timeout_s)
        if isinstance(final, Shut) and final.status == 0:
            self.owner.note = "destination confirmed"
        else:
            why = (final if isinstance(final, str) else
                   f"destination reported status {final.status}" if isinstance(final, Shut) else
                   "destination sent LOADED twice")
            self.owner.note = "go-ahead not confirmed"
            self.vm.log(f"go-ahead sent but not confirmed ({why}); the source stays paused (postmigrate)")

    # -- end --------------------------------------------------------------------
    async def _tell_nogo(self) -> None:
        """Best effort: a destination waiting for GO learns it must not run."""
        if self._chan is None or self._session is None or self.owner.committed:
            return
        nogo = self._session.nogo()  # empty when no destination can be waiting for our word
        if not nogo:
            return
        with trio.move_on_after(NOGO_SEND_S):
            try:
                await self._chan.send_all([nogo])
            except OSError:
                pass

    async def _finish(self, error: BaseException | None) -> None:
        """Decide the source's fate (the ordering rule of the essay).

        1. ``committed``: the destination owns the guest (GO sent, SHUT(0)
           received, or no return path): COMPLETED, ``postmigrate``; cancel
           or errors after that point change nothing.
        2. ``dest_may_run`` without commit: the destination may be running
           and we cannot know: FAILED, the guest stays paused
           (``postmigrate``), error-desc says the operator decides.
        3. Otherwise the destination cannot run: CANCELLED or FAILED, and the
           vCPUs resume if they ran before.
        In every case dirty logging is stopped and the throttle removed.
        """
        vm, c = self.vm, self.counters
        await self._tell_nogo()
        if self._chan is not None:
            try:
                await self._chan.aclose()
            except Exception:
                pass
        if self._dirty_log_started:
            vm.ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)
            self._dirty_log_started = False
        vm.vcpus.set_throttle(0)
        c.total_time_ms = (time.perf_counter_ns() - c.start_ns) // 1_000_000
        c.history.total_time_ms = float(c.total_time_ms)
        c.history.setup_time_ms = None if c.setup_time_ms is None else float(c.setup_time_ms)
        status = vm.state.status
        fate = self.owner.fate()
        if fate is Fate.DESTINATION:
            if error is not None:
                vm.log(f"after the hand-over: {error_desc(error)}")
            vm.state.goto(S.COMPLETED)
            vm.set_runstate("postmigrate")
        elif fate is Fate.UNKNOWN:
            why = error_desc(error) if error is not None else "migration was cancelled"
            c.error_desc = (f"{why}; the destination may be running the guest (it had the whole stream): "
                            "the source stays paused (postmigrate); check the destination, then 'cont' "
                            "exactly one side")
            vm.state.goto(S.FAILED)
            vm.set_runstate("postmigrate")
        else:
            if status is S.CANCELLING:
                vm.state.goto(S.CANCELLED)
            elif vm.state.running:
                c.error_desc = error_desc(error) if error is not None else "migration was cancelled"
                vm.state.goto(S.FAILED)
            if self._stopped_vm and self._vm_was_running:
                await vm.vm_start()
            elif self._stopped_vm:
                vm.set_runstate("paused")
        c.history.status = vm.state.status.value
