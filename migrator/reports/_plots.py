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
from typing import TYPE_CHECKING, Any

from ._plot_common import (
    DOWNTIME_PARTS,
    MANY_RUNS,
    MIB,
    PlotRun,
    dirty_rates_pages_per_s,
    exact_recorded,
    integer_xticks,
    legend,
    no_data,
    page_size_bytes,
    palette,
    parameter,
    plain_log_ticks,
    pos_or_nan,
    thresholds_bytes,
)
from ._plots_phases import plot_downtime, plot_throttle, plot_timeline

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DOWNTIME_PARTS",
    "MANY_RUNS",
    "MIB",
    "PLOTS",
    "PlotRun",
    "dirty_rates_pages_per_s",
    "exact_recorded",
    "figure",
    "page_size_bytes",
    "parameter",
    "render_plots",
    "thresholds_bytes",
]

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


_FIG_SIZE_IN = (9.0, 4.8)


_DPI = 110


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
    from matplotlib.figure import Figure

    listed = palette("tab10" if len(runs) <= 10 else "tab20")
    colors = [listed[i % len(listed)] for i in range(len(runs))]
    drawers = {
        "remaining.png": _plot_remaining,
        "dirty-rate-vs-bandwidth.png": _plot_rates,
        "pages.png": _plot_pages,
        "downtime.png": plot_downtime,
        "throttle.png": plot_throttle,
        "timeline.png": plot_timeline,
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


def _plot_remaining(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
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
        spans = [(t_s[i - 1] if i else 0.0, t_s[i], t / MIB) for i in live if (t := thr[i]) is not None]
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
                elif (t := thr[i]) is not None:
                    note += f"\n< threshold {t / MIB:,.1f} MiB"
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
        no_data(ax, "no iterations recorded")
    else:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 1.5)
        plain_log_ticks(ax)
    ax.grid(True, alpha=0.3)
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _segments(spans: list[tuple[float, float, float]]) -> tuple[list[float], list[float]]:
    """Horizontal segments (x0, x1, y) as one polyline with NaN breaks."""
    xs: list[float] = []
    ys: list[float] = []
    for x0, x1, y in spans:
        xs += [x0, x1, math.nan]
        ys += [y, y, math.nan]
    return xs, ys


def _plot_rates(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
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
            ax.plot([t_s[i] for i in live], [pos_or_nan(recs[i].bandwidth_bytes_per_s / MIB) for i in live],
                    "o-", color=color, label=f"{run.label}: bandwidth (QEMU)", markersize=4)
            ax.plot([t_s[i] for i in live],
                    [pos_or_nan(recs[i].dirty_rate_pages_per_s * page / MIB) for i in live], "s--",
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
        no_data(ax, "no rates recorded")
    else:
        ax.set_yscale("log")
        plain_log_ticks(ax)
    ax.grid(True, alpha=0.3)
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


_VCPU_STYLES = (":", (0, (5, 1, 1, 1)), (0, (1, 2)), (0, (3, 1, 1, 1, 1, 1)))


def _plot_pages(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
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
        no_data(ax, "no iterations recorded")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, pos_or_nan: f"{v:,.0f}"))
    ax.grid(True, axis="y", alpha=0.3)
    integer_xticks(ax)
