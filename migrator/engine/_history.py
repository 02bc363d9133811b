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
      "downtime-prediction": DowntimePrediction.to_json() | null,
      "destination": DestinationTimeline.to_json() | null,
      "start-unix-ms": float | null,   # wall clock of the migration start
      "total-time-ms": float | null,
      "setup-time-ms": float | null,
    }

Members added after the first release of schema 1 have defaults, so older
histories (and the fixtures) still load; a reader tells "not recorded" from
zero by the recorded ``interval-ms`` / ``threshold-bytes`` being absent.

Which number is which (the engine knows exact figures; QEMU's
``query-migrate`` keeps QEMU's own, coarser ones, and both are kept):

* ``exact-dirty-rate-pages-per-s`` = ``found-dirty-pages`` (dirty bits this
  sync fetched, including pages still pending from before) / ``interval-ms``
  (time since the previous sync).  Row 1 (the setup sync) has none.
* ``dirty-rate-pages-per-s`` is QEMU's ``dirty-pages-rate`` as query-migrate
  showed it at that sync: pages *newly* set in the migration bitmap over a
  period of at least 1 s, recomputed only at a sync that ends such a period
  (ram.c ``migration_update_rates``), so 0 until the first second is over.
* ``throughput-bytes-per-s`` = ``bytes`` / ``sending-ms``: what the
  iteration achieved while it was sending; sending time is finding,
  gathering and writing its page batches (rate-limit sleeps and the
  section framing between ram_save_iterate calls excluded).
* ``bandwidth-bytes-per-s`` is QEMU's estimate at that sync: bytes of the
  last completed >= 100 ms window / its length (``migration_update_counters``).
* ``switchover-bandwidth-bytes-per-s`` and ``threshold-bytes`` are what the
  switchover decision at that sync used: ``avail-switchover-bandwidth`` if
  set, else the estimate, times ``downtime-limit``.
* ``pending-before-bytes`` / ``remaining-bytes``: pending just before and
  right after this sync.
* ``expected-downtime-ms`` is QEMU's formula, remaining / switchover bandwidth;
  ``predicted-downtime-ms`` is the engine's model of the stop-and-copy time
  (see :class:`DowntimePrediction`).
* ``switchover`` marks the row whose check decided to stop the guest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

HISTORY_SCHEMA_VERSION = 1

#: a JSON object as json.loads returns it
JSON = dict[str, Any]

_R = TypeVar("_R", bound="_Record")


def _to_json(obj: Any) -> JSON:
    return {f.name.replace("_", "-"): v for f, v in zip(fields(obj), asdict(obj).values(), strict=True)}


def _from_json(cls: type[_R], data: JSON) -> _R:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]  # every _Record subclass is a dataclass
    kwargs = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name in names:
            kwargs[name] = value
    return cls(**kwargs)


class _Record:
    """JSON with QAPI-style hyphenated keys; unknown keys are ignored on load."""

    def to_json(self) -> JSON:
        return _to_json(self)

    @classmethod
    def from_json(cls: type[_R], data: JSON) -> _R:
        return _from_json(cls, data)


LIST_FIELDS = frozenset({"vcpu_write_rates_pages_per_s"})
BOOL_FIELDS = frozenset({"final", "switchover", "resumed_by_cont"})


@dataclass
class IterationRecord(_Record):
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
    # -- exact figures and the switchover decision (see the module docstring)
    interval_ms: float = 0.0  # since the previous sync (0: the first)
    found_dirty_pages: int = 0
    exact_dirty_rate_pages_per_s: float = 0.0
    sending_ms: float = 0.0
    throughput_bytes_per_s: float = 0.0
    switchover_bandwidth_bytes_per_s: float = 0.0
    threshold_bytes: int = 0
    pending_before_bytes: int = 0
    predicted_downtime_ms: float = 0.0
    switchover: bool = False
    #: pages each vCPU wrote / interval (empty when the vCPUs do not count them)
    vcpu_write_rates_pages_per_s: list[float] = field(default_factory=list)


@dataclass
class DowntimeBreakdown(_Record):
    """Where the downtime went (milliseconds)."""

    stop_vcpus_ms: float = 0.0
    final_sync_ms: float = 0.0
    last_pages_ms: float = 0.0
    device_state_ms: float = 0.0
    destination_resume_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class DowntimePrediction(_Record):
    """The engine's prediction of the stop-and-copy time, at the switchover.

    ``total_ms = stop_vcpus_ms + final_sync_ms + last_pages_ms + tail_ms``:
    stopping the vCPUs costs what the vCPU controller expects
    (``expected_stop_ns()``: the longest of its recent stops; 0 when the
    guest is not running or the controller cannot tell); the last sync
    costs what the previous one did; the pending pages (with their record
    headers, ``bytes-per-page`` as measured so far) go at
    ``throughput_bytes_per_s``, the median sending throughput of the recent
    windows (a user's ``avail-switchover-bandwidth`` instead, if set; the
    last stage is unthrottled, and it is the receiver that sets the pace);
    the tail is the bytes still in flight in the socket buffers at that
    pace, plus the device state and the destination's resume and
    acknowledgement (``DEFAULT_RESUME_MS`` of :mod:`._switchover`).
    """

    pending_bytes: int = 0
    bytes_per_page: float = 0.0
    throughput_bytes_per_s: float = 0.0
    final_sync_ms: float = 0.0
    last_pages_ms: float = 0.0
    tail_ms: float = 0.0
    total_ms: float = 0.0
    stop_vcpus_ms: float = 0.0  # added later in schema 1: absent (0) in older histories


@dataclass
class DestinationTimeline(_Record):
    """What the destination saw, in wall-clock ms (``time.time()``, Unix epoch).

    Recorded by the destination (``x-query-migration-history`` there) and
    merged into the source's history by the driver; comparable with the
    source's ``start-unix-ms`` when both run on one host (the demo) or on
    hosts with synchronised clocks.  0 = did not happen.
    """

    accepted_unix_ms: float = 0.0
    first_byte_unix_ms: float = 0.0
    stream_received_unix_ms: float = 0.0  # EOF decoded: the whole stream is in
    device_state_loaded_unix_ms: float = 0.0
    resumed_unix_ms: float = 0.0  # the vCPUs run (0 with -S)
    acknowledged_unix_ms: float = 0.0  # the return-path reply is sent (stamped just before)
    resumed_by_cont: bool = False  # started with -S: resumed_unix_ms is the later ``cont``


@dataclass
class MigrationHistory:
    label: str = ""
    status: str = "none"
    setup: JSON = field(default_factory=dict)
    iterations: list[IterationRecord] = field(default_factory=list)
    downtime: DowntimeBreakdown | None = None
    total_time_ms: float | None = None
    setup_time_ms: float | None = None
    downtime_prediction: DowntimePrediction | None = None
    destination: DestinationTimeline | None = None
    start_unix_ms: float | None = None

    def to_json(self) -> JSON:
        return {
            "schema": HISTORY_SCHEMA_VERSION,
            "label": self.label,
            "status": self.status,
            "setup": self.setup,
            "iterations": [r.to_json() for r in self.iterations],
            "downtime": None if self.downtime is None else self.downtime.to_json(),
            "downtime-prediction": (None if self.downtime_prediction is None
                                    else self.downtime_prediction.to_json()),
            "destination": None if self.destination is None else self.destination.to_json(),
            "start-unix-ms": self.start_unix_ms,
            "total-time-ms": self.total_time_ms,
            "setup-time-ms": self.setup_time_ms,
        }

    @classmethod
    def from_json(cls, data: JSON) -> MigrationHistory:
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
            downtime_prediction=(None if data.get("downtime-prediction") is None
                                 else DowntimePrediction.from_json(data["downtime-prediction"])),
            destination=(None if data.get("destination") is None
                         else DestinationTimeline.from_json(data["destination"])),
            start_unix_ms=data.get("start-unix-ms"),
        )
