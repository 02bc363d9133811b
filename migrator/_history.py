"""Per-iteration migration history: one row per dirty sync.

Like guestperf's progress history, but recorded by the engine itself, so no
polling is needed.  Exposed over QMP as ``x-query-migration-history`` with
hyphenated keys (QAPI style), and consumed by ``migrator report``.

The wire/JSON schema (``HISTORY_SCHEMA_VERSION`` 1)::

    {
      "schema": 1,
      "label": str,                  # free text ("wp-all on", ...)
      "status": MigrationStatus str, # final or current status
      "setup": {"memory-bytes": int, "page-size": int, "accel": str,
                "workload": str, "parameters": {...}, "capabilities": {...}},
      "iterations": [IterationRecord.to_json(), ...],
      "downtime": DowntimeBreakdown.to_json() | null,
      "total-time-ms": float | null,
      "setup-time-ms": float | null,
    }
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

HISTORY_SCHEMA_VERSION = 1


def _to_json(obj) -> dict:
    return {f.name.replace("_", "-"): v for f, v in zip(fields(obj), asdict(obj).values())}


def _from_json(cls, data: dict):
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in names:
            kwargs[name] = value
    return cls(**kwargs)


@dataclass
class IterationRecord:
    """One dirty sync and the sending that followed it until the next sync.

    Times are milliseconds since the migration started; rates per second.
    ``dirty_pages`` are the pages newly found dirty by this sync;
    ``remaining_bytes`` is what is left to send right after this sync.
    """

    iteration: int  # = dirty-sync-count, from 1
    time_ms: float
    dirty_pages: int
    normal_pages: int = 0
    zero_pages: int = 0
    bytes: int = 0
    duration_ms: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    dirty_rate_pages_per_s: float = 0.0
    remaining_bytes: int = 0
    expected_downtime_ms: float = 0.0
    sync_time_ms: float = 0.0
    write_protect_time_ms: float = 0.0
    throttle_pct: int = 0
    final: bool = False  # the stopped, last-stage sync

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> "IterationRecord":
        return _from_json(cls, data)


@dataclass
class DowntimeBreakdown:
    """Where the downtime went (milliseconds)."""

    stop_vcpus_ms: float = 0.0
    final_sync_ms: float = 0.0
    last_pages_ms: float = 0.0
    device_state_ms: float = 0.0
    destination_resume_ms: float = 0.0
    total_ms: float = 0.0

    def to_json(self) -> dict:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict) -> "DowntimeBreakdown":
        return _from_json(cls, data)


@dataclass
class MigrationHistory:
    label: str = ""
    status: str = "none"
    setup: dict = field(default_factory=dict)
    iterations: list[IterationRecord] = field(default_factory=list)
    downtime: DowntimeBreakdown | None = None
    total_time_ms: float | None = None
    setup_time_ms: float | None = None

    def to_json(self) -> dict:
        return {
            "schema": HISTORY_SCHEMA_VERSION,
            "label": self.label,
            "status": self.status,
            "setup": self.setup,
            "iterations": [r.to_json() for r in self.iterations],
            "downtime": None if self.downtime is None else self.downtime.to_json(),
            "total-time-ms": self.total_time_ms,
            "setup-time-ms": self.setup_time_ms,
        }

    @classmethod
    def from_json(cls, data: dict) -> "MigrationHistory":
        if data.get("schema") != HISTORY_SCHEMA_VERSION:
            raise ValueError(f"unsupported history schema {data.get('schema')!r}")
        return cls(
            label=data.get("label", ""),
            status=data.get("status", "none"),
            setup=data.get("setup", {}),
            iterations=[IterationRecord.from_json(r) for r in data.get("iterations", [])],
            downtime=None if data.get("downtime") is None else DowntimeBreakdown.from_json(data["downtime"]),
            total_time_ms=data.get("total-time-ms"),
            setup_time_ms=data.get("setup-time-ms"),
        )
