"""Benchmark: how long ``vm_stop`` takes (kick to every vCPU stopped and, on
the simulated KVM, every vCPU's program state pulled back), with ``--smp 1``
and ``--smp 2``, on the simulated KVM and (if ``/dev/kvm`` is usable) on
real KVM; optionally the demo's downtime breakdown.

Each stop follows ``--run`` s of running (``vm_start``, sleep, ``vm_stop``),
``--stops`` times per configuration; the median, p95 and maximum latency are
printed, with the controller's ``expected_stop_ns()`` at the end (the
downtime prediction's stop term) where the tree has one.

``--against TREE`` measures another source tree the same way (e.g. the
commit before the doorbell, unpacked with ``git archive REV | tar -x -C
TREE``) in a subprocess with ``PYTHONPATH=TREE`` and prints both, with the
ratio before / after.  ``--demo N`` also runs ``migrator demo --json
--quiet`` (the README's first command without the report) N times per tree
and prints the median and maximum of its ``stop-vcpus-ms`` and ``total-ms``.

The machine is shared (2 cores): tails are noisy; compare the medians and
the ratios of one run, not absolutes.

    python tools/bench_vcpu_stop.py [--stops 50] [--run 0.03] [--against TREE] [--demo 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the tree measured: the first PYTHONPATH entry (--against runs this script
#: so, once per tree), else the one this script is in
TREE = Path(os.environ["PYTHONPATH"].split(os.pathsep)[0]) if os.environ.get("PYTHONPATH") else ROOT
if str(TREE) not in sys.path:
    sys.path.insert(0, str(TREE))


def _summary(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    return {"median_ms": statistics.median(s), "p95_ms": s[math.ceil(0.95 * len(s)) - 1], "max_ms": s[-1]}


async def _stops(vcpus, n: int, run_s: float) -> list[float]:  # noqa: ANN001
    import trio

    out = []
    async with trio.open_nursery() as nursery:
        await nursery.start(vcpus.run)
        if hasattr(vcpus, "boot"):
            vcpus.boot()
        for _ in range(n):
            await vcpus.vm_start()
            await trio.sleep(run_s)
            t0 = time.perf_counter_ns()
            await vcpus.vm_stop()
            out.append((time.perf_counter_ns() - t0) / 1e6)
        nursery.cancel_scope.cancel()
    return out


def _expected_ms(vcpus) -> float | None:  # noqa: ANN001
    f = getattr(vcpus, "expected_stop_ns", None)
    return None if f is None else f() / 1e6


async def _measure(args) -> dict:  # noqa: ANN001
    from memory.kvm import kvm_usable
    from migrator import AccelConfig, Machine

    res: dict = {"loadavg": os.getloadavg()[0], "configs": {}}
    for smp in (1, 2):
        for rate in (20000.0, None):
            # the demo's guest (ab at 20000 pages/s) and a greedy one
            m = Machine(memory_bytes=args.memory << 20, workload="ab", accel=AccelConfig(kind="sim", smp=smp))
            m.vcpus.rate = rate
            name = f"sim smp={smp} ab {'rate=20000' if rate else 'greedy'}"
            ms = await _stops(m.vcpus, args.stops, args.run)
            res["configs"][name] = {**_summary(ms), "expected_ms": _expected_ms(m.vcpus)}
    ok, _ = kvm_usable()
    if ok:
        from memory.kvm import RealMachine

        for smp in (1, 2):
            with RealMachine("ab", args.memory << 20, log_dirty=False, smp=smp) as rm:
                ms = await _stops(rm.vcpus, args.stops, args.run)
                res["configs"][f"kvm smp={smp} ab"] = {**_summary(ms), "expected_ms": _expected_ms(rm.vcpus)}
    return res


def _demo(tree: Path, n: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    stop, total = [], []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-m", "migrator", "demo", "--json", "--quiet"], env=env,
                             capture_output=True, text=True, check=True, cwd="/")
        dt = json.loads(out.stdout)["history"]["downtime"]
        stop.append(dt["stop-vcpus-ms"])
        total.append(dt["total-ms"])
    return {"stop_vcpus_ms": _summary(stop), "total_ms": _summary(total), "runs": n}


def _in_tree(tree: Path, args) -> dict:  # noqa: ANN001
    cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--stops", str(args.stops),
           "--run", str(args.run), "--memory", str(args.memory), "--demo", str(args.demo)]
    out = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                         check=True, cwd="/")
    return json.loads(out.stdout)


def _print(label: str, res: dict) -> None:
    print(f"{label} (load average {res['loadavg']:.1f} at start)")
    for name, r in res["configs"].items():
        exp = "" if r.get("expected_ms") is None else f"; expected_stop_ns {r['expected_ms']:.2f} ms"
        print(f"  {name:26s} stop median {r['median_ms']:7.2f}  p95 {r['p95_ms']:7.2f}  max {r['max_ms']:7.2f} ms{exp}")
    if res.get("demo"):
        d = res["demo"]
        print(f"  demo x{d['runs']}: stop-vcpus median {d['stop_vcpus_ms']['median_ms']:.1f} max "
              f"{d['stop_vcpus_ms']['max_ms']:.1f} ms; downtime median {d['total_ms']['median_ms']:.1f} max "
              f"{d['total_ms']['max_ms']:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stops", type=int, default=50, help="stops per configuration (default 50)")
    p.add_argument("--run", type=float, default=0.03, help="seconds of running before each stop (default 0.03)")
    p.add_argument("--memory", type=int, default=64, help="guest RAM in MiB (default 64)")
    p.add_argument("--demo", type=int, default=0, help="also run the demo N times (default 0)")
    p.add_argument("--against", type=Path, help="another source tree to measure the same way (before)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.stops < 1 or args.run < 0 or args.memory < 4 or args.demo < 0:
        p.error("--stops >= 1, --run >= 0, --memory >= 4 and --demo >= 0")
    if args.against is not None:
        if not (args.against / "migrator" / "__init__.py").is_file():
            p.error(f"--against {args.against}: not a source tree (no migrator/__init__.py)")
        before, after = _in_tree(args.against, args), _in_tree(ROOT, args)
        if args.json:
            print(json.dumps({"before": before, "after": after}, indent=2))
            return 0
        _print(f"before ({args.against})", before)
        _print(f"after ({ROOT})", after)
        print("ratio before / after (median, p95):")
        for name, a in after["configs"].items():
            b = before["configs"].get(name)
            if b:
                print(f"  {name:26s} x{b['median_ms'] / a['median_ms']:.1f}  x{b['p95_ms'] / a['p95_ms']:.1f}")
        if before.get("demo") and after.get("demo"):
            bs, as_ = before["demo"]["stop_vcpus_ms"], after["demo"]["stop_vcpus_ms"]
            print(f"  demo stop-vcpus           x{bs['median_ms'] / as_['median_ms']:.1f}  "
                  f"(max {bs['max_ms']:.1f} -> {as_['max_ms']:.1f} ms)")
        return 0
    import trio

    res = trio.run(_measure, args)
    if args.demo:
        res["demo"] = _demo(TREE, args.demo)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        _print(str(TREE), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
