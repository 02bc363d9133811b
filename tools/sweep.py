"""Sweep a grid of migrations and write one overlaid report and a table (issue 11).

Grid: workload rate x max-bandwidth x downtime-limit x dirty-tracking mode
(and, with ``--switchover qemu,predictive``, the switchover rule).  Each cell
is one ``migrator demo --json`` run (two ``migrator run`` processes over
tcp loopback, RAM compared after completion), cancelled after ``--timeout``
seconds if it has not converged.  Output in ``--out DIR``:

- the convergence report of every cell overlaid (``report.html``,
  ``report.md``, ``report.json``, the plots): ``migrator report``'s
  ``write_report`` with one run per cell;
- ``sweep.md`` and ``sweep.json``: one row per cell -- converged, total time,
  downtime, predicted (engine model) vs actual downtime, QEMU's expected
  downtime at the switchover, syncs, peak exact dirty rate, RAM match;
- the same table on stdout.

The default grid (2 x 2 x 2 x 2 = 16 cells, 64 MiB guest) takes about two
minutes on a quiet machine; cells whose guest out-dirties the link do not
converge and are cancelled at ``--timeout`` (default 4 s).

Usage::

    python tools/sweep.py --out sweep/ [--rates 5000,40000] [--bandwidths 32M,128M]
        [--downtime-limits 100,300] [--modes legacy,wp-all] [--switchover qemu]
        [--memory 64M] [--timeout 4] [--transport tcp]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migrator.engine import parse_size  # noqa: E402  (after the path fix-up)

MIB = 1 << 20
#: dirty-tracking modes of the simulated KVM, as --accel strings
MODES = {
    "legacy": "sim,write-protect-all=off,manual-protect=off",
    "wp-all": "sim,write-protect-all=on",
    "manual": "sim,manual-protect=on",
}


def run_cell(cell: dict, args) -> dict:
    """One ``migrator demo --json`` run; returns its JSON (or an error)."""
    cmd = [sys.executable, "-m", "migrator", "demo", "--json", "--quiet",
           "--memory", f"{args.memory}B", "--workload", f"ab,rate={cell['rate']}",
           "--accel", MODES[cell["mode"]], "--transport", args.transport,
           "--max-bandwidth", str(cell["bandwidth"]), "--downtime-limit", str(cell["downtime_limit"]),
           "--timeout", str(args.timeout)]
    if cell["switchover"] == "predictive":
        cmd.append("--predictive-switchover")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout + 120)
    wall = time.monotonic() - t0
    try:  # a cancelled (timed-out) cell still prints its JSON, history included
        return {"result": json.loads(proc.stdout), "wall_s": wall}
    except json.JSONDecodeError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": tail[0], "wall_s": wall}


def cell_label(cell: dict) -> str:
    label = (f"{cell['rate'] // 1000}k pages/s, {cell['bandwidth'] // MIB} MiB/s, "
             f"{cell['downtime_limit']} ms, {cell['mode']}")
    return label + (", predictive" if cell["switchover"] == "predictive" else "")


def summarize_cell(cell: dict, out: dict) -> dict:
    row = {**cell, "label": cell_label(cell), "wall_s": out.get("wall_s")}
    if "error" in out:
        return {**row, "status": "error", "error": out["error"], "converged": False}
    res = out["result"]
    info = res.get("query-migrate", {})
    hist = res.get("history") or {}
    iters = hist.get("iterations", [])
    decided = [r for r in iters if r.get("switchover")]
    pred = hist.get("downtime-prediction") or {}
    actual = (hist.get("downtime") or {}).get("total-ms")
    rates = [r.get("exact-dirty-rate-pages-per-s", 0) for r in iters if not r.get("final")]
    return {
        **row,
        "status": info.get("status"),
        "converged": info.get("status") == "completed",
        "total_time_ms": info.get("total-time"),
        "downtime_ms": actual,
        "predicted_downtime_ms": pred.get("total-ms"),
        "qemu_expected_downtime_ms": decided[-1].get("expected-downtime-ms") if decided else None,
        "syncs": len(iters),
        "peak_dirty_rate_pages_per_s": max(rates, default=None),
        "ram_match": res.get("ram_match"),
        "history": hist,
    }


def _f(x, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


TABLE_HEADERS = ("cell", "converged", "total (ms)", "downtime (ms)", "predicted (ms)", "actual/pred",
                 "QEMU expected (ms)", "syncs", "peak dirty (pages/s)", "RAM match")


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ratio = (r["downtime_ms"] / r["predicted_downtime_ms"]
                 if r.get("downtime_ms") and r.get("predicted_downtime_ms") else None)
        out.append([r["label"], ("yes" if r["converged"] else f"no ({r['status']})"),
                    _f(r.get("total_time_ms"), ",.0f"), _f(r.get("downtime_ms"), ",.1f"),
                    _f(r.get("predicted_downtime_ms"), ",.1f"), _f(ratio, ".2f"),
                    _f(r.get("qemu_expected_downtime_ms"), ",.1f"), _f(r.get("syncs"), "d"),
                    _f(r.get("peak_dirty_rate_pages_per_s"), ",.0f"),
                    {True: "yes", False: "NO", None: "—"}[r.get("ram_match")]
                    if r["converged"] else "—"])
    return out


def markdown(rows: list[dict], args) -> str:
    lines = [f"# Sweep: {len(rows)} cells", "",
             f"Guest {args.memory // MIB} MiB, workload ab, transport {args.transport}, cells cancelled "
             f"after {args.timeout:g} s; machine shared with other sessions (timings are noisy).", "",
             "| " + " | ".join(TABLE_HEADERS) + " |", "|" + "---|" * len(TABLE_HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['label']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--rates", default="5000,40000", help="workload rates, pages/s")
    ap.add_argument("--bandwidths", default="32M,128M", help="max-bandwidth values, bytes/s (K/M/G suffixes)")
    ap.add_argument("--downtime-limits", default="100,300", help="downtime-limit values, ms")
    ap.add_argument("--modes", default="legacy,wp-all", help=f"dirty-tracking modes: {', '.join(MODES)}")
    ap.add_argument("--switchover", default="qemu", help="switchover rules: qemu, predictive")
    ap.add_argument("--memory", default="64M", help="guest RAM, QEMU -m syntax (default 64M)")
    ap.add_argument("--timeout", type=float, default=4.0, help="cancel a cell after this many seconds")
    ap.add_argument("--transport", default="tcp", choices=("tcp", "unix"))
    args = ap.parse_args(argv)
    args.memory = parse_size(args.memory, default_suffix="M")  # -m: a bare number is MiB
    modes = [m for m in args.modes.split(",") if m]
    rules = [m for m in args.switchover.split(",") if m]
    if set(modes) - set(MODES) or set(rules) - {"qemu", "predictive"}:
        ap.error(f"--modes takes {', '.join(MODES)}; --switchover takes qemu, predictive")
    grid = [dict(rate=int(r), bandwidth=parse_size(b), downtime_limit=int(d), mode=m, switchover=s)
            for r, b, d, m, s in itertools.product(args.rates.split(","), args.bandwidths.split(","),
                                                   args.downtime_limits.split(","), modes, rules)]
    rows = []
    for i, cell in enumerate(grid, 1):
        row = summarize_cell(cell, run_cell(cell, args))
        rows.append(row)
        print(f"# [{i}/{len(grid)}] {row['label']}: {row['status']}, downtime {_f(row.get('downtime_ms'), '.1f')} "
              f"ms (predicted {_f(row.get('predicted_downtime_ms'), '.1f')})", file=sys.stderr, flush=True)
    from migrator.engine._history import MigrationHistory
    from migrator.reports._report import write_report

    histories = []
    for r in rows:
        if r.get("history"):
            h = MigrationHistory.from_json(r["history"])
            h.label = r["label"]
            histories.append(h)
    args.out.mkdir(parents=True, exist_ok=True)
    if histories:
        write_report(histories, args.out, title=f"Sweep of {len(grid)} cells")
    text = markdown(rows, args)
    (args.out / "sweep.md").write_text(text)
    (args.out / "sweep.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "history"} for r in rows], indent=1) + "\n")
    print(text)
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
