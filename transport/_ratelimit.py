"""QEMU's migration bandwidth limit: a byte budget per 100 ms window.

Facts from QEMU (migration/migration.c, migration/qemu-file.c):

* The migration thread works in windows of ``BUFFER_DELAY`` = 100 ms.  The
  outgoing file's limit is ``max-bandwidth / XFER_LIMIT_RATIO`` (10) bytes per
  window; ``qemu_file_rate_limit`` reports "over" once the bytes booked in the
  current window exceed it (a limit of 0 means unlimited).
* ``migration_rate_limit`` runs after each iteration step: if the window is
  over budget it sleeps until the window's end (or until something urgent
  arrives); when a window has lasted at least 100 ms,
  ``migration_update_counters`` computes ``bandwidth`` = bytes / elapsed time
  for that window and starts a new one with nothing booked.
* At switchover the limit is lifted (``qemu_file_set_rate_limit(INT64_MAX)``)
  so the final pass runs at full speed.

The limiter reads ``trio.current_time()``, so tests run it under trio's
``MockClock`` with ``autojump_threshold=0``: sleeps take no real time and
there are no timed assertions.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

__all__ = ["BUFFER_DELAY_S", "XFER_LIMIT_RATIO", "RateLimiter", "RateLimiterStatistics"]

BUFFER_DELAY_S = 0.1
XFER_LIMIT_RATIO = 10


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    max_bandwidth_bytes_per_s: int  #: 0 = unlimited
    budget_bytes: int  #: per 100 ms window (0 = unlimited)
    bytes_this_window: int
    bandwidth_bytes_per_s: float  #: measured over the last completed window
    total_bytes: int
    windows: int  #: completed windows
    throttled_windows: int  #: windows that ended in a sleep


class RateLimiter:
    """Bandwidth limit in QEMU's 100 ms windows.

    Usage (the sender's loop)::

        while work:
            await limiter.wait_for_budget()   # sleeps if this window is spent
            n = send_some_pages()
            limiter.account(n)

    Args:
        max_bandwidth_bytes_per_s: QEMU's ``max-bandwidth``; 0 = unlimited.
    """

    def __init__(self, max_bandwidth_bytes_per_s: int = 0) -> None:
        self._bw = 0
        self.set_rate(max_bandwidth_bytes_per_s)
        self._window_start: float | None = None
        self._window_bytes = 0
        self._total = 0
        self._bandwidth = 0.0
        self._windows = 0
        self._throttled = 0

    # -- configuration ---------------------------------------------------
    def set_rate(self, max_bandwidth_bytes_per_s: int) -> None:
        """Change ``max-bandwidth``; takes effect in the current window."""
        if max_bandwidth_bytes_per_s < 0:
            raise ValueError(f"max bandwidth must be >= 0: {max_bandwidth_bytes_per_s}")
        self._bw = int(max_bandwidth_bytes_per_s)

    def disable(self) -> None:
        """Lift the limit (switchover): same as ``set_rate(0)``."""
        self._bw = 0

    @property
    def max_bandwidth_bytes_per_s(self) -> int:
        return self._bw

    @property
    def budget_bytes(self) -> int:
        """Bytes allowed per window (``max-bandwidth / 10``); 0 = unlimited."""
        return self._bw // XFER_LIMIT_RATIO

    # -- accounting ------------------------------------------------------
    def account(self, nbytes: int) -> None:
        """Book bytes that were (or are about to be) sent in this window."""
        self._start_if_needed()
        self._window_bytes += nbytes
        self._total += nbytes

    @property
    def bytes_this_window(self) -> int:
        return self._window_bytes

    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Bytes per second measured over the last completed window."""
        return self._bandwidth

    def over_budget(self) -> bool:
        """QEMU's ``qemu_file_rate_limit``: booked bytes exceed the window's budget."""
        budget = self.budget_bytes
        return budget > 0 and self._window_bytes > budget

    def window_remaining_s(self) -> float:
        """Seconds until the current window ends (0 if it already has)."""
        if self._window_start is None:
            return 0.0
        return max(0.0, self._window_start + BUFFER_DELAY_S - trio.current_time())

    async def wait_for_budget(self) -> bool:
        """QEMU's ``migration_rate_limit``: close finished windows, sleep if spent.

        Returns:
            True if it slept until the end of an over-budget window.
        """
        self._start_if_needed()
        self._roll_if_due()
        if not self.over_budget():
            await trio.lowlevel.checkpoint()
            return False
        self._throttled += 1
        await trio.sleep_until(self._window_start + BUFFER_DELAY_S)  # type: ignore[operator]
        self._roll_if_due()
        return True

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            max_bandwidth_bytes_per_s=self._bw,
            budget_bytes=self.budget_bytes,
            bytes_this_window=self._window_bytes,
            bandwidth_bytes_per_s=self._bandwidth,
            total_bytes=self._total,
            windows=self._windows,
            throttled_windows=self._throttled,
        )

    # -- internals -------------------------------------------------------
    def _start_if_needed(self) -> None:
        if self._window_start is None:
            self._window_start = trio.current_time()

    def _roll_if_due(self) -> None:
        now = trio.current_time()
        elapsed = now - self._window_start  # type: ignore[operator]
        if elapsed >= BUFFER_DELAY_S - 1e-9:  # sleep_until(start + 0.1) may round below
            self._bandwidth = self._window_bytes / elapsed
            self._windows += 1
            self._window_bytes = 0
            self._window_start = now
