"""Benchmark: where a real-KVM ``--smp N`` migration's time goes, against
``--smp 1``: the migration of a greedy ``ab`` guest (``migrator demo
--accel kvm,dirty-log=bitmap --workload ab --auto-converge``), with every
thread's CPU time and run-queue wait sampled from
``/proc/PID/task/TID/schedstat`` of both processes while it runs.

Per run it prints total time, downtime, dirty syncs, bytes sent, the
highest throttle, the dirty rate and the per-vCPU page-write rates of each
iteration, and for each thread (the sender/receiver main threads, every
vCPU thread) the share of the migration's wall time it spent on a CPU and
waiting for one.  Runs of the two vCPU counts alternate (order reversed
every repeat); the summary prints the median ratios smp N / smp 1 of total
time, of the bulk (first) iteration and of the sender's on-CPU share and
run-queue wait.
On a shared machine absolutes are noise; compare runs of one invocation.

    python tools/bench_kvm_smp_migration.py [--smp 2] [--memory 1G] [--max-bandwidth 4000000000]
                                            [--warmup 15] [--repeats 2] [--accel kvm,dirty-log=bitmap]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

Sample = dict[tuple[str, int, str], tuple[float, float]]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for t in os.listdir(f"/proc/{pid}/task")
                for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    except OSError:
        return []


def _threads(pid: int, roles: dict[int, str]) -> Sample:
    """(role, tid, thread name) -> (seconds on a CPU, seconds waiting for one)."""
    out: Sample = {}
    try:
        if pid not in roles:
            argv = open(f"/proc/{pid}/cmdline").read().split("\0")
            roles[pid] = "destination" if any("incoming" in a for a in argv) else "source"
        for t in os.listdir(f"/proc/{pid}/task"):
            stat = open(f"/proc/{pid}/task/{t}/stat").read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            run_ns, wait_ns, _ = map(int, open(f"/proc/{pid}/task/{t}/schedstat").read().split())
            out[(roles[pid], int(t), name)] = (run_ns / 1e9, wait_ns / 1e9)
    except OSError:
        pass
    return out


def one_run(smp: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "migrator", "demo", "--accel", args.accel, "--smp", str(smp),
           "--memory", args.memory, "--workload", "ab", "--auto-converge", "--max-bandwidth", str(args.max_bandwidth),
           "--warmup", str(args.warmup), "--json", "--quiet"]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL)
        roles: dict[int, str] = {}
        samples: list[tuple[float, Sample]] = []
        while proc.poll() is None:
            snap: Sample = {}
            for child in _children(proc.pid):
                snap.update(_threads(child, roles))
            samples.append((time.time(), snap))
            time.sleep(0.1)
        out.seek(0)
        result = json.load(out)
    hist = result["history"]
    t0 = hist["start-unix-ms"] / 1000
    t1 = t0 + hist["total-time-ms"] / 1000
    a = min(samples, key=lambda s: abs(s[0] - t0))[1]
    b = min(samples, key=lambda s: abs(s[0] - t1))[1]
    wall = t1 - t0
    threads = []
    for key in sorted(set(a) & set(b)):
        on = (b[key][0] - a[key][0]) / wall
        wait = (b[key][1] - a[key][1]) / wall
        if on > 0.02 or wait > 0.02:
            threads.append({"role": key[0], "thread": key[2], "on_cpu": on, "runqueue_wait": wait})
    q = result["query-migrate"]
    its = hist["iterations"]
    return {
        "smp": smp, "total_ms": q["total-time"], "downtime_ms": q["downtime"],
        "syncs": q["ram"]["dirty-sync-count"], "sent_bytes": q["ram"]["transferred"],
        "ram_match": result.get("ram_match"), "loadavg": os.getloadavg()[0],
        "max_throttle_pct": max(it["throttle-pct"] for it in its),
        "bulk_ms": its[0]["duration-ms"],
        "iterations": [{"ms": round(it["duration-ms"]), "dirty_pages": it["dirty-pages"],
                        "dirty_pages_per_s": round(it["exact-dirty-rate-pages-per-s"]),
                        "throttle_pct": it["throttle-pct"],
                        "vcpu_write_pages_per_s": [round(x) for x in it.get("vcpu-write-rates-pages-per-s", [])]}
                       for it in its],
        "threads": threads,
        # the sender is the source's main thread (the vCPU threads are named after their function)
        "sender_wait": next((t["runqueue_wait"] for t in threads
                             if t["role"] == "source" and "vcpu" not in t["thread"]), float("nan")),
        "sender_on_cpu": next((t["on_cpu"] for t in threads
                               if t["role"] == "source" and "vcpu" not in t["thread"]), float("nan")),
    }


def _print_run(r: dict[str, Any]) -> None:
    print(f"smp {r['smp']}: total {r['total_ms']} ms, downtime {r['downtime_ms']} ms, {r['syncs']} syncs, "
          f"{r['sent_bytes'] / 1e9:.2f} GB sent, bulk iteration {r['bulk_ms']:.0f} ms, "
          f"throttle max {r['max_throttle_pct']}%, RAM match {r['ram_match']}, load {r['loadavg']:.1f}")
    for t in r["threads"]:
        print(f"    {t['role']:<11} {t['thread']:<16} on-cpu {t['on_cpu'] * 100:5.1f}%  "
              f"run-queue wait {t['runqueue_wait'] * 100:5.1f}%")
    for i, it in enumerate(r["iterations"], 1):
        print(f"    iteration {i:2d}: {it['ms']:6d} ms, {it['dirty_pages']:7d} dirty, "
              f"{it['dirty_pages_per_s']:7d} dirty pages/s, throttle {it['throttle_pct']:2d}%, "
              f"vCPU writes/s {it['vcpu_write_pages_per_s']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smp", type=int, default=2)
    p.add_argument("--memory", default="1G")
    p.add_argument("--max-bandwidth", type=int, default=4_000_000_000)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--accel", default="kvm,dirty-log=bitmap")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    counts = [1, args.smp]
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in counts}
    for rep in range(args.repeats):
        for n in counts if rep % 2 == 0 else counts[::-1]:
            r = one_run(n, args)
            runs[n].append(r)
            if not args.json:
                _print_run(r)
    ratio = {key: statistics.median(r[key] for r in runs[args.smp]) / statistics.median(r[key] for r in runs[1])
             for key in ("total_ms", "bulk_ms", "sender_on_cpu", "sender_wait")}
    if args.json:
        print(json.dumps({"runs": runs, "ratios": ratio, "cpus": os.cpu_count()}))
    else:
        print(f"median ratios smp {args.smp} / smp 1 ({os.cpu_count()} CPUs): total {ratio['total_ms']:.2f}x, "
              f"bulk iteration {ratio['bulk_ms']:.2f}x, sender on-cpu share {ratio['sender_on_cpu']:.2f}x, "
              f"sender run-queue wait {ratio['sender_wait']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
