#!/usr/bin/env python3
"""Run the full fault-injection matrix between two ``migrator run`` processes.

Every stream region of the forward direction (header, RAM section start,
first page, mid-page, mid-RAM, the final RAM section after the vCPUs
stopped, the device section, just before EOF, after EOF) and every offset
of the return direction (the acknowledgement, inside it, after x-handover's
LOADED), times every action (cut, reset, short and late delay, stall,
kill -9 and SIGSTOP/SIGCONT of either peer), with and without the
x-handover capability.  One row per case, then a summary with the counts.

    python tools/fault_matrix.py [--accel sim|kvm] [--memory 32M] [--handover on|off|both]
                                 [--quick] [--json results.json] [-k SUBSTRING]

A case passes when at most one copy ran at every 20 ms sample, the source's
RAM kept the ab guest's invariant, and the guest's owner then migrated to a
fresh destination with both RAMs equal (a guest whose only copy was killed
counts as lost, not failed).  Timing-dependent cases (delays, SIGSTOP) use
x-return-path-timeout = 1500 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.fault.faultkit import Chain, header, matrix, run_case, summary  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--accel", default="sim", choices=("sim", "kvm"))
    ap.add_argument("--memory", default="32M")
    ap.add_argument("--handover", default="both", choices=("on", "off", "both"))
    ap.add_argument("--quick", action="store_true", help="the representative subset the test suite runs")
    ap.add_argument("--json", help="write every case's result here")
    ap.add_argument("-k", dest="select", help="only cases whose name contains this")
    args = ap.parse_args(argv)
    if args.accel == "kvm":
        from memory.kvm import kvm_usable

        ok, why = kvm_usable()
        if not ok:
            print(f"fault_matrix: --accel kvm: {why}", file=sys.stderr)
            return 1
    cases = [(f, h) for f, h in matrix(full=not args.quick)
             if (args.handover == "both" or h == (args.handover == "on"))
             and (not args.select or args.select in f.name)]
    workload = "ab,rate=20000" if args.accel == "sim" else "ab"
    results = []

    async def run() -> None:
        with tempfile.TemporaryDirectory(prefix="fault-matrix-") as tmp:
            async with Chain(Path(tmp), memory=args.memory, accel=args.accel, workload=workload) as chain:
                print(f"# {len(cases)} cases, accel={args.accel}, memory={args.memory}; "
                      "run = most copies running at once; h = x-handover on both sides")
                print(f"{'#':>4} {header()} {'time':>6}  owner/notes")
                for i, (fault, handover) in enumerate(cases, 1):
                    t0 = time.monotonic()
                    r = await run_case(chain, fault, handover=handover)
                    results.append(r)
                    note = r.owner + ("" if r.fired else " (fault point not reached)")
                    if r.notes:
                        note += " " + "; ".join(r.notes)
                    print(f"{i:>4} {r.row()} {time.monotonic() - t0:5.1f}s  {note}", flush=True)

    t0 = time.monotonic()
    trio.run(run)
    s = summary(results)
    s["accel"] = args.accel
    s["not_reached"] = s["cases"] - s["fault_fired"]
    s["guest_lost_by_kill"] = sum(r.owner == "lost" for r in results)
    s["seconds"] = round(time.monotonic() - t0, 1)
    print("\nsummary: " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "failed_cases"))
    print("failed cases: " + (", ".join(s["failed_cases"]) or "none"))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": s, "cases": [r.__dict__ for r in results]},
                                              indent=1, default=str))
    return 0 if not s["failed_cases"] and not s["two_running_copies"] else 1


if __name__ == "__main__":
    sys.exit(main())
