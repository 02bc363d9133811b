"""The pre-copy engine: QEMU's migration thread, source and destination.

Source (:class:`OutgoingMigration`) follows migration/migration.c:

* setup: stream header + CONFIGURATION, ``ram_save_setup`` (bmap all ones,
  ``memory_global_dirty_log_start(MIGRATION)``, first sync = dirty-sync-count
  1), the ``ram`` START section with the MEM_SIZE block list; SETUP -> ACTIVE.
* iterations (``migration_iteration_run``): pending = dirty pages x page
  size (an estimate, no sync); only when it drops below the threshold is it
  replaced by an exact figure, which **syncs**; complete when pending <=
  threshold, where threshold = bandwidth (bytes/ms over >= 100 ms windows) x
  downtime-limit; otherwise ``ram_save_iterate`` (a PART section: send dirty
  pages while under the rate limit, for at most 50 ms).
* switchover: downtime starts, vCPUs stop, ACTIVE -> DEVICE, last-stage sync,
  every remaining page (unthrottled), the device section (vCPU/workload
  state, unless ``x-ram-only``), EOF, then the destination's return-path
  acknowledgement; COMPLETED.
* cancel (``migrate_cancel``) -> CANCELLING -> CANCELLED; any error ->
  FAILED.  In both the source stops dirty logging and resumes its vCPUs if
  they were running: it keeps running with its memory intact (the engine
  only ever *reads* source RAM).

Destination (:class:`IncomingMigration`): SETUP when listening, ACTIVE on
the first byte, COMPLETED only after the whole stream (through EOF) was
received and validated; the vCPUs are resumed only then (unless ``-S``).
On any error the destination is FAILED and its vCPUs never run.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from dataclasses import dataclass, field

import trio

from memory import GLOBAL_DIRTY_MIGRATION, TARGET_PAGE_SIZE
from transport import (NEED_DATA, Configuration, ConnectionClosed, DeviceState, EndOfStream,
                       ProtocolError, RamEOS, RamMemSize, RamPages, RamZeroPages, RateLimiter,
                       SectionEnd, SectionFooter, SectionFull, SectionPart, SectionStart,
                       StreamDecoder, StreamEncoder, StreamHeader, VMDescription, VMStateSection,
                       listen_channel, open_channel)
from transport._vmstate import KNOWN_SECTIONS

from . import _multifd
from ._history import DowntimeBreakdown, IterationRecord, MigrationHistory
from ._qemu_devices import QemuDeviceState
from ._ram import RAMLoadState, RAMSaveState
from ._status import MigrationStatus as S
from .errors import MigrationError

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
#: return-path message MIG_RP_MSG_SHUT: be16 type, be16 len, be32 status.
RP_MSG_SHUT = 1
RP_SHUT_FMT = ">HHI"
RP_WAIT_S = 10.0
#: after EOF, how long the destination waits for the VM description (QEMU
#: blocks on it; a source that sends none is accepted, as QEMU only warns).
VMDESC_WAIT_S = 2.0

RAM_SECTION = "ram"
RAM_SECTION_VERSION = 4
DEVICE_SECTION = "migrator-vcpus"
DEVICE_SECTION_VERSION = 1
#: Our machine is QEMU's ``-M none`` with RAM: one block "ram" at guest-physical
#: 0 and no devices.  Stock QEMU requires the CONFIGURATION section to name the
#: destination's machine type, so a RAM-only stream loads into ``-M none``.
MACHINE_NAME = "none"


def pack_device_state(running: bool, vcpu_state: bytes) -> bytes:
    """Our device section's payload: one JSON line (the source's run state, the
    role QEMU's "globalstate" section plays), then the vCPU controller's blob."""
    return json.dumps({"running": bool(running)}).encode() + b"\n" + vcpu_state


def unpack_device_state(payload: bytes) -> tuple[bool, bytes]:
    head, sep, vcpu_state = payload.partition(b"\n")
    try:
        meta = json.loads(head) if sep else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("running"), bool):
        raise MigrationError("malformed device state: no run-state header")
    return meta["running"], vcpu_state


def error_desc(exc: BaseException) -> str:
    """``error-desc`` text: the message without Python's ``[Errno N]`` prefix."""
    text = str(exc)
    if isinstance(exc, OSError) and text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    return text


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _has_return_path(uri: str) -> bool:
    """Sockets carry a return path (QEMU's MIG_RP_MSG_SHUT); files do not."""
    return uri.startswith(("tcp:", "unix:"))


@dataclass
class MigrationCounters:
    """What ``query-migrate`` reports (QEMU's MigrationStats, ram part)."""

    transferred: int = 0
    multifd_bytes: int = 0
    precopy_bytes: int = 0
    downtime_bytes: int = 0
    duplicate: int = 0
    normal: int = 0
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0
    mbps: float = 0.0
    pages_per_second: float = 0.0
    bandwidth_bytes_per_ms: float = 0.0
    threshold_bytes: int = 0
    expected_downtime_ms: int = 0
    cpu_throttle_percentage: int = 0
    dirty_bytes_last_sync: int = 0
    start_ns: int = 0
    setup_time_ms: int | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    error_desc: str | None = None
    history: MigrationHistory = field(default_factory=MigrationHistory)


class OutgoingMigration:
    """One outgoing migration; ``await run()`` inside the VM's nursery.

    ``vm`` provides: ``ms`` (MemorySystem), ``ram_blocks()`` -> [(RAMBlock,
    MemoryRegion)], ``vcpus`` (controller), ``vm_stop(reason)`` /
    ``vm_start()`` (which emit STOP/RESUME), ``kvm_listener`` (statistics),
    ``params``, ``caps``, ``emit_event``, ``state`` (MigrationState).
    """

    def __init__(self, vm, uri: str) -> None:
        self.vm = vm
        self.uri = uri
        self.caps = vm.caps  # capabilities cannot change while migrating
        self.counters = MigrationCounters()
        self.ram: RAMSaveState | None = None
        self.cancel_scope = trio.CancelScope()
        self._stopped_vm = False
        self._vm_was_running = False
        self._dirty_log_started = False
        self._encoder = None
        self._chan = None
        self._section_id = 0
        self._last_sync_ns = 0
        self._period_start_ns = 0
        self._bytes_xfer_prev = 0
        self._dirty_rate_high_cnt = 0
        self._iteration_record: IterationRecord | None = None
        self._iter_bytes0 = 0
        self._multifd: _multifd.MultifdSender | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def params(self):
        """Current parameters: QEMU lets migrate-set-parameters act mid-migration."""
        return self.vm.params

    # -- public -------------------------------------------------------------
    def cancel(self) -> None:
        """``migrate_cancel``: CANCELLING now, CANCELLED when the task ends."""
        state = self.vm.state
        if state.status in (S.SETUP, S.ACTIVE, S.DEVICE):
            state.goto(S.CANCELLING)
            self.cancel_scope.cancel()

    async def run(self) -> None:
        vm, c = self.vm, self.counters
        c.start_ns = time.perf_counter_ns()
        c.history = MigrationHistory(label=vm.label, status="setup", setup=vm.describe_setup())
        vm.state.goto(S.SETUP)
        error: BaseException | None = None
        try:
            with self.cancel_scope:
                self._encoder = StreamEncoder()
                self._chan = await open_channel(self.uri)
                async with contextlib.AsyncExitStack() as self._stack:  # multifd channels, if any
                    await self._setup()
                    await self._iterate_until_converged()
                    await self._complete()
        except BaseExceptionGroup as group:  # from the multifd channels' nursery
            leaf = _leaf(group)
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
    async def _send(self, data, *, account: bool = True) -> None:
        buffers = data if isinstance(data, list) else [data]
        n = sum(memoryview(b).nbytes for b in buffers)
        await self._chan.send_all(buffers)
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
        self._limiter.account(n)

    async def _open_multifd(self) -> None:
        """With the multifd capability: connect the channels (after the main
        channel's header, as QEMU does) and start their workers."""
        p = self.params
        if p.multifd_compression not in ("none", "zstd"):
            raise MigrationError(f"multifd-compression '{p.multifd_compression}' is not supported (none, zstd)")
        socks = await _multifd.connect_channels(self.uri, p.multifd_channels)
        sender = _multifd.multifd_sender(socks, compression=p.multifd_compression, level=p.multifd_zstd_level,
                                         page_size=TARGET_PAGE_SIZE, on_sent=self._account_multifd)
        self._multifd = await self._stack.enter_async_context(sender)

    def _account_multifd(self, n: int) -> None:
        """A multifd packet was written (compressed size with zstd, as QEMU counts)."""
        self.counters.multifd_bytes += n
        self._account(n)

    async def _eos(self) -> bytes:
        """Before every EOS: multifd's SYNC on all channels (7.2: once per section)."""
        if self._multifd is not None:
            await self._multifd.sync()
        return self._encoder.eos()

    async def _setup(self) -> None:
        vm, enc, c = self.vm, self._encoder, self.counters
        # QEMU's 100 ms windows: the rate limit and the bandwidth estimate
        # (migration_rate_limit / migration_update_counters) share them.
        self._limiter = RateLimiter(self.params.max_bandwidth)
        self._counted_windows = 0
        self._window_pages = 0
        self._window_t0 = time.perf_counter_ns()
        await self._send(enc.header() + enc.configuration(MACHINE_NAME))
        if self.caps.multifd:
            await self._open_multifd()
        # ram_save_setup
        self.ram = RAMSaveState(vm.ms, vm.ram_blocks(),
                                clear_bitmap_shift=self.params.x_clear_bitmap_shift)
        vm.ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
        self._dirty_log_started = True
        self._period_start_ns = time.perf_counter_ns()
        self._sync(first=True)
        blocks = tuple((bs.block.idstr, bs.block.used_length) for bs in self.ram.blocks)
        self._section_id += 1
        self._ram_section_id = self._section_id
        await self._send(enc.section_start(self._ram_section_id, RAM_SECTION, 0, RAM_SECTION_VERSION)
                         + enc.ram_mem_size(blocks))
        await self._send(await self._eos() + enc.section_footer(self._ram_section_id))
        c.setup_time_ms = (time.perf_counter_ns() - c.start_ns) // 1_000_000
        vm.state.goto(S.ACTIVE)

    # -- dirty sync (migration_bitmap_sync) ---------------------------------
    def _protect_ns(self) -> int:
        """Re-protection time so far: WP-all ioctls (fast path) and CLEARs (manual)."""
        st = self.vm.kvm_listener_stats()
        return st["write_protect_time_ns"] + st["clear_time_ns"]

    def _sync(self, *, first: bool = False, last_stage: bool = False) -> None:
        vm, c, ram = self.vm, self.counters, self.ram
        self._close_iteration_record()
        self._last_wp_ns_before_sync = self._protect_ns()
        result = ram.bitmap_sync(last_stage)
        c.dirty_sync_count = ram.dirty_sync_count
        c.dirty_bytes_last_sync = ram.pending_bytes
        now = time.perf_counter_ns()
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
        bw_ms = c.bandwidth_bytes_per_ms
        rec = IterationRecord(
            iteration=c.dirty_sync_count,
            time_ms=(now - c.start_ns) / 1e6,
            dirty_pages=result.new_dirty_pages,
            remaining_bytes=ram.pending_bytes,
            bandwidth_bytes_per_s=bw_ms * 1000.0,
            dirty_rate_pages_per_s=float(c.dirty_pages_rate),
            expected_downtime_ms=(ram.pending_bytes / bw_ms) if bw_ms else 0.0,
            sync_time_ms=result.sync_ns / 1e6,
            throttle_pct=vm.vcpus.throttle_pct if hasattr(vm.vcpus, "throttle_pct") else c.cpu_throttle_percentage,
            final=last_stage,
        )
        self._iteration_record = rec
        self._iter_bytes0 = c.transferred
        self._iter_start_ns = now
        c.history.iterations.append(rec)

    def _close_iteration_record(self) -> None:
        rec = self._iteration_record
        if rec is None:
            return
        c = self.counters
        rec.bytes = c.transferred - self._iter_bytes0
        # protection of this iteration: in the sync (WP-all) plus lazy CLEARs while sending
        rec.write_protect_time_ms = (self._protect_ns() - self._last_wp_ns_before_sync) / 1e6
        rec.duration_ms = (time.perf_counter_ns() - self._iter_start_ns) / 1e6
        self._iteration_record = None

    def _trigger_throttle(self) -> None:
        """migration_trigger_throttle + mig_throttle_guest_down (ram.c)."""
        c, p = self.counters, self.params
        if not self.caps.auto_converge:
            return
        bytes_xfer_period = c.transferred - self._bytes_xfer_prev
        bytes_dirty_period = self.ram.num_dirty_pages_period * TARGET_PAGE_SIZE
        bytes_dirty_threshold = bytes_xfer_period * p.throttle_trigger_threshold / 100
        if bytes_dirty_period > bytes_dirty_threshold:
            self._dirty_rate_high_cnt += 1
            if self._dirty_rate_high_cnt >= 2:
                self._dirty_rate_high_cnt = 0
                current = c.cpu_throttle_percentage
                if current == 0:
                    new = p.cpu_throttle_initial
                elif p.cpu_throttle_tailslow:
                    # QEMU: throttle_inc = min(increment, cpu_now - cpu_now*threshold/dirty)
                    cpu_now = 100 - current
                    cpu_ideal = cpu_now * (bytes_dirty_threshold / bytes_dirty_period)
                    inc = min(p.cpu_throttle_increment, int(cpu_now - cpu_ideal))
                    new = current + max(inc, 1)
                else:
                    new = current + p.cpu_throttle_increment
                new = max(1, min(new, p.max_cpu_throttle, 99))
                c.cpu_throttle_percentage = new
                self.vm.vcpus.set_throttle(new)

    # -- counters (migration_update_counters) --------------------------------
    def _update_counters(self) -> None:
        """Once per completed 100 ms window: bandwidth, threshold, expected downtime."""
        c, lim = self.counters, self._limiter
        windows = lim.statistics().windows
        if windows == self._counted_windows:
            return
        self._counted_windows = windows
        now = time.perf_counter_ns()
        spent_ms = max((now - self._window_t0) / 1e6, 1e-3)
        c.bandwidth_bytes_per_ms = lim.bandwidth_bytes_per_s / 1000
        expected_bw = self.params.avail_switchover_bandwidth / 1000 or c.bandwidth_bytes_per_ms
        c.threshold_bytes = int(expected_bw * self.params.downtime_limit)
        c.mbps = lim.bandwidth_bytes_per_s * 8 / 1e6
        c.pages_per_second = self._window_pages * 1000 / spent_ms
        if c.dirty_pages_rate and c.transferred > 10000 and c.bandwidth_bytes_per_ms:
            c.expected_downtime_ms = int(c.dirty_bytes_last_sync / c.bandwidth_bytes_per_ms)
        self._window_t0 = now
        self._window_pages = 0

    async def _rate_limit(self) -> None:
        """migration_rate_limit: sleep to the end of a spent window, then count."""
        self._limiter.set_rate(self.params.max_bandwidth)  # may change mid-migration
        await self._limiter.wait_for_budget()
        self._update_counters()

    # -- iterations -----------------------------------------------------------
    async def _iterate_until_converged(self) -> None:
        c, ram = self.counters, self.ram
        while True:
            self._update_counters()
            pending = ram.pending_bytes
            if pending < c.threshold_bytes:
                self._sync()
                pending = ram.pending_bytes
            elif (self.caps.auto_converge and c.dirty_sync_count > 1
                  and time.perf_counter_ns() - self._last_sync_ns > PERIODIC_SYNC_S * 1e9):
                self._sync()
                pending = ram.pending_bytes
            if pending <= c.threshold_bytes:
                return
            await self._ram_save_iterate()
            await self._rate_limit()

    async def _send_pages(self, *, deadline_ns: int | None, limited: bool) -> bool:
        """Send dirty pages; True when none are left."""
        enc, ram, c = self._encoder, self.ram, self.counters
        while True:
            if limited and self._limiter.over_budget():
                return False
            if deadline_ns is not None and time.perf_counter_ns() > deadline_ns:
                return False
            want = BATCH_PAGES
            if limited and self._limiter.budget_bytes:
                want = max(MIN_BATCH_PAGES, min(want, self._limiter.budget_bytes // 16 // TARGET_PAGE_SIZE))
            # multifd: no bitmap sync inside a section (rule 2 in _multifd)
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
                (buffers, _, zero), nonzero = enc.ram_zero_pages(block.idstr, block.pages, idx, detect_zero=detect)
                normal = int(nonzero.size)
                await mfd.queue(block.idstr, block.pages, nonzero)
            else:
                buffers, normal, zero = enc.ram_pages(block.idstr, block.pages, idx, detect_zero=detect)
            c.normal += normal
            c.duplicate += zero
            rec = self._iteration_record
            if rec is not None:
                rec.normal_pages += normal
                rec.zero_pages += zero
            self._window_pages += normal + zero
            await self._send(buffers)

    async def _ram_save_iterate(self) -> None:
        enc = self._encoder
        await self._send(enc.section_part(self._ram_section_id))
        deadline = time.perf_counter_ns() + int(MAX_WAIT_S * 1e9)
        await self._send_pages(deadline_ns=deadline, limited=True)
        await self._send(await self._eos() + enc.section_footer(self._ram_section_id))

    # -- switchover -------------------------------------------------------------
    async def _complete(self) -> None:
        vm, c, enc = self.vm, self.counters, self._encoder
        bd = DowntimeBreakdown()
        t0 = time.perf_counter_ns()
        self._vm_was_running = vm.vcpus.running
        runstate = vm.runstate  # QEMU's global_state_store, before the stop
        await vm.vm_stop("finish-migrate")
        self._stopped_vm = True
        t1 = time.perf_counter_ns()
        bd.stop_vcpus_ms = (t1 - t0) / 1e6
        vm.state.goto(S.DEVICE)
        # ram_save_complete: last-stage sync, everything left, unthrottled
        self._sync(last_stage=True)
        t2 = time.perf_counter_ns()
        bd.final_sync_ms = (t2 - t1) / 1e6
        await self._send(enc.section_end(self._ram_section_id))
        await self._send_pages(deadline_ns=None, limited=False)
        await self._send(await self._eos() + enc.section_footer(self._ram_section_id))
        self._close_iteration_record()
        t3 = time.perf_counter_ns()
        bd.last_pages_ms = (t3 - t2) / 1e6
        native = False
        if self.caps.x_ram_only:
            pass
        elif self.caps.x_qemu_devices or vm.qemu_devices is not None:
            # the sections a stock -M none QEMU expects (see _qemu_devices)
            qdev = vm.qemu_devices or QemuDeviceState()
            for idstr, payload in qdev.sections(ran_ns=vm.ran_ns(), runstate=runstate):
                self._section_id += 1
                sid = self._section_id
                await self._send(enc.section_full(sid, idstr, 0, KNOWN_SECTIONS[idstr].version)
                                 + enc.vmstate(payload) + enc.section_footer(sid))
        else:
            native = True
            self._section_id += 1
            sid = self._section_id
            state = pack_device_state(self._vm_was_running, vm.vcpus.save_state())
            await self._send(enc.section_full(sid, DEVICE_SECTION, 0, DEVICE_SECTION_VERSION)
                             + enc.device_state(state) + enc.section_footer(sid))
        # EOF, then QEMU's JSON description of every section written
        await self._send(enc.eof() + enc.vmdescription())
        t4 = time.perf_counter_ns()
        bd.device_state_ms = (t4 - t3) / 1e6
        # Only our own destination acknowledges on the return path (a stock
        # QEMU opens one only with the return-path capability).
        if _has_return_path(self.uri) and native:
            await self._wait_return_path()
        t5 = time.perf_counter_ns()
        bd.destination_resume_ms = (t5 - t4) / 1e6
        bd.total_ms = (t5 - t0) / 1e6
        c.downtime_ms = int(round(bd.total_ms))
        c.history.downtime = bd

    async def _wait_return_path(self) -> None:
        size = struct.calcsize(RP_SHUT_FMT)
        buf = b""
        with trio.move_on_after(RP_WAIT_S) as scope:
            while len(buf) < size:
                chunk = await self._chan.receive_some(size - len(buf))
                if not chunk:
                    break
                buf += chunk
        if scope.cancelled_caught or len(buf) < size:
            raise MigrationError("destination closed the return path before acknowledging the migration")
        mtype, length, status = struct.unpack(RP_SHUT_FMT, buf)
        if mtype != RP_MSG_SHUT or length != 4:
            raise MigrationError(f"unexpected return-path message type {mtype} len {length}")
        if status != 0:
            raise MigrationError(f"destination failed to load the migration (status {status})")

    # -- end --------------------------------------------------------------------
    async def _finish(self, error: BaseException | None) -> None:
        vm, c = self.vm, self.counters
        if self._chan is not None:
            try:
                await self._chan.aclose()
            except Exception:
                pass
        if self._dirty_log_started:
            vm.ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)
        vm.vcpus.set_throttle(0)
        c.total_time_ms = (time.perf_counter_ns() - c.start_ns) // 1_000_000
        c.history.total_time_ms = float(c.total_time_ms)
        c.history.setup_time_ms = None if c.setup_time_ms is None else float(c.setup_time_ms)
        status = vm.state.status
        if error is None and not self.cancel_scope.cancelled_caught and status is S.DEVICE:
            vm.state.goto(S.COMPLETED)
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


class IncomingMigration:
    """One incoming migration: receive, validate, load; resume only at the end."""

    def __init__(self, vm, uri: str) -> None:
        self.vm = vm
        self.uri = uri
        # An incoming VM never ran and loaded no image: its RAM is fresh zeros.
        self.ram = RAMLoadState([b for b, _ in vm.ram_blocks()], fresh=True)
        self.error_desc: str | None = None
        self.counters = MigrationCounters()
        #: set once listening succeeded (migrate-incoming may be retried before)
        self.listening = trio.Event()
        self._mfd: _multifd.MultifdReceiver | None = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
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
            if vm.caps.multifd:
                if not self.uri.startswith(("tcp:", "unix:")):
                    await listener.aclose()
                    raise MigrationError("multifd needs a tcp: or unix: incoming URI")
                chan, mfd_socks = await _multifd.accept_channels(listener, vm.params.multifd_channels)
            else:
                async with listener:
                    chan = await listener.accept()
            self.counters.start_ns = time.perf_counter_ns()
            if mfd_socks is None:
                device_state, qemu_sections = await self._receive(chan)
            else:
                device_state, qemu_sections = await self._receive_multifd(chan, mfd_socks)
            source_running = True  # a RAM-only stream carries no run state
            runstate = None
            if device_state is not None:
                source_running, vcpu_state = unpack_device_state(device_state)
                vm.vcpus.load_state(vcpu_state)
            if qemu_sections:
                qdev = QemuDeviceState.from_sections(qemu_sections)
                vm.qemu_devices = qdev
                if qdev.runstate is not None:
                    runstate = qdev.runstate
                    source_running = runstate == "running"
            vm.state.goto(S.COMPLETED)
            # QEMU (process_incoming_migration_bh): start only if the source
            # was running (or sent no run state) and autostart is on; other
            # received run states (globalstate: prelaunch, paused...) are
            # taken over as they are.
            if source_running:
                if vm.autostart:
                    await vm.vm_start()
                else:
                    vm.set_runstate("paused")
            else:
                vm.set_runstate(runstate or "paused")
            await self._ack(chan, 0)
        except (MigrationError, OSError, Exception) as exc:  # noqa: BLE001 - any failure -> FAILED
            exc = _leaf(exc)
            if not isinstance(exc, (MigrationError, OSError, ProtocolError)):
                vm.log(f"incoming migration failed with an unexpected error: {exc!r}")
            self.error_desc = error_desc(exc)
            if vm.state.status in (S.SETUP, S.ACTIVE):
                vm.state.goto(S.FAILED)
            if chan is not None:
                await self._ack(chan, 1)
        finally:
            self.counters.total_time_ms = ((time.perf_counter_ns() - self.counters.start_ns) // 1_000_000
                                           if self.counters.start_ns else None)
            if chan is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await chan.aclose()
                    except Exception:
                        pass

    async def _receive_vmdesc(self, chan, dec) -> None:
        """After EOF: the VM description, which the decoder checks against the
        sections it read (a mismatch fails the load).  A source that sends
        none and closes, or stays silent, is accepted with QEMU's warning."""
        with trio.move_on_after(VMDESC_WAIT_S):
            while True:
                event = dec.next_event()
                if event is NEED_DATA:
                    await chan.receive_into(dec)
                    continue
                if isinstance(event, VMDescription):
                    return
                break  # ConnectionClosed
        self.vm.log("Expected vmdescription section, but got none")

    async def _ack(self, chan, status: int) -> None:
        if not _has_return_path(self.uri):
            return
        try:
            await chan.send_all([struct.pack(RP_SHUT_FMT, RP_MSG_SHUT, 4, status)])
        except OSError:
            pass  # the source is gone: nothing to tell it

    async def _receive_multifd(self, chan, socks) -> tuple[bytes | None, list[VMStateSection]]:
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
                result = await self._receive(chan)
                nursery.cancel_scope.cancel()  # the channels wait for a next packet that never comes
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
        finally:
            mfd.close()
        return result

    async def _receive(self, chan) -> tuple[bytes | None, list[VMStateSection]]:
        """Receive the whole stream; returns our device state (or None) and
        QEMU's device sections, in stream order."""
        vm = self.vm
        dec = StreamDecoder(max_block_bytes={b.idstr: b.used_length for b in self.ram.blocks.values()})
        device_state = None
        qemu_sections: list[VMStateSection] = []
        ram_section_id = None
        ram_complete = False
        current = None  # (kind, section_id) of the open section
        active = False
        while True:
            event = dec.next_event()
            if event is NEED_DATA:
                n = await chan.receive_into(dec)
                if n and not active:
                    active = True
                    vm.state.goto(S.ACTIVE)
                continue
            if isinstance(event, StreamHeader):
                continue
            if isinstance(event, Configuration):
                if event.name != MACHINE_NAME:  # QEMU's wording
                    raise MigrationError(f"Machine type received is '{event.name}' and local is '{MACHINE_NAME}'")
                continue
            if isinstance(event, SectionStart):
                if event.idstr != RAM_SECTION or ram_section_id is not None:
                    raise MigrationError(f"Unknown savevm section or instance '{event.idstr}' {event.instance_id}")
                ram_section_id = event.section_id
                current = ("ram", event.section_id)
            elif isinstance(event, (SectionPart, SectionEnd)):
                if event.section_id != ram_section_id or ram_complete:
                    raise MigrationError(f"Unknown section id {event.section_id}")
                current = ("ram", event.section_id)
                if isinstance(event, SectionEnd):
                    ram_complete = True
            elif isinstance(event, SectionFull):
                if any(s.idstr == event.idstr for s in qemu_sections) or (
                        event.idstr == DEVICE_SECTION and device_state is not None):
                    raise MigrationError(f"section '{event.idstr}' {event.instance_id} appears twice")
                current = ("device", event.section_id)
            elif isinstance(event, SectionFooter):
                current = None
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
                if current is None or current[0] != "device":
                    raise MigrationError("device state outside a device section")
                device_state = event.data
            elif isinstance(event, VMStateSection):
                if current is None or current[0] != "device":
                    raise MigrationError("device state outside a device section")
                qemu_sections.append(event)
            elif isinstance(event, ConnectionClosed):
                raise MigrationError("the source closed the stream before its end")
            elif isinstance(event, EndOfStream):
                if not ram_complete:
                    raise MigrationError("stream ended before the final RAM section")
                await self._receive_vmdesc(chan, dec)
                return device_state, qemu_sections
            else:  # pragma: no cover - decoder produced something new
                raise MigrationError(f"unexpected stream event {event!r}")
