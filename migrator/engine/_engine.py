"""The pre-copy engine: QEMU's migration thread, source and destination.

Source (:class:`OutgoingMigration`) follows migration/migration.c:

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
  :meth:`OutgoingMigration._predict_downtime`.
* switchover: downtime starts, vCPUs stop, ACTIVE -> DEVICE, last-stage sync,
  every remaining page (unthrottled), the device section (vCPU/workload
  state, unless ``x-ram-only``), EOF, then the hand-over on the return path
  (below); COMPLETED.
* cancel (``migrate_cancel``) -> CANCELLING -> CANCELLED; any error ->
  FAILED.  Before the point of no return (below) the source stops dirty
  logging and resumes its vCPUs if they were running: it keeps running with
  its memory intact (the engine only ever *reads* source RAM).

Destination (:class:`IncomingMigration`): SETUP when listening, ACTIVE on
the first byte; nothing is loaded into a vCPU, acknowledged or resumed
before the whole stream through EOF was received and every section
validated (:func:`migrator.engine._devstate.validate_device_state`); on any error
the destination is FAILED, acknowledges SHUT(1) and its vCPUs never run.

Who owns the guest
==================

Rule: **at most one side runs the guest at any moment.**  There are states
in which *neither* may run it: the source in ``postmigrate`` (it committed
to never run the guest again, or it cannot know whether the destination
runs it), and a destination that loaded the guest but was not told it owns
it.  Zero running copies happens only when the outcome is truly unknown;
then the operator decides, with ``cont`` on exactly one side.

The source has one explicit point of no return, and the destination never
runs before the source has passed it:

* **With ``x-handover``** (set on both sides, as QEMU users set
  ``return-path``): the destination validates everything through EOF, loads
  the state, sends ``MIG_RP_MSG_X_LOADED(stream bytes)`` and waits, paused.
  The source, on LOADED (whose byte count must equal what it sent),
  **commits first** (``_committed``: COMPLETED, ``postmigrate``) and only
  then sends ``GO``; the destination, on GO, resumes (if autostart and the
  source was running) and sends SHUT(0).  Before GO is on the wire, any
  failure, timeout, cancel, negative or garbled acknowledgement or loss lets
  the source resume, and it tells a waiting destination ``NOGO`` when it
  still can; the destination cannot run without GO.  After GO is on the
  wire the source never resumes by itself, whatever happens next (cancel is
  a no-op then).  A destination whose GO never comes (closed, timed out,
  half a GO, a GO for another byte count) stays paused, FAILED with an
  error-desc saying so; its state is complete, so ``cont`` there starts it:
  the operator's decision, after checking that the source is not running.
  This "GO sent, fate unknown" is the only zero-copies outcome.
* **Without it** (a peer that speaks QEMU's return path only): the
  destination may run as soon as it has the whole stream (QEMU's
  ``process_incoming_migration_bh`` starts the guest, then
  ``migration_incoming_state_destroy`` sends SHUT), so the point of no
  return is the moment the EOF byte was handed to the socket
  (``_dest_may_run``).  A send that failed before it proves the destination
  cannot have the stream: resume.  After it: SHUT(0) -> COMPLETED,
  ``postmigrate``; SHUT(non-zero) -> the destination said it will not run
  -> FAILED, resume; no acknowledgement (closed, reset, garbled, or later
  than ``x-return-path-timeout``) or a cancel -> the outcome is unknown:
  FAILED, the guest stays paused in ``postmigrate`` and error-desc says the
  operator must decide.  Never a silent resume.
* **No return path** (``file:``, or ``x-ram-only`` to a stock QEMU, which
  opens none by default): COMPLETED and ``postmigrate`` once EOF is written,
  as QEMU.

QEMU 7.2 for comparison (migration/migration.c): ``migration_completion``
joins the return-path thread in ``await_return_path_close_on_source``
without any timeout (a late SHUT is simply waited for); a return path that
errors or closes before SHUT (``mark_source_rp_bad``) fails the migration
and ``migration_iteration_finish`` then calls ``vm_start()`` on the source
although the destination may already run the guest: that is the unsafe case
this engine refuses.  Without the ``return-path`` capability QEMU ends in
``postmigrate`` after EOF, which is what we do without a return path.  Our
timeouts are migration parameters (``x-return-path-timeout``, ms, both
sides); expiry decides as above and never resumes a guest the peer may run.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from memory import GLOBAL_DIRTY_MIGRATION, TARGET_PAGE_SIZE
from transport import (MIG_CMD_X_GO, MIG_CMD_X_NOGO, MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED, NEED_DATA,
                       Configuration, ConnectionClosed, DeviceState, EndOfStream, Message, MessageDecoder,
                       ProtocolError, RamEOS, RamMemSize, RamPages, RamZeroPages, RateLimiter,
                       SectionEnd, SectionFooter, SectionFull, SectionPart, SectionStart,
                       StreamDecoder, StreamEncoder, StreamHeader, VMDescription, VMStateSection, encode_go,
                       encode_loaded, encode_nogo, encode_shut, listen_channel, open_channel)
from transport._vmstate import KNOWN_SECTIONS
from transport.channel import SOCKET_BUFFER_BYTES

from . import _multifd
from ._devstate import validate_device_state
from ._history import (DestinationTimeline, DowntimeBreakdown, DowntimePrediction, IterationRecord,
                       MigrationHistory)
from ._qemu_devices import QemuDeviceState
from ._ram import RAMLoadState, RAMSaveState
from ._seams import DestinationVM, MigrationParametersView, SourceVM
from ._status import MigrationStatus as S
from ..errors import MigrationError

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
#: Downtime model (x-predictive-switchover and the predicted-downtime column):
#: sending windows whose throughput is remembered; the prediction takes their
#: median (one slow or fast window is noise; the headroom below absorbs it).
PREDICT_WINDOWS = 5
#: ... a window counts only with at least this much sending in it (a window
#: of QEMU's default 128 MiB/s sends its 12.8 MiB in ~10 ms here), and is
#: preferred when it sent at least this many bytes
PREDICT_MIN_SEND_S = 0.001
PREDICT_MIN_SEND_BYTES = 1 << 20
#: a page in the last stage: the page and its be64 offset|flags header
#: (RAM_SAVE_FLAG_CONTINUE: no block name); a conservative guess since a
#: zero page costs 9 bytes
LAST_STAGE_BYTES_PER_PAGE = TARGET_PAGE_SIZE + 8
#: destination load + resume + return-path reply before one was measured
#: (2-3 ms on this machine for the sim accelerator, tcp and unix)
DEFAULT_RESUME_MS = 3.0
#: bytes still to drain when the source has written its last one.  Up to
#: SO_SNDBUF + the peer's SO_RCVBUF can be in flight, but measured (1 GiB
#: bulk, tcp and unix, 1-1.4 GB/s) drain + resume + reply took 1.3-6.6 ms,
#: which one buffer's worth plus DEFAULT_RESUME_MS matches.
INFLIGHT_BYTES = SOCKET_BUFFER_BYTES
#: x-predictive-switchover: switch at once when the prediction is at most
#: this fraction of downtime-limit; between it and the limit only when
#: waiting no longer helps (pending shrank by less than PREDICT_STALL since
#: the previous sync), so a pass that is still draining pending buys the
#: headroom that a slower last stage would need.
PREDICT_HEADROOM = 0.75
PREDICT_STALL = 0.10
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
    #: expected_bw_per_ms of the last migration_update_counters (the threshold's)
    switchover_bandwidth_bytes_per_ms: float = 0.0
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

    ``vm``: see :class:`~migrator.engine._seams.SourceVM`.
    """

    def __init__(self, vm: SourceVM, uri: str) -> None:
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
        self._iter_send_ns = 0
        self._prev_sync_ns: int | None = None
        self._vcpu_written_prev: list[int] | None = None
        # downtime model inputs (see _predict_downtime)
        self._win_send_ns = 0
        self._win_send_bytes = 0
        #: (bytes/s, whether the window sent PREDICT_MIN_SEND_BYTES)
        self._throughputs: deque[tuple[float, bool]] = deque(maxlen=PREDICT_WINDOWS)
        self._last_sync_ms = 0.0
        self._last_iter_throughput = 0.0
        self._prediction: DowntimePrediction | None = None
        # ownership (see the essay): sockets carry a return path, files do not;
        # x-ram-only streams go to stock QEMU, which opens none by default.
        self._return_path = _has_return_path(uri) and not self.caps.x_ram_only
        self._handover_cap = False
        self._eof_sent = False
        self._committed = False  #: the destination owns the guest; we never run it again
        self._dest_may_run = False  #: the destination may run it (without our word)
        self._handover_note = ""
        self._multifd: _multifd.MultifdSender | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    @property
    def params(self) -> MigrationParametersView:
        """Current parameters: QEMU lets migrate-set-parameters act mid-migration."""
        return self.vm.params

    # -- public -------------------------------------------------------------
    def cancel(self) -> None:
        """``migrate_cancel``: CANCELLING now, CANCELLED when the task ends."""
        state = self.vm.state
        if self._committed:
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
        mode = getattr(getattr(vm, "kvm_listener", None), "mode", None)
        self.ram = RAMSaveState(vm.ms, vm.ram_blocks(),
                                clear_bitmap_shift=self.params.x_clear_bitmap_shift,
                                log_keeps_bits=getattr(mode, "value", None) == "manual-protect")
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
        vcpu_rates = self._vcpu_write_rates(interval_ms)
        if not last_stage:
            self._last_sync_ms = result.sync_ns / 1e6
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
        prediction = self._predict_downtime(ram.pending_bytes)
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

    def _vcpu_write_rates(self, interval_ms: float) -> list[float]:
        """Pages each vCPU wrote since the previous sync / the interval.

        From the vCPU controller's statistics: a ``"vcpus"`` list of per-vCPU
        dicts with ``pages-written`` (or ``pages_written``), or one
        ``pages_written`` for a single vCPU; [] if it counts nothing.
        """
        try:
            st = self.vm.vcpus.statistics()
        except Exception:  # noqa: BLE001 - statistics are best effort
            return []
        per = st if isinstance(st, list) else st.get("vcpus") if isinstance(st, dict) else None
        if isinstance(per, list) and per:
            values = [v.get("pages-written", v.get("pages_written")) if isinstance(v, dict) else None
                      for v in per]
        elif isinstance(st, dict):
            values = [st.get("pages_written")]
        else:
            values = [None]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return []  # a vCPU that does not count (e.g. a real-KVM program other than ab)
        written = [int(v) for v in values]
        prev, self._vcpu_written_prev = self._vcpu_written_prev, written
        if prev is None or len(prev) != len(written) or interval_ms <= 0:
            return []
        return [(w - p) * 1000 / interval_ms for w, p in zip(written, prev)]

    def _expected_bw_ms(self) -> float:
        """QEMU's expected_bw_per_ms: avail-switchover-bandwidth if set, else the estimate."""
        avail = self.params.avail_switchover_bandwidth
        return avail / 1000 if avail else self.counters.bandwidth_bytes_per_ms

    def _predict_downtime(self, pending_bytes: int) -> DowntimePrediction | None:
        """The stop-and-copy time if the guest stopped now (None: nothing measured yet).

        Built from what the last stage costs, not from the last window of the
        bulk phase: stopping the vCPUs costs what their controller's
        ``expected_stop_ns()`` says (if they run); the last sync costs what
        the previous one did; the
        pending pages go at the median sending throughput of the last
        PREDICT_WINDOWS windows (bytes / time spent sending, rate-limit sleeps
        excluded: the last stage is unthrottled, and the receiver sets its
        pace through the socket's back-pressure); then the bytes still in
        the socket buffers drain at that pace and the destination loads the
        device state, resumes and replies (DEFAULT_RESUME_MS).  A user's
        ``avail-switchover-bandwidth`` is trusted over the measurement, as
        QEMU trusts it for its threshold.
        """
        avail = self.params.avail_switchover_bandwidth
        if avail:
            bw = float(avail)
        elif self._throughputs:
            # windows that sent little (zero pages are 9 bytes) say little
            # about bytes/s; use them only when there is nothing else
            full = [t for t, enough in self._throughputs if enough]
            bw = statistics.median(full or [t for t, _ in self._throughputs])
        elif self._last_iter_throughput:
            # no window completed yet (a migration shorter than 100 ms): the
            # last iteration's sending
            bw = self._last_iter_throughput
        else:
            return None
        pages = pending_bytes // TARGET_PAGE_SIZE
        last_pages_ms = pages * LAST_STAGE_BYTES_PER_PAGE / bw * 1000
        inflight = min(self.counters.transferred + pages * LAST_STAGE_BYTES_PER_PAGE, INFLIGHT_BYTES)
        tail_ms = inflight / bw * 1000 + DEFAULT_RESUME_MS
        # the stop itself: what the vCPU controller measured its stops take
        vcpus = getattr(self.vm, "vcpus", None)
        expected_stop = getattr(vcpus, "expected_stop_ns", None)
        running = bool(getattr(vcpus, "running", False))
        stop_ms = expected_stop() / 1e6 if expected_stop is not None and running else 0.0
        return DowntimePrediction(
            pending_bytes=pending_bytes, bytes_per_page=float(LAST_STAGE_BYTES_PER_PAGE),
            throughput_bytes_per_s=bw, final_sync_ms=self._last_sync_ms,
            last_pages_ms=last_pages_ms, tail_ms=tail_ms, stop_vcpus_ms=stop_ms,
            total_ms=stop_ms + self._last_sync_ms + last_pages_ms + tail_ms)

    def _may_sync(self, pending: int) -> bool:
        """Whether the estimate is low enough to be replaced by an exact figure (a sync).

        QEMU: ``pending <= threshold``.  x-predictive-switchover: the predicted
        stop-and-copy time of the estimate is at most downtime-limit.
        """
        if self.params.x_predictive_switchover:
            pred = self._predict_downtime(pending)
            return not pending or (pred is not None and pred.total_ms <= self.params.downtime_limit)
        return pending <= self.counters.threshold_bytes

    def _fits(self, pending: int, previous_remaining: int | None) -> bool:
        """The switchover test on the exact ``pending`` right after a sync.

        QEMU (default): ``pending < threshold`` (or nothing pending).  With
        ``x-predictive-switchover``: predicted stop-and-copy time <=
        PREDICT_HEADROOM x downtime-limit, or <= downtime-limit once the
        previous sync's remaining did not shrink by PREDICT_STALL (never
        before a throughput was measured).
        """
        if not pending:
            return True
        if not self.params.x_predictive_switchover:
            return pending < self.counters.threshold_bytes
        pred = self._predict_downtime(pending)
        if pred is None:
            return False
        limit = self.params.downtime_limit
        if pred.total_ms <= PREDICT_HEADROOM * limit:
            return True
        stalled = previous_remaining is not None and pending >= (1 - PREDICT_STALL) * previous_remaining
        return stalled and pred.total_ms <= limit

    def _close_iteration_record(self) -> None:
        rec = self._iteration_record
        if rec is None:
            return
        c = self.counters
        rec.bytes = c.transferred - self._iter_bytes0
        rec.sending_ms = self._iter_send_ns / 1e6
        rec.throughput_bytes_per_s = rec.bytes / (self._iter_send_ns / 1e9) if self._iter_send_ns else 0.0
        if self._iter_send_ns >= PREDICT_MIN_SEND_S * 1e9:
            self._last_iter_throughput = rec.throughput_bytes_per_s
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
        expected_bw = self._expected_bw_ms()
        c.switchover_bandwidth_bytes_per_ms = expected_bw
        c.threshold_bytes = int(expected_bw * self.params.downtime_limit)
        c.mbps = lim.bandwidth_bytes_per_s * 8 / 1e6
        c.pages_per_second = self._window_pages * 1000 / spent_ms
        if c.dirty_pages_rate and c.transferred > 10000 and expected_bw:
            c.expected_downtime_ms = int(c.dirty_bytes_last_sync / expected_bw)
        self._window_t0 = now
        self._window_pages = 0
        # the downtime model's sample of this window (see _predict_downtime)
        if self._win_send_ns >= PREDICT_MIN_SEND_S * 1e9:
            self._throughputs.append((self._win_send_bytes / (self._win_send_ns / 1e9),
                                      self._win_send_bytes >= PREDICT_MIN_SEND_BYTES))
        self._win_send_ns = 0
        self._win_send_bytes = 0

    async def _rate_limit(self) -> None:
        """migration_rate_limit: sleep to the end of a spent window, then count."""
        self._limiter.set_rate(self.params.max_bandwidth)  # may change mid-migration
        await self._limiter.wait_for_budget()
        self._update_counters()

    # -- iterations -----------------------------------------------------------
    async def _iterate_until_converged(self) -> None:
        c, ram = self.counters, self.ram
        # The decision is taken right after a sync, on that sync's exact
        # pending, and marked on its row; the row's threshold-bytes is the
        # one this test used.
        while True:
            self._update_counters()
            pending = ram.pending_bytes
            synced = False
            previous = self._iteration_record.remaining_bytes if self._iteration_record else None
            if self._may_sync(pending):
                self._sync()
                synced = True
                pending = ram.pending_bytes
            elif (self.caps.auto_converge and c.dirty_sync_count > 1
                  and time.perf_counter_ns() - self._last_sync_ns > PERIODIC_SYNC_S * 1e9):
                self._sync()
                synced = True
                pending = ram.pending_bytes
            if synced and self._fits(pending, previous):
                self._iteration_record.switchover = True
                self._prediction = self._predict_downtime(pending)
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
            spent = time.perf_counter_ns() - t0
            self._iter_send_ns += spent
            self._win_send_ns += spent
            self._win_send_bytes += c.transferred - b0

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
        if not native:
            # x-ram-only and QEMU's device sections go to a stock QEMU, which
            # opens no return path without its return-path capability: the
            # EOF byte is the point of no return (QEMU's postmigrate).
            self._return_path = False
        self._handover_cap = self.caps.x_handover and self._return_path
        if not self._handover_cap:
            # Without our hand-over, a destination that has the whole stream
            # may run: from the moment the EOF byte is on the wire the
            # source can no longer know the guest is its own (see the essay).
            self._dest_may_run = True
        # EOF, then QEMU's JSON description of every section written
        await self._send(enc.eof() + enc.vmdescription())
        self._eof_sent = True
        if not self._return_path:
            self._committed = True  # QEMU without a return path: completed, postmigrate
        t4 = time.perf_counter_ns()
        bd.device_state_ms = (t4 - t3) / 1e6
        if self._return_path:
            await self._handover()
        t5 = time.perf_counter_ns()
        bd.destination_resume_ms = (t5 - t4) / 1e6
        bd.total_ms = (t5 - t0) / 1e6
        c.downtime_ms = int(round(bd.total_ms))
        c.history.downtime = bd
        c.history.downtime_prediction = self._prediction

    async def _rp_message(self, dec: MessageDecoder, timeout_s: float) -> Message | str:
        """The next return-path message, or why none came (closed, timeout, garbage)."""
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    msg = dec.next_message()
                except ProtocolError as exc:
                    return f"the destination sent an invalid return-path message: {exc}"
                if isinstance(msg, Message):
                    return msg
                if msg is not NEED_DATA:
                    return "the destination closed the return path before acknowledging the migration"
                try:
                    data = await self._chan.receive_some(4096)
                except OSError as exc:
                    return f"the return path failed: {error_desc(exc)}"
                dec.receive_data(data)
        return f"no acknowledgement from the destination within x-return-path-timeout ({self.params.x_return_path_timeout} ms)"

    async def _handover(self) -> None:
        """After EOF: the return-path exchange that decides who owns the guest.

        With ``x-handover`` (both sides): wait for LOADED, commit, send GO,
        then wait (bounded) for the destination's final SHUT(0).  Without
        it: wait for QEMU's SHUT.  Every outcome is recorded in
        ``_committed`` / ``_dest_may_run``; :meth:`_finish` acts on them.
        """
        timeout_s = self.params.x_return_path_timeout / 1000
        accept = {MIG_RP_MSG_SHUT, MIG_RP_MSG_X_LOADED}
        dec = MessageDecoder(accept)
        first = await self._rp_message(dec, timeout_s)
        if isinstance(first, str):
            # Lost, late, garbled.  With x-handover the destination cannot run
            # without GO: _finish resumes us.  Without it, it may be running:
            # _dest_may_run is set and _finish leaves the guest paused.
            raise MigrationError(first)
        if first.type == MIG_RP_MSG_SHUT:
            if first.value != 0:
                # QEMU's SHUT(1): the destination failed and will not run.
                self._dest_may_run = False
                raise MigrationError(f"destination failed to load the migration (status {first.value})")
            self._committed = True  # SHUT(0): it loaded and runs (a peer without x-handover)
            return
        # MIG_RP_MSG_X_LOADED: the destination is loaded, paused, waiting for us.
        if not self._handover_cap:
            self._dest_may_run = False  # it waits for a GO we will never send
            raise MigrationError("the destination uses x-handover (it waits for the go-ahead); "
                                 "set the capability on both sides")
        sent = self._chan.bytes_sent
        if first.value != sent:
            raise MigrationError(f"destination loaded {first.value} stream bytes, the source sent {sent}")
        # The point of no return: commit first, then tell the destination.
        # Once GO may be on the wire the source never resumes by itself.
        self._committed = True
        self._dest_may_run = True
        try:
            await self._chan.send_all([encode_go(sent)])
        except OSError as exc:
            self.vm.log(f"sending the go-ahead failed ({error_desc(exc)}): the guest stays paused here; "
                        "the destination runs it only if it got the go-ahead")
            self._handover_note = "go-ahead not confirmed"
            return
        final = await self._rp_message(dec, timeout_s)
        if isinstance(final, Message) and final.type == MIG_RP_MSG_SHUT and final.value == 0:
            self._handover_note = "destination confirmed"
        else:
            why = final if isinstance(final, str) else f"destination reported status {final.value}"
            self._handover_note = "go-ahead not confirmed"
            self.vm.log(f"go-ahead sent but not confirmed ({why}); the source stays paused (postmigrate)")

    # -- end --------------------------------------------------------------------
    async def _tell_nogo(self) -> None:
        """Best effort: a destination waiting for GO learns it must not run."""
        if self._chan is None or not self._handover_cap or not self._eof_sent or self._committed:
            return
        with trio.move_on_after(NOGO_SEND_S):
            try:
                await self._chan.send_all([encode_nogo()])
            except OSError:
                pass

    async def _finish(self, error: BaseException | None) -> None:
        """Decide the source's fate (the ordering rule of the essay).

        1. ``_committed``: the destination owns the guest (GO sent, SHUT(0)
           received, or no return path): COMPLETED, ``postmigrate``; cancel
           or errors after that point change nothing.
        2. ``_dest_may_run`` without commit: the destination may be running
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
        if self._committed:
            if error is not None:
                vm.log(f"after the hand-over: {error_desc(error)}")
            vm.state.goto(S.COMPLETED)
            vm.set_runstate("postmigrate")
        elif self._dest_may_run:
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


class IncomingMigration:
    """One incoming migration: receive, validate, load; resume only at the end."""

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
        self._stream_bytes = 0
        self._trailing = b""
        self._mfd: _multifd.MultifdReceiver | None = None

    def _stamp(self, name: str) -> None:
        setattr(self.timeline, name, time.time() * 1000)

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
            try:
                if vm.caps.multifd:
                    if not self.uri.startswith(("tcp:", "unix:")):
                        await listener.aclose()
                        raise MigrationError("multifd needs a tcp: or unix: incoming URI")
                    chan, mfd_socks = await _multifd.accept_channels(listener, vm.params.multifd_channels)
                else:
                    async with listener:
                        chan = await listener.accept()
            except (MigrationError, OSError, ProtocolError, BaseExceptionGroup) as exc:
                # e.g. a multifd channel's handshake is garbage: failed, never runs
                exc = _leaf(exc)
                if isinstance(exc, trio.Cancelled):
                    raise
                self._fail(exc)
                return
            self._stamp("accepted_unix_ms")
            await self.process(chan, mfd_socks)
        finally:
            if chan is not None:
                with trio.CancelScope(shield=True):
                    try:
                        await chan.aclose()
                    except Exception:
                        pass

    async def process(self, chan, mfd_socks=None) -> None:
        """Receive, validate and load the stream from ``chan``, then hand over.

        Ordering rule: nothing is acknowledged, loaded into a vCPU or resumed
        before the whole stream through EOF was received and every section
        validated; with ``x-handover`` the vCPUs run only after the source's
        GO, which it sends only after it committed to never run again.
        """
        vm = self.vm
        handover = vm.caps.x_handover and _has_return_path(self.uri)
        self.counters.start_ns = time.perf_counter_ns()
        loaded = False
        try:
            if mfd_socks is None:
                device_state, qemu_sections = await self._receive(chan)
            else:
                device_state, qemu_sections = await self._receive_multifd(chan, mfd_socks)
            self._stamp("stream_received_unix_ms")
            source_running = True  # a RAM-only stream carries no run state
            runstate = None
            if device_state is not None:
                payload, offset = device_state
                machine = vm.machine
                valid = validate_device_state(payload, offset=offset, accel=machine.accel.kind,
                                              npages=machine.ram_block.used_length // TARGET_PAGE_SIZE,
                                              nvcpus=machine.smp)
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
        except (MigrationError, OSError, Exception) as exc:  # noqa: BLE001 - any failure -> FAILED
            exc = _leaf(exc)
            if not isinstance(exc, (MigrationError, OSError, ProtocolError)):
                vm.log(f"incoming migration failed with an unexpected error: {exc!r}")
            self._fail(exc)
            await self._ack(chan, encode_shut(1))
        if loaded and handover:
            loaded = await self._wait_for_go(chan)
        if loaded:
            vm.state.goto(S.COMPLETED)
            # QEMU (process_incoming_migration_bh): start only if the source
            # was running (or sent no run state) and autostart is on; other
            # received run states (globalstate: prelaunch, paused...) are
            # taken over as they are.  Then migration_incoming_state_destroy
            # sends SHUT(0).
            if source_running and vm.autostart:
                await vm.vm_start()
                self._stamp("resumed_unix_ms")
            else:
                vm.set_runstate("paused" if source_running else (runstate or "paused"))
            if not handover:
                self._stamp("acknowledged_unix_ms")  # just before the reply goes out
            await self._ack(chan, encode_shut(0))
        self.counters.total_time_ms = (time.perf_counter_ns() - self.counters.start_ns) // 1_000_000

    def _fail(self, exc: BaseException | str) -> None:
        self.error_desc = exc if isinstance(exc, str) else error_desc(exc)
        if self.vm.state.status in (S.SETUP, S.ACTIVE):
            self.vm.state.goto(S.FAILED)

    async def _wait_for_go(self, chan) -> bool:
        """x-handover: LOADED, then wait, paused, for the source's word."""
        self.handover = "waiting-for-go"
        self._stamp("acknowledged_unix_ms")  # LOADED is the acknowledgement the source waits for
        await self._ack(chan, encode_loaded(self._stream_bytes))
        timeout_s = self.vm.params.x_return_path_timeout / 1000
        dec = MessageDecoder({MIG_CMD_X_GO, MIG_CMD_X_NOGO}, skip_vmdesc=True, base=self._stream_bytes)
        if self._trailing:  # bytes read past EOF with the stream (b"" would mean EOF)
            dec.receive_data(self._trailing)
        why = f"no go-ahead from the source within x-return-path-timeout ({timeout_s * 1000:.0f} ms)"
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    msg = dec.next_message()
                except ProtocolError as exc:
                    why = f"invalid hand-over message from the source: {exc}"
                    break
                if isinstance(msg, Message):
                    if msg.type == MIG_CMD_X_GO and msg.value == self._stream_bytes:
                        self.handover = "go"
                        return True
                    if msg.type == MIG_CMD_X_GO:
                        why = f"go-ahead for {msg.value} stream bytes, {self._stream_bytes} were received"
                        break
                    self.handover = "nogo"
                    self._fail("the source kept the guest (it resumes): this destination never runs it")
                    return False
                if msg is not NEED_DATA:
                    why = "the source closed the connection without a go-ahead"
                    break
                try:
                    data = await chan.receive_some(4096)
                except OSError as exc:
                    why = f"the connection to the source failed before the go-ahead: {error_desc(exc)}"
                    break
                dec.receive_data(data)
        # The guest is loaded and valid, but the source never said whether it
        # committed: it may be running.  Stay paused; the operator decides.
        self.handover = "no-go-ahead"
        self.undecided = True
        self._fail(f"{why}; the guest is loaded and stays paused: if the source is not running "
                   "(postmigrate), 'cont' here starts it")
        self.vm.set_runstate("paused")
        return False

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

    async def _ack(self, chan, message: bytes) -> None:
        if not _has_return_path(self.uri):
            return
        try:
            await chan.send_all([message])
        except OSError:
            pass  # the source is gone: nothing to tell it

    async def _receive_multifd(self, chan, socks) -> tuple[tuple[bytes, int] | None, list[VMStateSection]]:
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

    async def _receive(self, chan) -> tuple[tuple[bytes, int] | None, list[VMStateSection]]:
        """Receive the whole stream and its VM description; returns our device
        state with its stream offset (or None) and QEMU's device sections, in
        stream order."""
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
                    self._stamp("first_byte_unix_ms")
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
                device_state = (event.data, dec.stream_offset - len(event.data))
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
                # LOADED and GO count every byte of the main channel, the VM
                # description included (the source's bytes_sent)
                self._stream_bytes = dec.stream_offset
                self._trailing = dec.trailing_data[0]
                return device_state, qemu_sections
            else:  # pragma: no cover - decoder produced something new
                raise MigrationError(f"unexpected stream event {event!r}")
