"""``migrator report``: a convergence report from recorded migration histories.

Input is one or more :class:`~migrator.engine._history.MigrationHistory` JSON
documents (``x-query-migration-history``, or the object ``migrator demo
--json`` prints, whose ``"history"`` key holds one).  Output, in one
directory:

- ``report.md``: how to read it, a side-by-side summary table, image links,
  and per-run downtime and iteration tables;
- ``report.html``: the same, self-contained (inline CSS, plots embedded as
  ``data:image/png;base64`` URIs, no external resource);
- ``report.json``: one row per iteration per run (the history's own fields
  plus ``"run"``), and per-run setup and summary;
- the PNG plots of :data:`migrator.reports._plots.PLOTS`.

Several histories overlay in one report (auto-converge on vs off,
write-protect-all on vs off...): one colour and one summary column per run.

Like guestperf's plot (tests/migration-stress/guestperf/plot.py), the time
axis is time since the migration started and each dirty sync is an
iteration marker; unlike guestperf the rows were recorded by the engine at
each sync rather than polled from ``query-migrate`` every 50 ms.

Everything is rendered in memory first and written at the end, so an input
error writes nothing.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from ..engine._history import DowntimeBreakdown, MigrationHistory
from ._plots import DOWNTIME_PARTS, MIB, PLOTS, PlotRun, dirty_rates_pages_per_s, exact_recorded, \
    page_size_bytes, parameter, render_plots, thresholds_bytes
from ._report_input import ReportInputError, history_from_document, is_number, load_history
from ._tables import md_table

__all__ = [
    "DEFAULT_TITLE",
    "REPORT_SCHEMA_VERSION",
    "ReportInputError",
    "ReportPaths",
    "RunSummary",
    "history_from_document",
    "load_history",
    "report_main",
    "summarize",
    "write_report",
]

REPORT_SCHEMA_VERSION = 1

DEFAULT_TITLE = "Migration convergence report"

#: The paragraph at the top of report.md / report.html.
HOW_TO_READ = (
    "Pre-copy live migration first sends all of guest RAM while the guest keeps "
    "running, then, pass after pass, re-sends the pages the guest dirtied in the "
    "meantime. Each pass starts with a dirty sync (one iteration, counted by "
    "dirty-sync-count). After a sync QEMU compares what is still pending "
    "(\"remaining\") with what it could send within the allowed pause: the "
    "threshold is the measured bandwidth times the downtime-limit parameter. "
    "As soon as pending is below bandwidth x downtime-limit it switches over: "
    "it stops the vCPUs, does a final sync, sends the last pages and the device "
    "state, and the guest resumes on the destination; that pause is the "
    "downtime. A migration converges when remaining shrinks from pass to pass, "
    "which needs the guest to dirty memory more slowly than the link sends it "
    "(dirty rate below bandwidth). When the dirty rate keeps up with the "
    "bandwidth, remaining stays flat far above the threshold and the migration "
    "never ends on its own: it runs until cancelled, unless auto-converge "
    "throttles the vCPUs (cpu-throttle-initial, then +cpu-throttle-increment "
    "after every second sync period in which the guest dirtied more than "
    "throttle-trigger-threshold % of what was sent) until the dirty rate drops "
    "and pending fits under the threshold. Expected downtime is remaining / "
    "bandwidth: below downtime-limit means the next check switches over."
)

#: Which number is which: the engine's exact figures next to QEMU's own.
COLUMNS = (
    ("dirty rate (exact)", "dirty pages this sync fetched / time since the previous sync: the "
     "guest's real dirty rate over that interval (not shown for the first, setup sync and the "
     "stopped last one)"),
    ("dirty-pages-rate (QEMU)", "query-migrate's dirty-pages-rate as QEMU computes it: pages "
     "newly set in the migration bitmap over a period of at least 1 s, updated only at a sync "
     "that ends such a period, so 0 in a migration shorter than a second"),
    ("throughput (achieved)", "bytes the iteration sent / time it spent finding, gathering and "
     "writing its pages (rate-limit sleeps excluded)"),
    ("bandwidth (QEMU estimate)", "bytes of the last completed >= 100 ms window / its length "
     "(migration_update_counters), as known at this sync; query-migrate's mbps is the same "
     "window in Mbit/s"),
    ("threshold", "the threshold-bytes this sync's switchover test used: avail-switchover-"
     "bandwidth if set, else the bandwidth estimate, times downtime-limit; QEMU switches over "
     "when remaining < threshold"),
    ("pending before / remaining", "bytes still to send just before and right after this sync"),
    ("expected downtime (QEMU)", "remaining / the bandwidth used for the threshold: QEMU's "
     "expected-downtime formula"),
    ("predicted downtime (model)", "the engine's prediction of the stop-and-copy time: last "
     "sync cost + remaining pages at the median sending throughput of recent windows + the "
     "socket drain and the destination's resume; with x-predictive-switchover it decides the "
     "switchover"),
    ("decision", "'switchover' on the row whose test decided to stop the guest; the 'final' "
     "row is the stopped, last-stage sync that followed"),
)


@dataclass(frozen=True, slots=True)
class ReportPaths:
    """Where :func:`write_report` wrote the report."""

    out_dir: Path
    markdown: Path
    html: Path
    json: Path
    plots: tuple[Path, ...]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One run's column of the summary table (``None`` = not recorded).

    ``mean_bandwidth_bytes_per_s`` is total bytes over total sending time
    (sum of ``duration_ms``), i.e. the time-weighted mean of the per-iteration
    bandwidth; ``peak_dirty_rate_bytes_per_s`` is the highest exact dirty
    rate (QEMU's ``dirty-pages-rate`` for histories without exact figures)
    times the page size, ``peak_qemu_dirty_pages_rate_bytes_per_s`` QEMU's.
    The downtime triple: actual (``downtime_ms``), QEMU's expected downtime
    on the deciding row, the engine's prediction at the switchover.
    """

    label: str
    status: str
    converged: bool
    total_time_ms: float | None
    setup_time_ms: float | None
    downtime_ms: float | None
    downtime_limit_ms: float | None
    iterations: int
    total_bytes: int
    normal_pages: int
    zero_pages: int
    mean_bandwidth_bytes_per_s: float | None
    peak_dirty_rate_bytes_per_s: float | None
    max_throttle_pct: int
    peak_qemu_dirty_pages_rate_bytes_per_s: float | None = None
    switchover_iteration: int | None = None
    switchover_rule: str = "qemu"
    qemu_expected_downtime_ms: float | None = None
    predicted_downtime_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


def summarize(history: MigrationHistory, label: str | None = None) -> RunSummary:
    """Summarise one history (see :class:`RunSummary`)."""
    recs = history.iterations
    page = page_size_bytes(history)
    total_bytes = sum(r.bytes for r in recs)
    sending_ms = sum(r.duration_ms for r in recs)
    if sending_ms > 0:
        mean_bw: float | None = total_bytes / sending_ms * 1000.0
    else:
        measured = [r.bandwidth_bytes_per_s for r in recs if r.bandwidth_bytes_per_s > 0]
        mean_bw = sum(measured) / len(measured) if measured else None
    rates = [r for r in dirty_rates_pages_per_s(history) if r is not None]
    decided = [r for r in recs if r.switchover]
    pred = history.downtime_prediction
    predictive = history.setup.get("parameters", {}).get("x-predictive-switchover") is True
    return RunSummary(
        label=history.label if label is None else label,
        status=history.status,
        # QEMU's only success for a precopy migration: it reached COMPLETED.
        converged=history.status == "completed",
        total_time_ms=history.total_time_ms,
        setup_time_ms=history.setup_time_ms,
        downtime_ms=None if history.downtime is None else history.downtime.total_ms,
        downtime_limit_ms=parameter(history, "downtime-limit"),
        iterations=len(recs),
        total_bytes=total_bytes,
        normal_pages=sum(r.normal_pages for r in recs),
        zero_pages=sum(r.zero_pages for r in recs),
        mean_bandwidth_bytes_per_s=mean_bw,
        peak_dirty_rate_bytes_per_s=max(rates) * page if rates else None,
        max_throttle_pct=max((r.throttle_pct for r in recs), default=0),
        peak_qemu_dirty_pages_rate_bytes_per_s=(max(r.dirty_rate_pages_per_s for r in recs) * page
                                                if recs else None),
        switchover_iteration=decided[-1].iteration if decided else None,
        switchover_rule="x-predictive-switchover" if predictive else "qemu",
        qemu_expected_downtime_ms=decided[-1].expected_downtime_ms if decided else None,
        predicted_downtime_ms=None if pred is None else pred.total_ms,
    )


# --------------------------------------------------------------------------
# Formatting


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:{fmt}}{unit}"


def _mib(value: float | None, fmt: str = ",.1f", unit: str = " MiB") -> str:
    return _num(None if value is None else value / MIB, fmt, unit)


#: Summary table rows: (heading, cell formatter).
_SUMMARY_ROWS: tuple[tuple[str, Callable[[RunSummary], str]], ...] = (
    ("status", lambda s: s.status),
    ("converged (completed)", lambda s: "yes" if s.converged else "no"),
    ("total time", lambda s: _num(None if s.total_time_ms is None else s.total_time_ms / 1000,
                                  ",.3f", " s")),
    ("setup time", lambda s: _num(s.setup_time_ms, ",.1f", " ms")),
    ("downtime (actual)", lambda s: _num(s.downtime_ms, ",.1f", " ms")),
    ("downtime predicted (engine model)", lambda s: _num(s.predicted_downtime_ms, ",.1f", " ms")),
    ("expected downtime at the switchover (QEMU)",
     lambda s: _num(s.qemu_expected_downtime_ms, ",.1f", " ms")),
    ("downtime-limit", lambda s: _num(s.downtime_limit_ms, ",g", " ms")),
    ("switchover rule", lambda s: s.switchover_rule),
    ("switchover decided at sync", lambda s: _num(s.switchover_iteration, "d")),
    ("iterations", lambda s: f"{s.iterations:,}"),
    ("total bytes", lambda s: f"{s.total_bytes:,} ({s.total_bytes / MIB:,.1f} MiB)"),
    ("normal pages", lambda s: f"{s.normal_pages:,}"),
    ("zero pages", lambda s: f"{s.zero_pages:,}"),
    ("mean bandwidth", lambda s: _mib(s.mean_bandwidth_bytes_per_s, unit=" MiB/s")),
    ("peak dirty rate (exact)", lambda s: _mib(s.peak_dirty_rate_bytes_per_s, unit=" MiB/s")),
    ("peak dirty-pages-rate (QEMU)",
     lambda s: _mib(s.peak_qemu_dirty_pages_rate_bytes_per_s, unit=" MiB/s")),
    ("max cpu-throttle", lambda s: f"{s.max_throttle_pct} %"),
)


def _iteration_table(history: MigrationHistory) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of one run's iteration table (shared by md and html)."""
    page = page_size_bytes(history)
    thresholds = thresholds_bytes(history)
    rates = dirty_rates_pages_per_s(history)
    exact = exact_recorded(history)
    headers = ["iter", "time (s)", "interval (ms)", "dirty found", "dirty new (QEMU)",
               "dirty rate exact (pages/s)", "dirty-pages-rate QEMU (pages/s)", "normal pages",
               "zero pages", "sent (MiB)", "sending (ms)", "throughput achieved (MiB/s)",
               "bandwidth QEMU estimate (MiB/s)", "pending before (MiB)", "remaining (MiB)",
               "threshold (MiB)", "expected downtime QEMU (ms)", "predicted downtime (ms)",
               "sync (ms)", "write-protect (ms)", "throttle (%)", "decision"]
    rows = []
    for rec, thr, rate in zip(history.iterations, thresholds, rates):
        dash = "—"
        rows.append([
            f"{rec.iteration}{' final' if rec.final else ''}",
            f"{rec.time_ms / 1000:,.3f}",
            f"{rec.interval_ms:,.1f}" if exact else dash,
            f"{rec.found_dirty_pages:,}" if exact else dash,
            f"{rec.dirty_pages:,}",
            dash if rate is None or not exact else f"{rate:,.0f}",
            f"{rec.dirty_rate_pages_per_s:,.0f}",
            f"{rec.normal_pages:,}",
            f"{rec.zero_pages:,}",
            f"{rec.bytes / MIB:,.1f}",
            f"{rec.sending_ms:,.1f}" if exact else f"({rec.duration_ms:,.1f})",
            f"{rec.throughput_bytes_per_s / MIB:,.1f}" if exact else dash,
            f"{rec.bandwidth_bytes_per_s / MIB:,.1f}",
            f"{rec.pending_before_bytes / MIB:,.1f}" if exact else dash,
            f"{rec.remaining_bytes / MIB:,.1f}",
            _mib(thr, unit=""),
            f"{rec.expected_downtime_ms:,.1f}",
            f"{rec.predicted_downtime_ms:,.1f}" if rec.predicted_downtime_ms else dash,
            f"{rec.sync_time_ms:,.2f}",
            f"{rec.write_protect_time_ms:,.2f}",
            f"{rec.throttle_pct}",
            "switchover" if rec.switchover else ("stopped" if rec.final else ""),
        ])
    return headers, rows


def _prediction_line(history: MigrationHistory) -> str | None:
    pred, dt = history.downtime_prediction, history.downtime
    if pred is None:
        return None
    text = (f"Predicted at the switchover: {pred.total_ms:,.1f} ms = stop vCPUs {pred.stop_vcpus_ms:,.2f} "
            f"+ final sync {pred.final_sync_ms:,.2f} + last pages {pred.last_pages_ms:,.1f} "
            f"({pred.pending_bytes / MIB:,.1f} MiB at {pred.throughput_bytes_per_s / MIB:,.0f} MiB/s) "
            f"+ drain, device state and resume {pred.tail_ms:,.1f}")
    if dt is not None:
        text += f"; actual {dt.total_ms:,.1f} ms ({dt.total_ms / pred.total_ms:.2f} x predicted)" \
            if pred.total_ms > 0 else f"; actual {dt.total_ms:,.1f} ms"
    return text + "."


def _destination_line(history: MigrationHistory) -> str | None:
    tl, start = history.destination, history.start_unix_ms
    if tl is None or not start:
        return None
    bits = []
    for name, label in (("first_byte_unix_ms", "first byte"), ("stream_received_unix_ms", "stream received"),
                        ("device_state_loaded_unix_ms", "device state loaded"),
                        ("acknowledged_unix_ms", "acknowledged"),
                        ("resumed_unix_ms", "resumed by cont (-S)" if tl.resumed_by_cont else "resumed")):
        value = getattr(tl, name)
        if value:
            bits.append(f"{label} at {value - start:,.1f} ms")
    return "Destination (wall clock, ms since the source started): " + ", ".join(bits) + "."


def _downtime_rows(dt: DowntimeBreakdown) -> list[tuple[str, str]]:
    rows = [(label, f"{getattr(dt, name):,.2f}") for name, label in DOWNTIME_PARTS]
    return rows + [("total", f"{dt.total_ms:,.2f}")]


def _setup_line(history: MigrationHistory) -> str:
    setup = history.setup
    bits = []
    mem = setup.get("memory-bytes")
    if is_number(mem):
        bits.append(f"memory {mem / MIB:,.0f} MiB")
    bits.append(f"page size {page_size_bytes(history)} B")
    for key in ("accel", "smp", "workload"):
        if setup.get(key):
            bits.append(f"{key} {setup[key]}")
    params = setup.get("parameters")
    if isinstance(params, dict) and params:
        bits.append("parameters " + ", ".join(f"{k}={v}" for k, v in params.items()))
    caps = setup.get("capabilities")
    if isinstance(caps, dict):
        on = [k for k, v in caps.items() if v]
        bits.append("capabilities " + (", ".join(on) if on else "none"))
    return "; ".join(bits)


# --------------------------------------------------------------------------
# Rendering


def _unique_labels(histories: list[MigrationHistory]) -> list[str]:
    seen: dict[str, int] = {}
    labels = []
    for i, h in enumerate(histories):
        base = h.label.strip() or f"run {i + 1}"
        seen[base] = seen.get(base, 0) + 1
        labels.append(base if seen[base] == 1 else f"{base} ({seen[base]})")
    return labels


def _render_markdown(title: str, labels: list[str], histories: list[MigrationHistory],
                     summaries: list[RunSummary]) -> str:
    lines = [f"# {title}", "", "## How to read this", "", HOW_TO_READ, ""]
    lines += ["Which number is which:", ""] + [f"- **{name}**: {text}" for name, text in COLUMNS]
    lines += ["", "## Summary", ""]
    lines += md_table(["", *labels], [[name, *(fmt(s) for s in summaries)]
                                       for name, fmt in _SUMMARY_ROWS])
    lines += ["", "## Plots", ""]
    for name, caption in PLOTS.items():
        lines += [f"![{caption}]({name})", ""]
    for label, history in zip(labels, histories):
        lines += [f"## Run: {label}", "", _setup_line(history), ""]
        for extra in (_prediction_line(history), _destination_line(history)):
            if extra:
                lines += [extra, ""]
        if history.downtime is not None:
            lines += ["Downtime breakdown:", ""]
            lines += md_table(["phase", "ms"], [list(r) for r in _downtime_rows(history.downtime)])
            lines.append("")
        else:
            lines += [f"No downtime: the run ended {history.status} without a switchover.", ""]
        if history.iterations:
            lines += md_table(*_iteration_table(history))
        else:
            lines.append("No iterations recorded.")
        lines.append("")
    return "\n".join(lines)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 1.8em; }
p.how { background: #f4f6f8; border-left: 4px solid #4a78a8; padding: .8em 1em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; }
th { background: #eef1f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.final td { background: #fff6e0; } tr.decided td { background: #e6f4e6; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: .9em; color: #555; }
div.scroll { overflow-x: auto; }
"""


def _html_table(headers: list[str], rows: list[list[str]], *,
                row_class: Callable[[int], str | None] | None = None) -> str:
    e = html.escape
    out = ["<div class=\"scroll\"><table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in headers)
           + "</tr>"]
    for i, row in enumerate(rows):
        cls = row_class(i) if row_class else None
        cells = "".join(f"<th>{e(c)}</th>" if j == 0 else f"<td class=\"num\">{e(c)}</td>"
                        for j, c in enumerate(row))
        out.append(f"<tr class=\"{cls}\">{cells}</tr>" if cls else f"<tr>{cells}</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _render_html(title: str, labels: list[str], histories: list[MigrationHistory],
                 summaries: list[RunSummary], pngs: dict[str, bytes]) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{e(title)}</title>", f"<style>{_CSS}</style></head><body>",
             f"<h1>{e(title)}</h1>", "<h2>How to read this</h2>",
             f"<p class=\"how\">{e(HOW_TO_READ)}</p>", "<p>Which number is which:</p><ul>",
             *(f"<li><b>{e(name)}</b>: {e(text)}</li>" for name, text in COLUMNS), "</ul>",
             "<h2>Summary</h2>",
             _html_table(["", *labels], [[name, *(fmt(s) for s in summaries)]
                                         for name, fmt in _SUMMARY_ROWS]),
             "<h2>Plots</h2>"]
    for name, caption in PLOTS.items():
        data = base64.b64encode(pngs[name]).decode("ascii")
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{e(caption)}\">"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    for label, history in zip(labels, histories):
        parts += [f"<h2>Run: {e(label)}</h2>", f"<p>{e(_setup_line(history))}</p>"]
        parts += [f"<p>{e(extra)}</p>" for extra in (_prediction_line(history), _destination_line(history))
                  if extra]
        if history.downtime is not None:
            parts += ["<p>Downtime breakdown:</p>",
                      _html_table(["phase", "ms"],
                                  [list(r) for r in _downtime_rows(history.downtime)])]
        else:
            parts.append(f"<p>No downtime: the run ended {e(history.status)} "
                         "without a switchover.</p>")
        if history.iterations:
            headers, rows = _iteration_table(history)
            finals = {i for i, r in enumerate(history.iterations) if r.final}
            decided = {i for i, r in enumerate(history.iterations) if r.switchover}
            parts.append(_html_table(headers, rows, row_class=lambda i: "final" if i in finals
                                     else "decided" if i in decided else None))
        else:
            parts.append("<p>No iterations recorded.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _render_json(title: str, labels: list[str], histories: list[MigrationHistory],
                 summaries: list[RunSummary]) -> str:
    doc = {
        "schema": REPORT_SCHEMA_VERSION,
        "title": title,
        "runs": [
            {
                "label": label,
                "status": h.status,
                "setup": h.setup,
                "downtime": None if h.downtime is None else h.downtime.to_json(),
                "total-time-ms": h.total_time_ms,
                "setup-time-ms": h.setup_time_ms,
                "summary": s.to_json(),
            }
            for label, h, s in zip(labels, histories, summaries)
        ],
        "iterations": [{"run": label, **rec.to_json()}
                       for label, h in zip(labels, histories) for rec in h.iterations],
        "plots": list(PLOTS),
    }
    return json.dumps(doc, indent=1, default=str) + "\n"


def write_report(histories: list[MigrationHistory], out_dir: Path, *,
                 title: str | None = None) -> ReportPaths:
    """Render the report of ``histories`` into ``out_dir``.

    Args:
        histories: one or more runs; each is labelled with its ``label``
            (``run N`` if empty; repeated labels get `` (2)``, `` (3)``...).
        out_dir: created if missing; existing report files are overwritten.
        title: report heading (default :data:`DEFAULT_TITLE`).

    Returns:
        The paths written.

    Raises:
        ValueError: no history given.
        OSError: ``out_dir`` cannot be created or written.  Everything is
            rendered before the first write, so a rendering error writes
            nothing.
    """
    if not histories:
        raise ValueError("write_report needs at least one history")
    title = title or DEFAULT_TITLE
    labels = _unique_labels(histories)
    summaries = [summarize(h, label) for h, label in zip(histories, labels)]
    pngs = render_plots([PlotRun(label, h) for label, h in zip(labels, histories)])
    texts = {
        "report.md": _render_markdown(title, labels, histories, summaries),
        "report.html": _render_html(title, labels, histories, summaries, pngs),
        "report.json": _render_json(title, labels, histories, summaries),
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        (out_dir / name).write_text(text, encoding="utf-8")
    for name, png in pngs.items():
        (out_dir / name).write_bytes(png)
    return ReportPaths(out_dir=out_dir, markdown=out_dir / "report.md",
                       html=out_dir / "report.html", json=out_dir / "report.json",
                       plots=tuple(out_dir / name for name in pngs))


# --------------------------------------------------------------------------
# CLI


_PROG = "migrator report"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="Write a convergence report (markdown, self-contained HTML, JSON, PNG "
                    "plots) from recorded migration histories. Several files overlay in one "
                    "report, one line/column per run.")
    parser.add_argument("histories", nargs="+", type=Path, metavar="HISTORY.json",
                        help="a MigrationHistory JSON file, or `migrator demo --json` output")
    parser.add_argument("--out", "-o", required=True, type=Path, metavar="DIR",
                        help="output directory (created if missing)")
    parser.add_argument("--title", help=f"report title (default: {DEFAULT_TITLE!r})")
    return parser


def report_main(argv: list[str]) -> int:
    """``migrator report HISTORY.json... --out DIR [--title TITLE]``.

    Args:
        argv: the arguments after ``report``.

    Returns:
        0 on success; 2 on a usage error or an unusable input file (each
        reported as ``migrator report: error: FILE: reason`` on stderr, and
        nothing is written); 1 if writing the output failed.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage / help
        return exc.code if isinstance(exc.code, int) else 2
    histories = []
    failed = False
    for path in args.histories:
        try:
            history = load_history(path)
        except ReportInputError as exc:
            print(f"{_PROG}: error: {exc.path}: {exc.reason}", file=sys.stderr)
            failed = True
            continue
        if not history.label.strip():
            history.label = path.stem
        histories.append(history)
    if args.out.exists() and not args.out.is_dir():
        print(f"{_PROG}: error: {args.out}: not a directory", file=sys.stderr)
        failed = True
    if failed:
        return 2
    try:
        paths = write_report(histories, args.out, title=args.title)
    except OSError as exc:
        print(f"{_PROG}: error: {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {paths.markdown}, {paths.html.name}, {paths.json.name} "
          f"and {len(paths.plots)} plots to {paths.out_dir}")
    return 0
