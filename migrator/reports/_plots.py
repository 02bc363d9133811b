"""PNG plots for ``migrator report`` (matplotlib, Agg, object-oriented API).

matplotlib costs seconds to import cold, so it is imported inside
:func:`render_plots` only: importing :mod:`migrator` never pays for it.  The
figures are built with ``matplotlib.figure.Figure`` and rendered by the Agg
canvas directly -- no ``pyplot``, no global backend switch, no global figure
registry -- so rendering is free of process-wide side effects.

Every plot overlays all runs, one colour per run (the same colour in every
plot), labelled with the run's label.

Reading the plots against QEMU's rules (migration/migration.c,
``migration_update_counters`` and ``migration_iteration_run``): after each
dirty sync QEMU compares the pending bytes with ``threshold_size =
expected_bw x downtime-limit`` where ``expected_bw`` is the bandwidth
measured over the last window (or ``avail-switchover-bandwidth`` when set).
The engine records on each row the threshold its decision at that sync
used (``threshold-bytes``), and the plots draw that.  Histories recorded
before those members existed (the fixtures) lack it; for them the
threshold is rebuilt from the previous row's bandwidth, the convention
those histories were written with.  ``expected_downtime = remaining /
expected_bw`` is the same test expressed in time.

Rates are drawn where they were measured: a row's exact dirty rate over the
interval *before* its sync (previous sync -> this one), its achieved
throughput over the sending *after* it (this sync -> next), QEMU's window
estimate as a point at the sync.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..engine._history import MigrationHistory

MIB = 1 << 20

#: File names of the plots, in the order they appear in the report, with a
#: short caption each.
PLOTS: dict[str, str] = {
    "remaining.png": "Remaining bytes after each dirty sync, with the switchover",
    "dirty-rate-vs-bandwidth.png": "Exact dirty rate against achieved throughput and QEMU's bandwidth "
                                   "estimate, with the switchover decision",
    "pages.png": "Pages sent per iteration (normal vs zero)",
    "downtime.png": "Downtime breakdown",
    "throttle.png": "CPU throttle, QEMU's expected and the engine's predicted downtime per iteration",
    "timeline.png": "Source and destination timeline: iterations, downtime phases, stream received, "
                    "device state loaded, acknowledged, resumed",
}

#: DowntimeBreakdown fields in the order they happen, with legend labels.
DOWNTIME_PARTS: tuple[tuple[str, str], ...] = (
    ("stop_vcpus_ms", "stop vCPUs"),
    ("final_sync_ms", "final dirty sync"),
    ("last_pages_ms", "last pages"),
    ("device_state_ms", "device state"),
    ("destination_resume_ms", "destination resume"),
)

_FIG_SIZE_IN = (9.0, 4.8)
#: more runs than this in one plot: drop per-point annotations, slant labels
MANY_RUNS = 3
_DPI = 110


@dataclass(frozen=True, slots=True)
class PlotRun:
    """One history to draw, with its (unique) label."""

    label: str
    history: MigrationHistory


def page_size_bytes(history: MigrationHistory) -> int:
    """The run's target page size from ``setup`` (4096 if not recorded)."""
    value = history.setup.get("page-size", history.setup.get("page_size", 4096))
    return int(value) if isinstance(value, (int, float)) and value > 0 else 4096


def parameter(history: MigrationHistory, name: str) -> float | None:
    """A migration parameter from ``setup['parameters']`` (QAPI or snake name)."""
    params = history.setup.get("parameters")
    if not isinstance(params, dict):
        return None
    value = params.get(name, params.get(name.replace("-", "_")))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def exact_recorded(history: MigrationHistory) -> bool:
    """Whether the rows carry the engine's exact figures (interval, threshold...)."""
    return any(r.interval_ms > 0 or r.threshold_bytes > 0 for r in history.iterations)


def dirty_rates_pages_per_s(history: MigrationHistory) -> list[float | None]:
    """Each row's dirty rate: exact when recorded (None for the first and the
    stopped row), else (older histories) QEMU's ``dirty-pages-rate``."""
    if not exact_recorded(history):
        return [r.dirty_rate_pages_per_s for r in history.iterations]
    return [r.exact_dirty_rate_pages_per_s if r.interval_ms > 0 and not r.final else None
            for r in history.iterations]


def thresholds_bytes(history: MigrationHistory) -> list[float | None]:
    """The ``threshold_size`` each row's switchover test used (None if unknown).

    The recorded ``threshold-bytes`` when the history has it; else (older
    histories) ``expected_bw x downtime-limit`` rebuilt with ``expected_bw``
    the ``avail-switchover-bandwidth`` parameter when non-zero, or the
    bandwidth recorded on the previous row (see the module docstring).
    """
    if exact_recorded(history):
        return [float(r.threshold_bytes) if r.threshold_bytes > 0 else None
                for r in history.iterations]
    limit_ms = parameter(history, "downtime-limit")
    avail = parameter(history, "avail-switchover-bandwidth") or 0.0
    out: list[float | None] = []
    prev_bw: float | None = None
    for rec in history.iterations:
        bw = avail if avail > 0 else prev_bw
        out.append(None if limit_ms is None or not bw else bw * limit_ms / 1000.0)
        prev_bw = rec.bandwidth_bytes_per_s
    return out


def render_plots(runs: list[PlotRun]) -> dict[str, bytes]:
    """Render every plot of :data:`PLOTS` to PNG bytes, keyed by file name.

    Args:
        runs: the histories to overlay, with unique labels.

    Returns:
        ``{file name: PNG bytes}`` in :data:`PLOTS` order.  Nothing is
        written to disk.
    """
    out: dict[str, bytes] = {}
    for name in PLOTS:
        buf = io.BytesIO()
        figure(name, runs).savefig(buf, format="png", metadata={"Software": None})
        out[name] = buf.getvalue()
    return out


def figure(name: str, runs: list[PlotRun]) -> Figure:
    """The matplotlib Figure of plot ``name`` (a key of :data:`PLOTS`), not rendered."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    palette = colormaps["tab10" if len(runs) <= 10 else "tab20"].colors
    colors = [palette[i % len(palette)] for i in range(len(runs))]
    drawers = {
        "remaining.png": _plot_remaining,
        "dirty-rate-vs-bandwidth.png": _plot_rates,
        "pages.png": _plot_pages,
        "downtime.png": _plot_downtime,
        "throttle.png": _plot_throttle,
        "timeline.png": _plot_timeline,
    }
    size = _FIG_SIZE_IN
    if name == "timeline.png":
        size = (_FIG_SIZE_IN[0], max(6.0, 1.2 + 0.45 * sum(1 + (r.history.destination is not None)
                                                            for r in runs)))
    elif name == "downtime.png" and len(runs) > MANY_RUNS:
        size = (_FIG_SIZE_IN[0], 6.5)
    fig = Figure(figsize=size, dpi=_DPI, layout="constrained")
    drawers[name](fig, runs, colors)
    return fig


def _legend(ax: Axes, **kwargs) -> None:
    # Only when something is labelled: an empty legend() warns, and the
    # test suite turns warnings into errors.
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize="small", **kwargs)


def _no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def _plot_remaining(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    from matplotlib.lines import Line2D

    ax = fig.add_subplot()
    ax.set_title("Remaining bytes after each dirty sync")
    ax.set_xlabel("time since migration start (s)")
    ax.set_ylabel("remaining (MiB, log scale)")
    # Log scale: pre-copy shrinks remaining geometrically when it converges,
    # and the threshold is often 1-5 % of the first pass, invisible on a
    # linear axis.  A remaining of 0 (idle guest) is drawn on the floor.
    positive = [r.remaining_bytes / MIB for run in runs for r in run.history.iterations
                if r.remaining_bytes > 0]
    positive += [t / MIB for run in runs for t in thresholds_bytes(run.history) if t]
    floor = min(positive) / 2 if positive else 1.0
    drew_threshold = drew_switchover = drew_decided = False
    many = len(runs) > MANY_RUNS  # an overlay (a sweep): markers only, no per-point text
    for run, color in zip(runs, colors):
        recs = run.history.iterations
        if not recs:
            continue
        t_s = [r.time_ms / 1000.0 for r in recs]
        rem = [max(r.remaining_bytes / MIB, floor) for r in recs]
        live = [i for i, r in enumerate(recs) if not r.final]
        ax.plot([t_s[i] for i in live], [rem[i] for i in live], "o-", color=color,
                label=run.label, markersize=4)
        for i in live if not many else ():
            ax.annotate(str(recs[i].iteration), (t_s[i], rem[i]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7, color=color)
        # Each sync's threshold over the interval that led to it (what the
        # test at that sync compared remaining with), ending in a tick.
        thr = thresholds_bytes(run.history)
        spans = [(t_s[i - 1] if i else 0.0, t_s[i], thr[i] / MIB) for i in live if thr[i] is not None]
        if spans:
            ax.plot(*_segments(spans), color=color, linestyle=":", linewidth=1.4)
            ax.plot([sp[1] for sp in spans], [sp[2] for sp in spans], "_", color=color, markersize=12)
            drew_threshold = True
        for i in live:
            if recs[i].switchover:  # the sync whose test decided to stop the guest
                ax.plot([t_s[i]], [rem[i]], "D", color=color, markersize=8, markeredgecolor="k",
                        zorder=5)
                note = f"decided: remaining {recs[i].remaining_bytes / MIB:,.1f} MiB"
                if run.history.setup.get("parameters", {}).get("x-predictive-switchover") is True:
                    note += f"\npredicted {recs[i].predicted_downtime_ms:,.0f} ms fits"
                elif thr[i] is not None:
                    note += f"\n< threshold {thr[i] / MIB:,.1f} MiB"
                if not many:
                    ax.annotate(note, (t_s[i], rem[i]), textcoords="offset points", xytext=(-8, -4),
                                ha="right", va="top", fontsize=7, color=color)
                drew_decided = True
        finals = [i for i, r in enumerate(recs) if r.final]
        if finals:
            f = finals[0]
            before = [i for i in live if i < f]
            if before:  # the switchover: last pre-copy sync -> final sync
                ax.plot([t_s[before[-1]], t_s[f]], [rem[before[-1]], rem[f]], "--", color=color)
            ax.plot([t_s[f]], [rem[f]], "*", color=color, markersize=13, markeredgecolor="k")
            ax.axvline(t_s[f], color=color, linestyle="-.", linewidth=0.8, alpha=0.7)
            if not many:
                ax.annotate("switchover", (t_s[f], 1.0), xycoords=("data", "axes fraction"),
                            xytext=(-3, -12), textcoords="offset points", rotation=90,
                            ha="right", va="top", fontsize=7, color=color)
            drew_switchover = True
        elif run.history.status in ("cancelled", "failed") and live:
            ax.plot([t_s[live[-1]]], [rem[live[-1]]], "X", color=color, markersize=10,
                    markeredgecolor="k")
            if many:
                continue
            ax.annotate(run.history.status, (t_s[live[-1]], rem[live[-1]]),
                        textcoords="offset points", xytext=(0, -16), ha="center", va="top",
                        fontsize=8, color=color)
    # Style keys in grey, so they do not read as one of the runs.
    if drew_threshold:
        ax.add_line(Line2D([], [], color="0.3", linestyle=":", marker="_",
                           label="threshold used = bandwidth x downtime-limit"))
    if drew_decided:
        ax.add_line(Line2D([], [], color="0.5", marker="D", markersize=7, linestyle="none",
                           markeredgecolor="k", label="switchover decided at this sync"))
    if drew_switchover:
        ax.add_line(Line2D([], [], color="0.5", marker="*", markersize=11, linestyle="none",
                           markeredgecolor="k", label="final sync (VM stopped)"))
    if not any(r.history.iterations for r in runs):
        _no_data(ax, "no iterations recorded")
    else:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 1.5)
        _plain_log_ticks(ax)
    ax.grid(True, alpha=0.3)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _segments(spans: list[tuple[float, float, float]]) -> tuple[list[float], list[float]]:
    """Horizontal segments (x0, x1, y) as one polyline with NaN breaks."""
    xs: list[float] = []
    ys: list[float] = []
    for x0, x1, y in spans:
        xs += [x0, x1, math.nan]
        ys += [y, y, math.nan]
    return xs, ys


def _plot_rates(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    from matplotlib.lines import Line2D

    ax = fig.add_subplot()
    ax.set_title("Dirty rate vs throughput (exact where measured; QEMU's estimate at each sync)",
                 fontsize="medium")
    ax.set_xlabel("time since migration start (s)")
    ax.set_ylabel("rate (MiB/s, log scale)")
    drew = False
    decided = False
    for run, color in zip(runs, colors):
        page = page_size_bytes(run.history)
        recs = run.history.iterations
        if not recs:
            continue
        t_s = [r.time_ms / 1000.0 for r in recs]
        if not exact_recorded(run.history):  # an older history: QEMU's figures only
            live = [i for i, r in enumerate(recs) if not r.final]
            ax.plot([t_s[i] for i in live], [_pos(recs[i].bandwidth_bytes_per_s / MIB) for i in live],
                    "o-", color=color, label=f"{run.label}: bandwidth (QEMU)", markersize=4)
            ax.plot([t_s[i] for i in live],
                    [_pos(recs[i].dirty_rate_pages_per_s * page / MIB) for i in live], "s--",
                    color=color, label=f"{run.label}: dirty-pages-rate (QEMU)", markersize=4,
                    markerfacecolor="none")
            drew = True
            continue
        dirty = [(t - r.interval_ms / 1000.0, t, r.exact_dirty_rate_pages_per_s * page / MIB)
                 for t, r in zip(t_s, recs) if r.interval_ms > 0 and not r.final
                 and r.exact_dirty_rate_pages_per_s > 0]
        thr = [(t, t + r.duration_ms / 1000.0, r.throughput_bytes_per_s / MIB)
               for t, r in zip(t_s, recs) if r.throughput_bytes_per_s > 0]
        if dirty:
            ax.plot(*_segments(dirty), "-", color=color, linewidth=2.2,
                    label=f"{run.label}: dirty rate (exact)")
        if thr:
            ax.plot(*_segments(thr), "-.", color=color, linewidth=1.4,
                    label=f"{run.label}: throughput while sending")
        est = [(t, r.bandwidth_bytes_per_s / MIB) for t, r in zip(t_s, recs)
               if r.bandwidth_bytes_per_s > 0 and not r.final]
        if est:
            ax.plot([e[0] for e in est], [e[1] for e in est], "x:", color=color, markersize=7,
                    label=f"{run.label}: bandwidth estimate (QEMU window)")
        qemu = [(t, r.dirty_rate_pages_per_s * page / MIB) for t, r in zip(t_s, recs)
                if r.dirty_rate_pages_per_s > 0 and not r.final]
        if qemu:
            ax.plot([q[0] for q in qemu], [q[1] for q in qemu], "s", color=color, markersize=5,
                    markerfacecolor="none", label=f"{run.label}: dirty-pages-rate (QEMU)")
        nvcpu = max((len(r.vcpu_write_rates_pages_per_s) for r in recs), default=0)
        if nvcpu >= 2:  # one line per vCPU: pages it wrote / interval
            for v, style in zip(range(nvcpu), _VCPU_STYLES * nvcpu):
                spans = [(t - r.interval_ms / 1000.0, t, r.vcpu_write_rates_pages_per_s[v] * page / MIB)
                         for t, r in zip(t_s, recs)
                         if len(r.vcpu_write_rates_pages_per_s) > v and r.interval_ms > 0
                         and not r.final and r.vcpu_write_rates_pages_per_s[v] > 0]
                if spans:
                    ax.plot(*_segments(spans), linestyle=style, color=color, linewidth=0.9,
                            alpha=0.8, label=f"{run.label}: vCPU {v} writes")
        for t, r in zip(t_s, recs):
            if r.switchover:
                ax.axvline(t, color=color, linestyle="--", linewidth=1.0, alpha=0.8)
                ax.annotate(f"switchover decided (sync {r.iteration})", (t, 1.0),
                            xycoords=("data", "axes fraction"), xytext=(-3, -6),
                            textcoords="offset points", rotation=90, ha="right", va="top",
                            fontsize=7, color=color)
                decided = True
        drew = drew or bool(dirty or thr or est)
    if decided:
        ax.add_line(Line2D([], [], color="0.4", linestyle="--", label="switchover decided"))
    if not drew:
        _no_data(ax, "no rates recorded")
    else:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.grid(True, alpha=0.3)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


_VCPU_STYLES = (":", (0, (5, 1, 1, 1)), (0, (1, 2)), (0, (3, 1, 1, 1, 1, 1)))


def _pos(value: float) -> float:
    """A value for a log axis: non-positive ones become gaps."""
    return value if value > 0 else math.nan


def _plot_pages(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    ax = fig.add_subplot()
    ax.set_title("Pages sent per iteration")
    ax.set_xlabel("iteration (dirty-sync-count)")
    ax.set_ylabel("pages sent")
    n = max(len(runs), 1)
    width = 0.8 / n
    handles = []
    for k, (run, color) in enumerate(zip(runs, colors)):
        recs = run.history.iterations
        if not recs:
            continue
        x = [r.iteration - 0.4 + width * (k + 0.5) for r in recs]
        normal = [r.normal_pages for r in recs]
        ax.bar(x, normal, width=width, color=color, edgecolor="k", linewidth=0.3)
        ax.bar(x, [r.zero_pages for r in recs], width=width, bottom=normal, color=color,
               alpha=0.35, hatch="//", edgecolor="k", linewidth=0.3)
        handles.append(Patch(facecolor=color, edgecolor="k", label=run.label))
    if handles:
        handles += [Patch(facecolor="0.5", edgecolor="k", label="normal pages (solid)"),
                    Patch(facecolor="0.5", alpha=0.35, hatch="//", edgecolor="k",
                          label="zero pages (hatched)")]
        ax.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        _no_data(ax, "no iterations recorded")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(True, axis="y", alpha=0.3)
    _integer_xticks(ax)


def _plot_downtime(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    from matplotlib import colormaps

    ax = fig.add_subplot()
    ax.set_title("Downtime breakdown (VM stopped until it runs on the destination)")
    ax.set_ylabel("downtime (ms)")
    part_colors = colormaps["Set2"].colors
    xs = list(range(len(runs)))
    many = len(runs) > MANY_RUNS
    labelled: set[str] = set()
    top = 0.0
    limits: list[float | None] = [parameter(r.history, "downtime-limit") for r in runs]
    for x, run in zip(xs, runs):
        dt = run.history.downtime
        if dt is None:
            ax.text(x, 0, f"no downtime ({run.history.status})" if many else
                    f"no downtime\n({run.history.status})", ha="center", va="bottom",
                    fontsize=7 if many else 8, color="0.35", rotation=90 if many else 0)
            continue
        bottom = 0.0
        for (field_name, label), pc in zip(DOWNTIME_PARTS, part_colors):
            value = float(getattr(dt, field_name))
            ax.bar([x], [value], bottom=[bottom], width=0.55, color=pc, edgecolor="k",
                   linewidth=0.3, label=None if label in labelled else label)
            labelled.add(label)
            bottom += value
        other = dt.total_ms - bottom
        if other > 1e-6:
            ax.bar([x], [other], bottom=[bottom], width=0.55, color="0.85", edgecolor="k",
                   linewidth=0.3, hatch="..",
                   label=None if "other" in labelled else "other (total - parts)")
            labelled.add("other")
            bottom += other
        ax.annotate(f"{max(bottom, dt.total_ms):.0f}" if many else f"{max(bottom, dt.total_ms):.1f} ms",
                    (x, max(bottom, dt.total_ms)), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=6 if many else 8)
        top = max(top, bottom, dt.total_ms)
    # What was promised at the switchover: the engine's prediction and QEMU's
    # expected downtime (remaining / bandwidth) of the deciding row.
    drew_pred = drew_exp = False
    for x, run in zip(xs, runs):
        if run.history.downtime is None:
            continue
        pred = run.history.downtime_prediction
        if pred is not None and pred.total_ms > 0:
            ax.plot([x + 0.33], [pred.total_ms], marker="<", color="k", markersize=8, linestyle="none",
                    label=None if drew_pred else "predicted (engine model)")
            if not many:
                ax.annotate(f"{pred.total_ms:.0f}", (x + 0.36, pred.total_ms), xytext=(4, -3),
                            textcoords="offset points", fontsize=7)
            drew_pred = True
            top = max(top, pred.total_ms)
        decided = [r for r in run.history.iterations if r.switchover]
        if decided and decided[-1].expected_downtime_ms > 0:
            exp = decided[-1].expected_downtime_ms
            ax.plot([x - 0.33], [exp], marker=">", color="0.45", markersize=8, linestyle="none",
                    label=None if drew_exp else "QEMU expected (remaining / bandwidth)")
            if not many:
                ax.annotate(f"{exp:.0f}", (x - 0.36, exp), xytext=(-4, -3), textcoords="offset points",
                            fontsize=7, ha="right")
            drew_exp = True
            top = max(top, exp)
    # downtime-limit is a target for the switchover decision, not a cap: the
    # real downtime is often far below it (the last pages go unthrottled),
    # or above it (device state, slow resume).  Draw it when it fits the
    # scale, and always name it under the bar.
    drew_limit = False
    for x, run, limit in zip(xs, runs, limits):
        if run.history.downtime is not None and limit is not None and limit <= 1.5 * top:
            ax.hlines(limit, x - 0.36, x + 0.36, colors="crimson", linestyles="--",
                      label=None if drew_limit else "downtime-limit")
            drew_limit = True
            top = max(top, limit)
    if many:
        ax.set_xticks(xs, [r.label for r in runs], fontsize=6, rotation=55, ha="right",
                      rotation_mode="anchor")
    else:
        ax.set_xticks(xs, [r.label if limit is None else f"{r.label}\n(downtime-limit {limit:g} ms)"
                           for r, limit in zip(runs, limits)], fontsize="small")
    for tick, color in zip(ax.get_xticklabels(), colors):
        tick.set_color(color)
    ax.set_xlim(-0.7, max(len(runs) - 1, 0) + 0.7)
    ax.set_ylim(0, (top or 1.0) * 1.2)
    if ax.get_ylim()[1] < 1.0:
        ax.set_ylim(0, 1.0)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plot_throttle(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    ax_t, ax_d = fig.subplots(2, 1, sharex=True)
    fig.suptitle("Auto-converge throttle; QEMU's expected and the engine's predicted downtime per sync")
    ax_t.set_ylabel("cpu-throttle (%)")
    ax_d.set_ylabel("downtime estimate (ms)")
    ax_d.set_xlabel("iteration (dirty-sync-count)")
    positive = False
    limits: set[float] = set()
    for run, color in zip(runs, colors):
        recs = run.history.iterations
        if not recs:
            continue
        it = [r.iteration for r in recs]
        ax_t.step(it, [r.throttle_pct for r in recs], where="post", color=color,
                  marker="o", markersize=3, label=run.label)
        # 0 means "not estimated yet" (QEMU only estimates after >10000
        # bytes moved); the axis is logarithmic, so such rows are gaps.
        exp = [r.expected_downtime_ms if r.expected_downtime_ms > 0 else math.nan for r in recs]
        positive = positive or any(not math.isnan(v) for v in exp)
        ax_d.plot(it, exp, "o-", color=color, markersize=3, label=f"{run.label}: QEMU expected")
        pred = [r.predicted_downtime_ms if r.predicted_downtime_ms > 0 else math.nan for r in recs]
        if any(not math.isnan(v) for v in pred):
            ax_d.plot(it, pred, "^--", color=color, markersize=3, markerfacecolor="none",
                      label=f"{run.label}: predicted (model)")
            positive = True
        limit = parameter(run.history, "downtime-limit")
        if limit is not None and limit > 0:
            limits.add(limit)
    for limit in sorted(limits):
        ax_d.axhline(limit, color="crimson", linestyle="--", linewidth=1,
                     label=f"downtime-limit {limit:g} ms")
    if positive:
        ax_d.set_yscale("log")
        _plain_log_ticks(ax_d)
    else:
        _no_data(ax_d, "no estimate recorded")
    ax_t.set_ylim(0, 100)
    for ax in (ax_t, ax_d):
        ax.grid(True, alpha=0.3)
    _integer_xticks(ax_d)
    _legend(ax_t, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _legend(ax_d, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _timeline_spans(history: MigrationHistory) -> tuple[list, list, float | None]:
    """Source bars [(start_ms, length_ms, label, kind)], destination events
    [(ms, label)] relative to the source's start, and the downtime start."""
    recs = history.iterations
    src: list[tuple[float, float, str, str]] = []
    if history.setup_time_ms:
        src.append((0.0, history.setup_time_ms, "setup", "setup"))
    for r in recs:
        if not r.final and r.duration_ms > 0:
            src.append((r.time_ms, r.duration_ms, f"iteration {r.iteration}", "iteration"))
    dt = history.downtime
    dt_start = None
    finals = [r for r in recs if r.final]
    if dt is not None and finals:
        dt_start = finals[0].time_ms - dt.final_sync_ms - dt.stop_vcpus_ms
        t = dt_start
        for name, label in DOWNTIME_PARTS:
            length = float(getattr(dt, name))
            src.append((t, length, label, name))
            t += length
    dst: list[tuple[float, str]] = []
    tl, start = history.destination, history.start_unix_ms
    if tl is not None and start:
        names = (("accepted_unix_ms", "connection accepted"), ("first_byte_unix_ms", "first byte"),
                 ("stream_received_unix_ms", "stream received (EOF)"),
                 ("device_state_loaded_unix_ms", "device state loaded"),
                 ("acknowledged_unix_ms", "acknowledged"),
                 ("resumed_unix_ms", "resumed (cont after -S)" if tl.resumed_by_cont else "resumed"))
        dst = [(getattr(tl, n) - start, label) for n, label in names if getattr(tl, n)]
    return src, dst, dt_start


def _plot_timeline(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    from matplotlib import colormaps

    ax_all, ax_zoom = fig.subplots(2, 1)
    fig.suptitle("Timeline: source iterations and downtime phases; what the destination saw")
    part_colors = dict(zip((n for n, _ in DOWNTIME_PARTS), colormaps["Set2"].colors))
    markers = {"connection accepted": "|", "first byte": "|", "stream received (EOF)": "s",
               "device state loaded": "D", "acknowledged": "v"}
    lanes: list[str] = []
    windows: list[tuple[float, float]] = []
    labelled: set[str] = set()
    for run, color in zip(runs, colors):
        src, dst, dt_start = _timeline_spans(run.history)
        y_src = len(lanes)
        lanes.append("source" if len(runs) == 1 else f"{run.label}\nsource")
        y_dst = None
        if dst:
            y_dst = len(lanes)
            lanes.append("destination" if len(runs) == 1 else f"{run.label}\ndestination")
        for ax in (ax_all, ax_zoom):
            for k, (t0, length, label, kind) in enumerate(src):
                if kind in part_colors:
                    fc, lab = part_colors[kind], f"downtime: {label}"
                elif kind == "setup":
                    fc, lab = "0.75", "setup"
                else:
                    fc, lab = color, "pre-copy iteration"
                ax.broken_barh([(t0, max(length, 1e-3))], (y_src - 0.35, 0.7), facecolors=fc,
                               alpha=0.55 if kind == "iteration" and k % 2 else 0.9,
                               edgecolor="k", linewidth=0.3,
                               label=lab if ax is ax_all and lab not in labelled else None)
                if ax is ax_all:
                    labelled.add(lab)
            if y_dst is not None:
                times = dict((label, t) for t, label in dst)
                first, eof = times.get("first byte"), times.get("stream received (EOF)")
                if first is not None and eof is not None:
                    ax.broken_barh([(first, max(eof - first, 1e-3))], (y_dst - 0.2, 0.4),
                                   facecolors=color, alpha=0.3, edgecolor=color,
                                   label="destination receiving" if ax is ax_all
                                   and "recv" not in labelled else None)
                    if ax is ax_all:
                        labelled.add("recv")
                for t, label in dst:
                    m = "^" if label.startswith("resumed") else markers.get(label, "o")
                    ax.plot([t], [y_dst], marker=m, color="k", markersize=7, linestyle="none",
                            label=label if ax is ax_all and label not in labelled else None)
                    if ax is ax_all:
                        labelled.add(label)
        if dt_start is not None:
            ends = [t0 + length for t0, length, _, kind in src if kind in part_colors]
            dst_t = [t for t, label in dst if not label.startswith("resumed (cont")]
            hi = max(ends + [t for t in dst_t if t >= dt_start])
            windows.append((dt_start, hi))
    for ax in (ax_all, ax_zoom):
        ax.set_yticks(range(len(lanes)), lanes, fontsize="small")
        ax.set_ylim(-0.6, max(len(lanes), 1) - 0.4)
        ax.invert_yaxis()
        ax.grid(True, axis="x", alpha=0.3)
    ax_all.set_xlabel("ms since the migration started (source clock; destination by wall clock)",
                      fontsize="small")
    if windows:
        lo = min(w[0] for w in windows)
        hi = max(w[1] for w in windows)
        pad = max((hi - lo) * 0.15, 0.5)
        ax_zoom.set_xlim(lo - pad, hi + pad)
        ax_zoom.set_title("zoom: the downtime (source stopped) until the destination acknowledged",
                          fontsize="small")
    else:
        ax_zoom.set_title("no switchover: nothing to zoom on", fontsize="small")
    ax_zoom.set_xlabel("ms since the migration started", fontsize="small")
    if not lanes:
        _no_data(ax_all, "no timeline recorded")
    _legend(ax_all, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _plain_log_ticks(ax: Axes) -> None:
    """1-2-5 ticks written as plain numbers (no 10^x) on a log y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _integer_xticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
