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
A history row describes one sync *and the sending that followed it*, so the
bandwidth QEMU knew at sync k is the one recorded on row k-1; the threshold
drawn for row k uses that, and row 1 (the setup sync, nothing sent yet) has
none.  ``expected_downtime = remaining / expected_bw`` is the same test
expressed in time: it is below ``downtime-limit`` exactly when the pending
bytes are below the threshold.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ._history import MigrationHistory

MIB = 1 << 20

#: File names of the plots, in the order they appear in the report, with a
#: short caption each.
PLOTS: dict[str, str] = {
    "remaining.png": "Remaining bytes after each dirty sync, with the switchover",
    "dirty-rate-vs-bandwidth.png": "Dirty rate against bandwidth per iteration",
    "pages.png": "Pages sent per iteration (normal vs zero)",
    "downtime.png": "Downtime breakdown",
    "throttle.png": "CPU throttle and expected downtime per iteration",
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


def thresholds_bytes(history: MigrationHistory) -> list[float | None]:
    """QEMU's ``threshold_size`` as known at each row's sync (None if unknown).

    ``expected_bw x downtime-limit``, with ``expected_bw`` the
    ``avail-switchover-bandwidth`` parameter when non-zero, else the
    bandwidth recorded on the previous row (see the module docstring).
    """
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
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    palette = colormaps["tab10"].colors
    colors = [palette[i % len(palette)] for i in range(len(runs))]
    drawers = {
        "remaining.png": _plot_remaining,
        "dirty-rate-vs-bandwidth.png": _plot_rates,
        "pages.png": _plot_pages,
        "downtime.png": _plot_downtime,
        "throttle.png": _plot_throttle,
    }
    out: dict[str, bytes] = {}
    for name in PLOTS:
        fig = Figure(figsize=_FIG_SIZE_IN, dpi=_DPI, layout="constrained")
        drawers[name](fig, runs, colors)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        out[name] = buf.getvalue()
    return out


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
    drew_threshold = drew_switchover = False
    for run, color in zip(runs, colors):
        recs = run.history.iterations
        if not recs:
            continue
        t_s = [r.time_ms / 1000.0 for r in recs]
        rem = [max(r.remaining_bytes / MIB, floor) for r in recs]
        live = [i for i, r in enumerate(recs) if not r.final]
        ax.plot([t_s[i] for i in live], [rem[i] for i in live], "o-", color=color,
                label=run.label, markersize=4)
        for i in live:
            ax.annotate(str(recs[i].iteration), (t_s[i], rem[i]), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize=7, color=color)
        thr = thresholds_bytes(run.history)
        pts = [(t_s[i], thr[i] / MIB) for i in live if thr[i] is not None]
        if pts:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color,
                    linestyle=":", linewidth=1.2)
            drew_threshold = True
        finals = [i for i, r in enumerate(recs) if r.final]
        if finals:
            f = finals[0]
            before = [i for i in live if i < f]
            if before:  # the switchover: last pre-copy sync -> final sync
                ax.plot([t_s[before[-1]], t_s[f]], [rem[before[-1]], rem[f]], "--", color=color)
            ax.plot([t_s[f]], [rem[f]], "*", color=color, markersize=13, markeredgecolor="k")
            ax.axvline(t_s[f], color=color, linestyle="-.", linewidth=0.8, alpha=0.7)
            ax.annotate("switchover", (t_s[f], 1.0), xycoords=("data", "axes fraction"),
                        xytext=(-3, -12), textcoords="offset points", rotation=90,
                        ha="right", va="top", fontsize=7, color=color)
            drew_switchover = True
        elif run.history.status in ("cancelled", "failed") and live:
            ax.plot([t_s[live[-1]]], [rem[live[-1]]], "X", color=color, markersize=10,
                    markeredgecolor="k")
            ax.annotate(run.history.status, (t_s[live[-1]], rem[live[-1]]),
                        textcoords="offset points", xytext=(0, -16), ha="center", va="top",
                        fontsize=8, color=color)
    # Style keys in grey, so they do not read as one of the runs.
    if drew_threshold:
        ax.add_line(Line2D([], [], color="0.3", linestyle=":",
                           label="threshold = bandwidth x downtime-limit"))
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


def _plot_rates(fig: Figure, runs: list[PlotRun], colors: list) -> None:
    ax = fig.add_subplot()
    ax.set_title("Dirty rate vs bandwidth (pre-copy iterations; final stopped pass not shown)",
                 fontsize="medium")
    ax.set_xlabel("iteration (dirty-sync-count)")
    ax.set_ylabel("rate (MiB/s)")
    for run, color in zip(runs, colors):
        page = page_size_bytes(run.history)
        recs = [r for r in run.history.iterations if not r.final]
        if not recs:
            continue
        it = [r.iteration for r in recs]
        ax.plot(it, [r.bandwidth_bytes_per_s / MIB for r in recs], "o-", color=color,
                label=f"{run.label}: bandwidth", markersize=4)
        ax.plot(it, [r.dirty_rate_pages_per_s * page / MIB for r in recs], "s--", color=color,
                label=f"{run.label}: dirty rate", markersize=4, markerfacecolor="none")
    if not any(r.history.iterations for r in runs):
        _no_data(ax, "no iterations recorded")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    _integer_xticks(ax)
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


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
    labelled: set[str] = set()
    top = 0.0
    limits: list[float | None] = [parameter(r.history, "downtime-limit") for r in runs]
    for x, run in zip(xs, runs):
        dt = run.history.downtime
        if dt is None:
            ax.text(x, 0, f"no downtime\n({run.history.status})", ha="center", va="bottom",
                    fontsize=8, color="0.35")
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
        ax.annotate(f"{max(bottom, dt.total_ms):.1f} ms", (x, max(bottom, dt.total_ms)),
                    textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        top = max(top, bottom, dt.total_ms)
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
    fig.suptitle("Auto-converge throttle and expected downtime per iteration")
    ax_t.set_ylabel("cpu-throttle (%)")
    ax_d.set_ylabel("expected downtime (ms)")
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
        ax_d.plot(it, exp, "o-", color=color, markersize=3)
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


def _plain_log_ticks(ax: Axes) -> None:
    """1-2-5 ticks written as plain numbers (no 10^x) on a log y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _integer_xticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
