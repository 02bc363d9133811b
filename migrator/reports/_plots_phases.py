"""The report's phase plots: downtime breakdown, CPU throttle and predicted
downtime per iteration, and the source/destination timeline (see
``_plots.py`` for how the plots are read against QEMU's rules)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._plot_common import (
    DOWNTIME_PARTS,
    MANY_RUNS,
    PlotRun,
    integer_xticks,
    legend,
    no_data,
    palette,
    parameter,
    plain_log_ticks,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..engine._history import MigrationHistory

__all__ = ["plot_downtime", "plot_throttle", "plot_timeline"]


def plot_downtime(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
    ax = fig.add_subplot()
    ax.set_title("Downtime breakdown (VM stopped until it runs on the destination)")
    ax.set_ylabel("downtime (ms)")
    part_colors = palette("Set2")
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
                      label="_nolegend_" if drew_limit else "downtime-limit")
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
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def plot_throttle(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
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
        plain_log_ticks(ax_d)
    else:
        no_data(ax_d, "no estimate recorded")
    ax_t.set_ylim(0, 100)
    for ax in (ax_t, ax_d):
        ax.grid(True, alpha=0.3)
    integer_xticks(ax_d)
    legend(ax_t, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    legend(ax_d, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _timeline_spans(history: MigrationHistory) -> tuple[list[tuple[float, float, str, str]], list[tuple[float, str]],
                                                        float | None]:
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


def plot_timeline(fig: Figure, runs: list[PlotRun], colors: list[Any]) -> None:
    ax_all, ax_zoom = fig.subplots(2, 1)
    fig.suptitle("Timeline: source iterations and downtime phases; what the destination saw")
    part_colors = dict(zip((n for n, _ in DOWNTIME_PARTS), palette("Set2")))
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
        no_data(ax_all, "no timeline recorded")
    legend(ax_all, loc="upper left", bbox_to_anchor=(1.01, 1.0))
