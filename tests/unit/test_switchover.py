"""The switchover decision, QEMU's and x-predictive-switchover, on in-process migrations.

A source VM runs in this trio run and migrates to a file (no destination
process); the engine records its history, which is checked against the
engine's rules (tests/unit/test_report_exact.recorded_problems) and against
the rule the run was configured with.
"""

from __future__ import annotations

import pytest
import trio

from memory.kvm import VCPUControllerStatistics, VCPUCounters
from migrator.engine._history import MigrationHistory
from migrator.engine._machine import AccelConfig
from migrator.engine._status import MigrationStatus as S
from migrator.qmp._vm import VM
from tests.unit.test_report_exact import recorded_problems


async def _migrate(tmp_path, *, workload: str, memory: int, **params) -> MigrationHistory:
    vm = VM(memory_bytes=memory, accel=AccelConfig(kind="sim"), workload=workload,
            workload_opts={"rate": 5000.0} if workload == "ab" else None, label="in-process")
    vm.options.parameters = vm.options.parameters.apply(**params)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.qmp_migrate(f"file:{tmp_path / 'stream'}")
        with trio.fail_after(60):
            while vm.state.status not in (S.COMPLETED, S.FAILED, S.CANCELLED):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    return vm.last_outgoing.counters.history


@pytest.mark.parametrize("predictive", [False, True], ids=["qemu", "predictive"])
async def test_switchover_follows_the_configured_rule(tmp_path, predictive):
    h = await _migrate(tmp_path, workload="ab", memory=64 << 20, max_bandwidth=64 << 20,
                       downtime_limit=60, x_predictive_switchover=predictive)
    assert h.status == "completed"
    assert recorded_problems(h) == []
    live = [r for r in h.iterations if not r.final]
    decided = live[-1]
    assert decided.switchover
    if predictive:
        prev = live[-2].remaining_bytes if len(live) > 1 else None
        stalled = prev is not None and decided.remaining_bytes >= 0.9 * prev
        assert decided.remaining_bytes == 0 or decided.predicted_downtime_ms <= 0.75 * 60 or (
            stalled and decided.predicted_downtime_ms <= 60)
        # ... and no earlier sync had that much headroom
        for r in live[:-1]:
            assert r.predicted_downtime_ms == 0 or r.predicted_downtime_ms > 0.75 * 60
    assert h.downtime_prediction is not None
    assert h.downtime_prediction.pending_bytes == decided.remaining_bytes


async def test_avail_switchover_bandwidth_sets_the_threshold(tmp_path):
    """QEMU: a non-zero avail-switchover-bandwidth replaces the estimate in
    threshold_size (and in expected-downtime)."""
    h = await _migrate(tmp_path, workload="fill", memory=32 << 20, max_bandwidth=64 << 20,
                       avail_switchover_bandwidth=100 << 20, downtime_limit=100)
    assert h.status == "completed" and recorded_problems(h) == []
    later = [r for r in h.iterations if r.bandwidth_bytes_per_s > 0]  # after the first window
    assert later
    for r in later:
        assert r.bandwidth_bytes_per_s < 80 << 20  # the estimate: max-bandwidth's 64 MiB/s
        assert r.switchover_bandwidth_bytes_per_s == 100 << 20
        assert r.threshold_bytes == int((100 << 20) / 1000 * 100)
    assert h.downtime_prediction.throughput_bytes_per_s == 100 << 20


def _decider(*, predictive: bool, threshold: int, limit: int = 300, throughputs=(), avail: int = 0,
             stop_ns=lambda: 0):
    """The switchover model, holding only what the switchover test reads."""
    from migrator.engine._counters import MigrationCounters
    from migrator.engine._switchover import SwitchoverModel
    from migrator.qmp._params import MigrationParameters

    params = MigrationParameters().apply(downtime_limit=limit, x_predictive_switchover=predictive,
                                         avail_switchover_bandwidth=avail)
    model = SwitchoverModel(lambda: params, MigrationCounters(threshold_bytes=threshold), stop_ns)
    for t in throughputs:
        model.throughputs.append((t, True))
    return model


def test_qemu_rule_is_strictly_below_the_threshold():
    mig = _decider(predictive=False, threshold=1000 * 4096)
    assert mig.fits(999 * 4096, None) and mig.fits(0, None)
    assert not mig.fits(1000 * 4096, None)  # QEMU: pending_size < threshold_size
    assert not mig.fits(1001 * 4096, None)
    assert mig.may_sync(1000 * 4096) and not mig.may_sync(1001 * 4096)  # must_precopy <= threshold


def test_predictive_rule_wants_headroom_unless_stalled():
    gbps = 1e9  # 1 GB/s: 100 MB of pages take ~100 ms, plus ~7 ms of tail
    mig = _decider(predictive=True, threshold=0, throughputs=[gbps] * 5)
    mb = 1_000_000 // 4096 * 4096
    assert mig.predict(200 * mb).total_ms == pytest.approx(200 * 1.002 + 4.19 + 3, rel=0.01)
    assert mig.fits(150 * mb, None)  # ~158 ms <= 0.75 x 300
    assert not mig.fits(250 * mb, 400 * mb)  # ~258 ms: fits the limit, but the pass still drains
    assert mig.fits(250 * mb, 260 * mb)  # ... stalled (shrank < 10 %): waiting would not help
    assert not mig.fits(350 * mb, 360 * mb)  # ~360 ms: over the limit, stalled or not
    assert mig.may_sync(250 * mb) and not mig.may_sync(350 * mb)
    assert not _decider(predictive=True, threshold=0).fits(mb, None)  # nothing measured yet
    # avail-switchover-bandwidth is trusted over the measurement
    slow = _decider(predictive=True, threshold=0, throughputs=[gbps], avail=100_000_000)
    assert slow.predict(10 * mb).throughput_bytes_per_s == 100_000_000


def test_prediction_includes_the_vcpu_controllers_expected_stop():
    mb = 1_000_000 // 4096 * 4096
    base = _decider(predictive=True, threshold=0, throughputs=[1e9] * 5).predict(200 * mb)
    assert base.stop_vcpus_ms == 0  # nothing to stop: no term
    mig = _decider(predictive=True, threshold=0, limit=300, throughputs=[1e9] * 5,
                   stop_ns=lambda: 40_000_000)  # a 40 ms stop (e.g. a vCPU slow to leave a long exit)
    pred = mig.predict(200 * mb)
    assert pred.stop_vcpus_ms == 40 and pred.total_ms == pytest.approx(base.total_ms + 40)
    assert mig.fits(185 * mb, None) is False  # ~193 ms of copying + 40 ms of stop > 0.75 x 300
    assert _decider(predictive=True, threshold=0, limit=300, throughputs=[1e9] * 5).fits(185 * mb, None)
    # the history carries the term (older histories without it load as 0)
    from migrator.engine._history import DowntimePrediction

    assert pred.to_json()["stop-vcpus-ms"] == 40
    old = {k: v for k, v in pred.to_json().items() if k != "stop-vcpus-ms"}
    assert DowntimePrediction.from_json(old).stop_vcpus_ms == 0


def test_source_asks_the_controller_for_the_stop_only_while_it_runs():
    from migrator.engine import OutgoingMigration

    class Vcpus:
        running = True

        def expected_stop_ns(self) -> int:
            return 40_000_000

    vcpus = Vcpus()
    vm = type("StubVM", (), {"vcpus": vcpus})()
    assert OutgoingMigration._expected_stop_ns.__get__(type("M", (), {"vm": vm})())() == 40_000_000
    vcpus.running = False  # a paused guest: the stop costs nothing
    assert OutgoingMigration._expected_stop_ns.__get__(type("M", (), {"vm": vm})())() == 0


async def test_two_vcpus_recorded_live(tmp_path):
    """The per-vCPU series of a real run (the recorder of history_two_vcpus.json)."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
    import record_two_vcpus

    await record_two_vcpus.record(tmp_path / "h.json")
    h = MigrationHistory.from_json(json.loads((tmp_path / "h.json").read_text()))
    rows = [r for r in h.iterations[1:] if not r.final and r.interval_ms > 20]
    assert rows and h.status == "completed" and recorded_problems(h) == []
    want = record_two_vcpus.RATES[1] / record_two_vcpus.RATES[0]
    for r in rows:
        v0, v1 = r.vcpu_write_rates_pages_per_s
        # a loaded machine slows both simulated vCPUs alike (they run when the
        # sender waits), so the check is their ratio, not their absolute rates
        assert v0 > 0 and v1 > 0 and v1 / v0 == pytest.approx(want, rel=0.3)


async def test_expected_downtime_starts_at_the_limit(tmp_path):
    """QEMU's migrate_fd_connect sets expected_downtime = downtime-limit; it
    changes only once a sync ended a >= 1 s dirty-rate period."""
    vm = VM(memory_bytes=32 << 20, accel=AccelConfig(kind="sim"), workload="fill", label="in-process")
    vm.options.parameters = vm.options.parameters.apply(max_bandwidth=16 << 20, downtime_limit=123)
    seen = []
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.qmp_migrate(f"file:{tmp_path / 'stream'}")
        with trio.fail_after(60):
            while vm.state.status not in (S.COMPLETED, S.FAILED, S.CANCELLED):
                info = await vm.qmp_query_migrate()
                if info.get("status") == "active":
                    seen.append(info["expected-downtime"])
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert seen and seen[0] == 123


def _rec(*written: int | None) -> VCPUControllerStatistics:
    return VCPUControllerStatistics(vcpus=tuple(VCPUCounters(index=i, pages_written=w) for i, w in enumerate(written)))


@pytest.mark.parametrize("before, after, want", [
    (_rec(0, 5), _rec(10, 35), [1000.0, 3000.0]),
    (_rec(0), _rec(20), [2000.0]),
    (_rec(None), _rec(None), []),  # real KVM, not ab
    (_rec(3, None), _rec(7, None), []),  # one vCPU that does not count: no per-vCPU series
    (_rec(), _rec(), []),
], ids=["two", "one", "none-count", "one-none", "empty"])
def test_vcpu_write_rates_from_any_controller(before, after, want):
    """Per-vCPU rates from the vCPU controller's record; a controller that
    does not count gives none (and never breaks the sync)."""
    from migrator.engine._convergence import VcpuWriteRates

    answers = iter([before, after])
    vcpus = type("VCPUs", (), {"statistics": lambda self: next(answers)})()
    rates = VcpuWriteRates()
    assert rates.sample(vcpus, 0.0) == []  # the first sync: only the baseline
    assert rates.sample(vcpus, 10.0) == want  # 10 ms later


def test_vcpu_write_rates_survive_a_failing_controller():
    from migrator.engine._convergence import VcpuWriteRates

    def boom(self):
        raise OSError("vCPU stats fd gone")

    assert VcpuWriteRates().sample(type("VCPUs", (), {"statistics": boom})(), 10.0) == []
