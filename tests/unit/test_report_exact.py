"""The engine's exact figures in histories, and the report and plots that show them.

``recorded_problems`` checks a history the engine recorded (not a
hand-made fixture) against the engine's own accounting rules; the demo's
real-run test (tests/integration/test_demo_report.py) applies it too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from migrator.engine._history import MigrationHistory
from migrator.reports._plots import PlotRun, figure, thresholds_bytes
from migrator.reports._report import load_history, summarize, write_report

FIXTURES = Path(__file__).parent.parent / "fixtures"
TWO_VCPUS = FIXTURES / "history_two_vcpus.json"
CONVERGING = FIXTURES / "history_converging.json"


def recorded_problems(h: MigrationHistory) -> list[str]:
    """Everything in an engine-recorded history that breaks the engine's rules."""
    out: list[str] = []
    recs = h.iterations
    page = h.setup["page-size"]
    limit = h.setup["parameters"]["downtime-limit"]
    predictive = h.setup["parameters"].get("x-predictive-switchover") is True
    if [r.iteration for r in recs] != list(range(1, len(recs) + 1)):
        out.append("rows not numbered 1..n")
    for prev, r in zip(recs, recs[1:]):
        if abs(r.interval_ms - (r.time_ms - prev.time_ms)) > 0.01:
            out.append(f"row {r.iteration}: interval != time since the previous sync")
        # pending accounting: what the previous row left, minus what it sent,
        # plus what this sync newly found, is this row's remaining
        before = prev.remaining_bytes - (prev.normal_pages + prev.zero_pages) * page
        if r.pending_before_bytes != before:
            out.append(f"row {r.iteration}: pending before {r.pending_before_bytes} != {before}")
        if r.remaining_bytes != r.pending_before_bytes + r.dirty_pages * page:
            out.append(f"row {r.iteration}: remaining != pending before + newly dirty")
    for r in recs:
        if r.found_dirty_pages < r.dirty_pages:
            out.append(f"row {r.iteration}: fewer pages found than newly set")
        if r.interval_ms > 0:
            exact = r.found_dirty_pages * 1000 / r.interval_ms
            if abs(exact - r.exact_dirty_rate_pages_per_s) > 1e-6 * max(exact, 1):
                out.append(f"row {r.iteration}: exact rate != found / interval")
        if r.sending_ms > r.duration_ms + 1e-6:
            out.append(f"row {r.iteration}: sent for longer than the row lasted")
        if r.sending_ms > 0 and r.bytes:
            thr = r.bytes / r.sending_ms * 1000
            if abs(thr - r.throughput_bytes_per_s) > 1e-6 * thr:
                out.append(f"row {r.iteration}: throughput != bytes / sending time")
        if r.switchover_bandwidth_bytes_per_s:
            exp = r.remaining_bytes / r.switchover_bandwidth_bytes_per_s * 1000
            if abs(exp - r.expected_downtime_ms) > 1e-6 * max(exp, 1):
                out.append(f"row {r.iteration}: expected downtime != remaining / switchover bandwidth")
        if r.threshold_bytes != int(r.switchover_bandwidth_bytes_per_s / 1000 * limit):
            out.append(f"row {r.iteration}: threshold != switchover bandwidth x downtime-limit")
    live = [r for r in recs if not r.final]
    decided = [r for r in recs if r.switchover]
    if h.status == "completed":
        if len(decided) != 1 or decided[0] is not live[-1] or not recs[-1].final:
            out.append("a completed run: one switchover row, the last live one, then the final sync")
        sent = sum(r.normal_pages + r.zero_pages for r in recs)
        found = h.setup["memory-bytes"] // page + sum(r.dirty_pages for r in recs[1:])
        if sent != found:
            out.append(f"sent {sent} pages of {found} found dirty")
        if h.downtime_prediction is None:
            out.append("completed without a downtime prediction")
    elif decided:
        out.append(f"{h.status} run has a switchover row")
    for r in live:
        if predictive:
            fits = r.remaining_bytes == 0 or 0 < r.predicted_downtime_ms <= limit
            if r.switchover and not fits:
                out.append(f"row {r.iteration}: switched over with a prediction above the limit")
        else:
            fits = r.remaining_bytes == 0 or r.remaining_bytes < r.threshold_bytes
            if fits != r.switchover:
                out.append(f"row {r.iteration}: remaining {r.remaining_bytes} vs threshold "
                           f"{r.threshold_bytes} but switchover={r.switchover}")
    return out


@pytest.fixture(scope="module")
def two() -> MigrationHistory:
    return load_history(TWO_VCPUS)


def test_recorded_fixture_keeps_the_engines_rules(two):
    assert two.status == "completed"
    assert recorded_problems(two) == []


@pytest.mark.parametrize("how", ["threshold", "switchover-late", "pending", "exact-rate", "throughput"])
def test_recorded_rules_catch_broken_rows(two, how):
    h = copy.deepcopy(two)
    r = h.iterations[1]
    if how == "threshold":  # the decision compared remaining with another threshold
        r.threshold_bytes = r.remaining_bytes // 4
    elif how == "switchover-late":
        h.iterations[-2].switchover = False
        h.iterations[1].switchover = True
    elif how == "pending":
        r.pending_before_bytes += page_of(h)
    elif how == "exact-rate":  # QEMU's figure copied into the exact column
        r.exact_dirty_rate_pages_per_s = r.dirty_rate_pages_per_s
    elif how == "throughput":  # bytes over the whole row instead of the sending time
        r.throughput_bytes_per_s = r.bytes / r.duration_ms * 1000
    assert recorded_problems(h)


def page_of(h: MigrationHistory) -> int:
    return h.setup["page-size"]


def test_two_vcpus_rates_are_each_vcpus(two):
    rates = two.setup["vcpu-rates-pages-per-s"]
    live = [r for r in two.iterations[1:] if not r.final and r.interval_ms > 20]
    assert live
    for r in live:
        assert len(r.vcpu_write_rates_pages_per_s) == 2
        for got, want in zip(r.vcpu_write_rates_pages_per_s, rates):
            assert got == pytest.approx(want, rel=0.3)
        # distinct dirty pages never exceed the writes that made them
        assert r.found_dirty_pages <= sum(r.vcpu_write_rates_pages_per_s) * r.interval_ms / 1000 + 64


def _labels(name: str, histories: list[MigrationHistory]) -> list[str]:
    fig = figure(name, [PlotRun(h.label or f"run {i}", h) for i, h in enumerate(histories)])
    return [label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]]


def test_rates_plot_has_a_line_per_vcpu(two):
    labels = _labels("dirty-rate-vs-bandwidth.png", [two])
    assert [label.split(": ")[-1] for label in labels if label.endswith(" writes")] == ["vCPU 0 writes", "vCPU 1 writes"]
    assert any("dirty rate (exact)" in label for label in labels)
    assert any("throughput while sending" in label for label in labels)
    assert any("bandwidth estimate" in label for label in labels)
    assert "switchover decided" in labels


def test_one_vcpu_gets_no_per_vcpu_lines(two):
    h = copy.deepcopy(two)
    for r in h.iterations:
        r.vcpu_write_rates_pages_per_s = r.vcpu_write_rates_pages_per_s[:1]
    assert not any(label.endswith(" writes") for label in _labels("dirty-rate-vs-bandwidth.png", [h]))


def test_switchover_marked_at_the_deciding_sync(two):
    fig = figure("dirty-rate-vs-bandwidth.png", [PlotRun("r", two)])
    decided = [r for r in two.iterations if r.switchover]
    vlines = [line.get_xdata()[0] for line in fig.axes[0].get_lines()
              if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]]
    assert vlines == [decided[0].time_ms / 1000]


def test_thresholds_are_the_recorded_ones(two):
    assert thresholds_bytes(two) == [r.threshold_bytes or None for r in two.iterations]
    # a history without them (older schema) falls back to the previous row's bandwidth
    legacy = load_history(CONVERGING)
    thr = thresholds_bytes(legacy)
    limit = legacy.setup["parameters"]["downtime-limit"]
    assert thr[0] is None
    assert thr[2] == pytest.approx(legacy.iterations[1].bandwidth_bytes_per_s * limit / 1000)


def test_threshold_is_drawn_even_when_one_row_has_it(two):
    """The issue's plot named the threshold in its legend and drew nothing."""
    h = copy.deepcopy(two)
    del h.iterations[2:-2]  # setup sync, the deciding sync, the final one
    h.iterations[0].threshold_bytes = 0
    fig = figure("remaining.png", [PlotRun("r", h)])
    want = h.iterations[1].threshold_bytes / (1 << 20)
    drawn = [line for line in fig.axes[0].get_lines()
             if line.get_linestyle() == ":" and any(y == pytest.approx(want) for y in line.get_ydata())]
    assert drawn


def test_summary_uses_exact_rates(two):
    s = summarize(two)
    page = two.setup["page-size"]
    assert s.peak_dirty_rate_bytes_per_s == max(r.exact_dirty_rate_pages_per_s for r in two.iterations
                                                if not r.final) * page
    assert s.peak_dirty_rate_bytes_per_s > 0
    assert s.switchover_iteration == next(r.iteration for r in two.iterations if r.switchover)
    assert s.predicted_downtime_ms == two.downtime_prediction.total_ms
    legacy = summarize(load_history(CONVERGING))
    assert legacy.predicted_downtime_ms is None and legacy.switchover_iteration is None


def test_timeline_has_destination_lane(two, tmp_path):
    h = copy.deepcopy(two)
    assert h.destination is None  # a file migration: no destination process
    labels = _labels("timeline.png", [h])
    assert "setup" in labels and "downtime: last pages" in labels
    assert not any(label.startswith("stream received") for label in labels)
    data = h.to_json()
    t0 = data["start-unix-ms"]
    data["destination"] = {"accepted-unix-ms": t0 + 1, "first-byte-unix-ms": t0 + 2,
                           "stream-received-unix-ms": t0 + 250, "device-state-loaded-unix-ms": t0 + 251,
                           "acknowledged-unix-ms": t0 + 252, "resumed-unix-ms": t0 + 251.5}
    with_dst = MigrationHistory.from_json(data)
    labels = _labels("timeline.png", [with_dst])
    for want in ("first byte", "stream received (EOF)", "device state loaded", "acknowledged", "resumed"):
        assert want in labels
    fig = figure("timeline.png", [PlotRun("r", with_dst)])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["source", "destination"]
    fig = figure("timeline.png", [PlotRun("r", with_dst), PlotRun("q", h)])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["r\nsource", "r\ndestination",
                                                                     "q\nsource"]
    # the report says when, in words, too
    paths = write_report([with_dst], tmp_path)
    assert "stream received at 250.0 ms" in paths.markdown.read_text()


def test_history_round_trips_new_members(two):
    again = MigrationHistory.from_json(json.loads(json.dumps(two.to_json())))
    assert again == two
