"""The switchover decision: when the source stops the guest, and what the downtime will be.

Two rules, chosen by ``x-predictive-switchover`` (ours, off by default):

* QEMU's (``migration_iteration_run``): the estimate of pending bytes is
  replaced by an exact figure (a sync) only when it is at most the
  threshold, and the migration completes when the exact pending is below it;
  threshold = expected_bw x downtime-limit, expected_bw =
  ``avail-switchover-bandwidth`` if set, else the measured bandwidth.
* Predictive: both tests ask whether the *predicted stop-and-copy time* of
  :meth:`SwitchoverModel.predict` fits in downtime-limit, with headroom
  while waiting still helps (see :meth:`SwitchoverModel.fits`).
"""

from __future__ import annotations

import statistics
from collections import deque
from typing import TYPE_CHECKING, Protocol

from memory import TARGET_PAGE_SIZE
from transport.channel import SOCKET_BUFFER_BYTES

from ._history import DowntimePrediction

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._counters import MigrationCounters

__all__ = ["SwitchoverModel", "SwitchoverParams"]

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


class SwitchoverParams(Protocol):
    """The migration parameters the decision reads (they may change mid-migration)."""

    @property
    def downtime_limit(self) -> int: ...  # ms

    @property
    def x_predictive_switchover(self) -> bool: ...

    @property
    def avail_switchover_bandwidth(self) -> int: ...  # bytes/s, 0 = measure


class SwitchoverModel:
    """The downtime model's measurements and the two switchover tests.

    Args:
        params: returns the current parameters (read at every decision).
        counters: the migration's counters (``transferred``, ``threshold_bytes``).
    """

    def __init__(self, params: Callable[[], SwitchoverParams], counters: MigrationCounters,
                 expected_stop_ns: Callable[[], int] = lambda: 0) -> None:
        self._params = params
        self.counters = counters
        #: what stopping the vCPUs would take now (ns; 0 when they do not run)
        self._expected_stop_ns = expected_stop_ns
        #: (bytes/s, whether the window sent PREDICT_MIN_SEND_BYTES)
        self.throughputs: deque[tuple[float, bool]] = deque(maxlen=PREDICT_WINDOWS)
        self.last_sync_ms = 0.0
        self.last_iter_throughput = 0.0
        self._win_send_ns = 0
        self._win_send_bytes = 0

    # -- measurements -------------------------------------------------------------
    def sent(self, spent_ns: int, nbytes: int) -> None:
        """A batch took ``spent_ns`` to find, gather and send ``nbytes``."""
        self._win_send_ns += spent_ns
        self._win_send_bytes += nbytes

    def window_closed(self) -> None:
        """A 100 ms rate-limit window ended: remember its sending throughput."""
        if self._win_send_ns >= PREDICT_MIN_SEND_S * 1e9:
            self.throughputs.append((self._win_send_bytes / (self._win_send_ns / 1e9),
                                     self._win_send_bytes >= PREDICT_MIN_SEND_BYTES))
        self._win_send_ns = 0
        self._win_send_bytes = 0

    def iteration_closed(self, sending_ns: int, throughput_bytes_per_s: float) -> None:
        """An iteration spent ``sending_ns`` sending at this throughput."""
        if sending_ns >= PREDICT_MIN_SEND_S * 1e9:
            self.last_iter_throughput = throughput_bytes_per_s

    # -- decisions ------------------------------------------------------------------
    def predict(self, pending_bytes: int) -> DowntimePrediction | None:
        """The stop-and-copy time if the guest stopped now (None: nothing measured yet).

        Built from what the last stage costs, not from the last window of the
        bulk phase: stopping the vCPUs costs what their controller's
        ``expected_stop_ns()`` says (if they run); the last sync costs what
        the previous one did; the pending pages go at the median sending throughput of the last
        PREDICT_WINDOWS windows (bytes / time spent sending, rate-limit sleeps
        excluded: the last stage is unthrottled, and the receiver sets its
        pace through the socket's back-pressure); then the bytes still in
        the socket buffers drain at that pace and the destination loads the
        device state, resumes and replies (DEFAULT_RESUME_MS).  A user's
        ``avail-switchover-bandwidth`` is trusted over the measurement, as
        QEMU trusts it for its threshold.
        """
        avail = self._params().avail_switchover_bandwidth
        if avail:
            bw = float(avail)
        elif self.throughputs:
            # windows that sent little (zero pages are 9 bytes) say little
            # about bytes/s; use them only when there is nothing else
            full = [t for t, enough in self.throughputs if enough]
            bw = statistics.median(full or [t for t, _ in self.throughputs])
        elif self.last_iter_throughput:
            # no window completed yet (a migration shorter than 100 ms): the
            # last iteration's sending
            bw = self.last_iter_throughput
        else:
            return None
        pages = pending_bytes // TARGET_PAGE_SIZE
        last_pages_ms = pages * LAST_STAGE_BYTES_PER_PAGE / bw * 1000
        inflight = min(self.counters.transferred + pages * LAST_STAGE_BYTES_PER_PAGE, INFLIGHT_BYTES)
        tail_ms = inflight / bw * 1000 + DEFAULT_RESUME_MS
        stop_ms = self._expected_stop_ns() / 1e6  # the stop itself, as the controller measured it
        return DowntimePrediction(
            pending_bytes=pending_bytes, bytes_per_page=float(LAST_STAGE_BYTES_PER_PAGE),
            throughput_bytes_per_s=bw, final_sync_ms=self.last_sync_ms,
            last_pages_ms=last_pages_ms, tail_ms=tail_ms, stop_vcpus_ms=stop_ms,
            total_ms=stop_ms + self.last_sync_ms + last_pages_ms + tail_ms)

    def may_sync(self, pending: int) -> bool:
        """Whether the estimate is low enough to be replaced by an exact figure (a sync).

        QEMU: ``pending <= threshold``.  x-predictive-switchover: the predicted
        stop-and-copy time of the estimate is at most downtime-limit.
        """
        params = self._params()
        if params.x_predictive_switchover:
            pred = self.predict(pending)
            return not pending or (pred is not None and pred.total_ms <= params.downtime_limit)
        return pending <= self.counters.threshold_bytes

    def fits(self, pending: int, previous_remaining: int | None) -> bool:
        """The switchover test on the exact ``pending`` right after a sync.

        QEMU (default): ``pending < threshold`` (or nothing pending).  With
        ``x-predictive-switchover``: predicted stop-and-copy time <=
        PREDICT_HEADROOM x downtime-limit, or <= downtime-limit once the
        previous sync's remaining did not shrink by PREDICT_STALL (never
        before a throughput was measured).
        """
        if not pending:
            return True
        params = self._params()
        if not params.x_predictive_switchover:
            return pending < self.counters.threshold_bytes
        pred = self.predict(pending)
        if pred is None:
            return False
        limit = params.downtime_limit
        if pred.total_ms <= PREDICT_HEADROOM * limit:
            return True
        stalled = previous_remaining is not None and pending >= (1 - PREDICT_STALL) * previous_remaining
        return stalled and pred.total_ms <= limit
