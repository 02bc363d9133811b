"""Convergence: the source's 100 ms windows, auto-converge and the per-vCPU write rates.

* :class:`RateWindows`: QEMU's ``migration_rate_limit`` and
  ``migration_update_counters``: one rate limiter whose 100 ms windows also
  give the bandwidth estimate, the switchover threshold and expected-downtime.

* :class:`AutoConverge`: QEMU's ``migration_trigger_throttle`` and
  ``mig_throttle_guest_down`` (migration/ram.c): at the end of every dirty-rate
  period (>= 1 s between syncs), if the guest dirtied more than
  ``throttle-trigger-threshold`` % of what was sent in it, twice in a row,
  the vCPU throttle goes up (``cpu-throttle-initial``, then by
  ``cpu-throttle-increment``, or less with ``cpu-throttle-tailslow``).
* :class:`VcpuWriteRates`: pages each vCPU wrote between two syncs (the
  history's per-vCPU columns), from the vCPU controller's statistics.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from transport import RateLimiter

if TYPE_CHECKING:
    from collections.abc import Callable

    from memory.kvm import VCPUControllerStatistics

    from ._counters import MigrationCounters
    from ._switchover import SwitchoverModel

__all__ = ["AutoConverge", "RateParams", "RateWindows", "ThrottleParams", "VcpuStatistics", "VcpuWriteRates"]


class RateParams(Protocol):
    """The parameters the windows read (they may change mid-migration)."""

    @property
    def max_bandwidth(self) -> int: ...  # bytes/s, 0 = unlimited

    @property
    def downtime_limit(self) -> int: ...  # ms

    @property
    def avail_switchover_bandwidth(self) -> int: ...  # bytes/s, 0 = measure


class RateWindows:
    """The rate limit and, once per completed window, the counters built on it.

    Args:
        params: returns the current parameters.
        counters: what ``query-migrate`` reports; updated in place.
        switchover: told when a window closes (its sending throughput sample).
    """

    def __init__(self, params: Callable[[], RateParams], counters: MigrationCounters,
                 switchover: SwitchoverModel) -> None:
        self._params = params
        self._counters = counters
        self._switchover = switchover
        self.limiter = RateLimiter(0)
        self._counted = 0
        self._t0 = time.perf_counter_ns()
        #: pages sent in the current window (QEMU's pages-per-second)
        self.pages = 0

    def start(self) -> None:
        """The migration starts: the first window opens now."""
        self.limiter = RateLimiter(self._params().max_bandwidth)
        self._t0 = time.perf_counter_ns()

    def expected_bw_ms(self) -> float:
        """QEMU's expected_bw_per_ms: avail-switchover-bandwidth if set, else the estimate."""
        avail = self._params().avail_switchover_bandwidth
        return float(avail / 1000 if avail else self._counters.bandwidth_bytes_per_ms)

    def update(self) -> None:
        """Once per completed 100 ms window: bandwidth, threshold, expected downtime."""
        c, lim = self._counters, self.limiter
        windows = lim.statistics().windows
        if windows == self._counted:
            return
        self._counted = windows
        now = time.perf_counter_ns()
        spent_ms = max((now - self._t0) / 1e6, 1e-3)
        c.bandwidth_bytes_per_ms = lim.bandwidth_bytes_per_s / 1000
        expected_bw = self.expected_bw_ms()
        c.switchover_bandwidth_bytes_per_ms = expected_bw
        c.threshold_bytes = int(expected_bw * self._params().downtime_limit)
        c.mbps = lim.bandwidth_bytes_per_s * 8 / 1e6
        c.pages_per_second = self.pages * 1000 / spent_ms
        if c.dirty_pages_rate and c.transferred > 10000 and expected_bw:
            c.expected_downtime_ms = int(c.dirty_bytes_last_sync / expected_bw)
        self._t0 = now
        self.pages = 0
        self._switchover.window_closed()  # the downtime model's sample of this window

    async def rate_limit(self) -> None:
        """migration_rate_limit: sleep to the end of a spent window, then count."""
        self.limiter.set_rate(self._params().max_bandwidth)  # may change mid-migration
        await self.limiter.wait_for_budget()
        self.update()


class ThrottleParams(Protocol):
    """The auto-converge parameters (QEMU's names, snake_case)."""

    @property
    def throttle_trigger_threshold(self) -> int: ...

    @property
    def cpu_throttle_initial(self) -> int: ...

    @property
    def cpu_throttle_increment(self) -> int: ...

    @property
    def cpu_throttle_tailslow(self) -> bool: ...

    @property
    def max_cpu_throttle(self) -> int: ...


class VcpuStatistics(Protocol):
    """A vCPU controller, as far as its counters go."""

    def statistics(self) -> VCPUControllerStatistics: ...


class AutoConverge:
    """The throttle decision at the end of each dirty-rate period."""

    def __init__(self) -> None:
        self._dirty_rate_high_cnt = 0

    def next_throttle(self, params: ThrottleParams, current_pct: int, *, bytes_xfer_period: int,
                      bytes_dirty_period: int) -> int | None:
        """The new throttle percentage, or None to leave it as it is."""
        bytes_dirty_threshold = bytes_xfer_period * params.throttle_trigger_threshold / 100
        if bytes_dirty_period <= bytes_dirty_threshold:
            return None
        self._dirty_rate_high_cnt += 1
        if self._dirty_rate_high_cnt < 2:
            return None
        self._dirty_rate_high_cnt = 0
        if current_pct == 0:
            new = params.cpu_throttle_initial
        elif params.cpu_throttle_tailslow:
            # QEMU: throttle_inc = min(increment, cpu_now - cpu_now*threshold/dirty)
            cpu_now = 100 - current_pct
            cpu_ideal = cpu_now * (bytes_dirty_threshold / bytes_dirty_period)
            inc = min(params.cpu_throttle_increment, int(cpu_now - cpu_ideal))
            new = current_pct + max(inc, 1)
        else:
            new = current_pct + params.cpu_throttle_increment
        return max(1, min(new, params.max_cpu_throttle, 99))


class VcpuWriteRates:
    """Pages each vCPU wrote since the previous sample / the interval."""

    def __init__(self) -> None:
        self._prev: list[int] | None = None

    def sample(self, vcpus: VcpuStatistics, interval_ms: float) -> list[float]:
        """Rates in pages/s since the previous sample ([] for the first one).

        From the vCPU controller's statistics record: each vCPU's
        ``pages_written``; [] if one does not count (``None``).
        """
        try:
            st = vcpus.statistics()
        except Exception:  # noqa: BLE001 - statistics are best effort
            return []
        values = [v.pages_written for v in st.vcpus]
        if not values:
            return []
        written = [v for v in values if v is not None]
        if len(written) != len(values):
            return []  # a vCPU that does not count (e.g. a real-KVM program other than ab)
        prev, self._prev = self._prev, written
        if prev is None or len(prev) != len(written) or interval_ms <= 0:
            return []
        return [(w - p) * 1000 / interval_ms for w, p in zip(written, prev, strict=True)]
