"""MigrationCounters, what ``query-migrate`` reports, and the error helpers both ends share."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._history import MigrationHistory

__all__ = ["MigrationCounters", "error_desc", "leaf_error"]


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


def error_desc(exc: BaseException) -> str:
    """``error-desc`` text: the message without Python's ``[Errno N]`` prefix."""
    text = str(exc)
    if isinstance(exc, OSError) and text.startswith("[Errno"):
        text = text.split("] ", 1)[-1]
    return text


def leaf_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from nurseries."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc
