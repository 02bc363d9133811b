"""``migrator compare``'s scenario and results: the seed's figures, the
configuration shared by the four runs, one run's record, medians over
repeats and the series' O(1) check (see ``_compare.py`` for the essay)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from memory import TARGET_PAGE_SIZE

from ..engine._history import MigrationHistory

#: The seed's figures (performance data, case 2): (before = ordinary
#: dirty log, after = write-protect-all).
SEED = {
    "fresh": {"dirty_rate": (333092, 497266, "+49%"), "total_time_ms": (12532, 18467, "-47%")},
    "pre-written": {"dirty_rate": (447435, 449284, "+0%"), "total_time_ms": (31068, 28310, "+10%"),
                    "first_dirty_log_ms": (156, 6, "")},
}
SEED_SETUP = "30G VM, 8 vCPUs, writer greedily and repeatedly writes 3000M (10 % of RAM)"

GUESTS = ("fresh", "pre-written")
#: KVM statistics the comparison reports (SimKVM.statistics names).
KVM_STATS = ("faults_fast", "faults_push_down", "faults_map", "sptes_write_protected", "tlb_flushes",
             "mmu_lock_acquisitions", "mmu_lock_hold_ns", "root_reloads", "tables_created",
             "pages_marked_dirty")


@dataclass
class CompareConfig:
    """The scenario (all four runs share it)."""

    memory_bytes: int = 1 << 30
    working_set_pages: int = 0  # 0: working_set_fraction of RAM
    working_set_fraction: float = 0.75
    max_bandwidth: int = 1 << 30  # bytes/s
    downtime_limit: int = 300  # ms
    auto_converge: bool = True
    cpu_throttle_initial: int = 50
    cpu_throttle_increment: int = 25
    timeout_s: float = 60.0  # per run; cancelled (not converged) after it
    destination: str = "inprocess"  # or "process"
    smp: int = 1  # vCPU processes of the source (and destination)
    fault_cost: str = "host"  # per-fault cost profile (memory.kvm.sim.sim_vcpu.FAULT_COSTS)

    @property
    def npages(self) -> int:
        return self.memory_bytes // TARGET_PAGE_SIZE

    @property
    def working_set(self) -> int:
        ws = self.working_set_pages or int(self.npages * self.working_set_fraction)
        return max(1, min(ws, self.npages))

    def describe(self) -> dict[str, Any]:
        return {
            "memory-bytes": self.memory_bytes,
            "working-set-pages": self.working_set,
            "working-set-bytes": self.working_set * TARGET_PAGE_SIZE,
            "max-bandwidth": self.max_bandwidth,
            "downtime-limit": self.downtime_limit,
            "auto-converge": self.auto_converge,
            "cpu-throttle-initial": self.cpu_throttle_initial,
            "cpu-throttle-increment": self.cpu_throttle_increment,
            "timeout-s": self.timeout_s,
            "destination": self.destination,
            "smp": self.smp,
            "fault-cost": self.fault_cost,
        }


@dataclass
class RunResult:
    """One case: the engine's history plus the comparison's metrics.

    With repeats, ``metrics`` holds each numeric metric's median over
    ``repeats`` (the per-repeat metrics) and ``history`` is the history of
    the repeat whose total time is the median (lower median).
    """

    guest: str
    wp_all: bool
    history: MigrationHistory
    metrics: dict[str, Any] = field(default_factory=dict)
    repeats: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        return run_label(self.guest, self.wp_all)


def run_label(guest: str, wp_all: bool) -> str:
    return f"{guest}, wp-all {'on' if wp_all else 'off'}"


class CompareError(RuntimeError):
    """A run could not be carried out (destination failed to start...)."""


def aggregate(runs: list[RunResult]) -> RunResult:
    """One case's repeats -> medians (see :class:`RunResult`)."""
    if len(runs) == 1:
        r = runs[0]
        return RunResult(r.guest, r.wp_all, r.history, dict(r.metrics), [r.metrics])
    by_time = sorted(runs, key=lambda r: r.metrics.get("total-time-ms") or 0.0)
    rep = by_time[(len(by_time) - 1) // 2]
    metrics = dict(rep.metrics)
    for key, value in rep.metrics.items():
        values = [r.metrics.get(key) for r in runs]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(numbers) == len(values):
            med = statistics.median(numbers)
            metrics[key] = int(round(med)) if all(isinstance(v, int) for v in values) else med
    metrics["status"] = ("completed" if all(r.metrics["status"] == "completed" for r in runs)
                         else ",".join(r.metrics["status"] for r in runs))
    metrics["repeats"] = len(runs)
    return RunResult(rep.guest, rep.wp_all, rep.history, metrics, [r.metrics for r in runs])


def check_o1_dirty_log(results: list[RunResult]) -> list[str]:
    """The series' property, per guest kind: with write-protect-all the
    dirty log write-protects (almost) nothing itself - its protection is
    O(1) - while the legacy GET protects every page it returns.  Returns
    the violations (empty = holds)."""
    problems = []
    by = {(r.guest, r.wp_all): r for r in results}
    for guest in GUESTS:
        off, on = by.get((guest, False)), by.get((guest, True))
        if off is None or on is None:
            problems.append(f"{guest}: missing run")
            continue
        m_off, m_on = off.metrics, on.metrics
        if m_off["first-dirty-log-pages"] is None or m_on["first-dirty-log-pages"] is None:
            problems.append(f"{guest}: no sync returned dirty pages")
            continue
        legacy = m_off["first-dirty-log-sptes-write-protected"]
        if legacy < m_off["first-dirty-log-pages"]:
            problems.append(f"{guest}: legacy first dirty log protected {legacy} sptes "
                            f"for {m_off['first-dirty-log-pages']} dirty pages")
        fast = m_on["first-dirty-log-sptes-write-protected"]
        if fast * 100 > max(legacy, 1):
            problems.append(f"{guest}: wp-all first dirty log protected {fast} sptes, "
                            f"not far fewer than legacy's {legacy}")
        if m_on["dirty-log-sptes-write-protected"] * 100 > max(m_off["dirty-log-sptes-write-protected"], 1):
            problems.append(f"{guest}: wp-all dirty log protected {m_on['dirty-log-sptes-write-protected']} "
                            f"sptes in total vs legacy {m_off['dirty-log-sptes-write-protected']}")
    return problems

