"""Benchmark: the real-KVM ``ab`` guest's page-write rate with ``--smp 1``
and ``--smp N``, untracked and under dirty tracking, measured side by side.

Each run is a fresh :class:`memory.kvm.real.vcpu.RealMachine` (one memslot, the
``ab`` guest split over the vCPUs, see ``vcpu_ranges``): the vCPUs run for
``--warmup`` s (first touch of every page), then for ``--seconds`` s while
the rate is taken from the guest's own per-vCPU page-write count
(``pages_written`` of ``vcpu_statistics``).  Tracked runs fetch the dirty log
every 10 ms (KVM_GET_DIRTY_LOG, which re-protects the dirty pages, so every
write after a fetch faults).  Runs of the different vCPU counts alternate
(order reversed every repeat) and the median of ``--repeats`` is printed,
with the per-vCPU rates and the fault kinds of the vCPUs' binary stats.

On a machine shared with other jobs the absolute numbers are noisy; only
the ratios of one run mean something.  A second vCPU thread only adds write
rate if a core is free for it.

    python tools/bench_kvm_smp.py [--smp 2] [--memory 64M] [--repeats 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import trio

from memory.kvm import kvm_usable
from memory.kvm.real.vcpu import RealMachine
from migrator.engine._machine import parse_size, parse_smp

SYNC_INTERVAL_S = 0.010


async def _one(size: int, smp: int, tracked: bool, warmup: float, seconds: float) -> dict:
    with RealMachine("ab", size, log_dirty=tracked, smp=smp) as m:
        bitmap = np.zeros((size // 4096 + 63) // 64, np.uint64)
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            await trio.sleep(warmup)
            before = m.vcpus.vcpu_statistics()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                if tracked:
                    await trio.to_thread.run_sync(m.vm.get_dirty_log, 0, bitmap)
                await trio.sleep(SYNC_INTERVAL_S)
            after = m.vcpus.vcpu_statistics()
            dt = time.perf_counter() - t0
            await m.vcpus.vm_stop()
            nursery.cancel_scope.cancel()
    per = [((b.pages_written or 0) - (a.pages_written or 0)) / dt for a, b in zip(before, after)]
    faults = {k: sum(b.faults.get(k, 0) - a.faults.get(k, 0) for a, b in zip(before, after))
              for k in ("pf_taken", "pf_fixed", "pf_fast", "pf_spurious", "pf_emulate")}
    return {"pages_per_s": sum(per), "per_vcpu_pages_per_s": per, "faults": faults}


async def _main(args) -> dict:
    size, counts = args.memory, sorted({1, args.smp})
    out: dict = {"memory_bytes": size, "smp": counts, "repeats": args.repeats, "cpus": os.cpu_count(),
                 "loadavg": os.getloadavg()[0], "modes": {}}
    for tracked in (False, True):
        runs: dict[int, list[dict]] = {n: [] for n in counts}
        for rep in range(args.repeats):
            for n in counts if rep % 2 == 0 else counts[::-1]:
                runs[n].append(await _one(size, n, tracked, args.warmup, args.seconds))
        mode = {}
        for n in counts:
            rates = [r["pages_per_s"] for r in runs[n]]
            med = statistics.median(rates)
            pick = min(runs[n], key=lambda r: abs(r["pages_per_s"] - med))
            mode[str(n)] = {"median_pages_per_s": med, "min": min(rates), "max": max(rates),
                            "per_vcpu_pages_per_s": pick["per_vcpu_pages_per_s"], "faults": pick["faults"]}
        base = mode["1"]["median_pages_per_s"]
        for n in counts:
            mode[str(n)]["ratio_to_smp1"] = mode[str(n)]["median_pages_per_s"] / base if base else None
        out["modes"]["tracked" if tracked else "untracked"] = mode
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smp", type=parse_smp, default=2, help="vCPU count compared with 1 (default 2)")
    p.add_argument("--memory", type=parse_size, default="64M", help="guest RAM (default 64M)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=float, default=0.3, help="seconds before measuring (default 0.3)")
    p.add_argument("--seconds", type=float, default=1.0, help="measured seconds per run (default 1)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ok, why = kvm_usable()
    if not ok:
        print(f"bench_kvm_smp: real KVM unusable: {why}", file=sys.stderr)
        return 1
    res = trio.run(_main, args)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"ab guest, {res['memory_bytes'] >> 20} MiB, median of {res['repeats']} runs, {res['cpus']} CPUs, "
          f"load average {res['loadavg']:.1f} at start (shared machine: compare ratios, not absolutes)")
    for mode, rows in res["modes"].items():
        for n, r in rows.items():
            per = ", ".join(f"{x:.3g}" for x in r["per_vcpu_pages_per_s"])
            f = r["faults"]
            print(f"  {mode:9s} smp={n}: {r['median_pages_per_s']:.3g} pages/s (x{r['ratio_to_smp1']:.2f} of smp=1; "
                  f"runs {r['min']:.3g}..{r['max']:.3g}; per vCPU {per}; faults taken {f['pf_taken']} "
                  f"fast {f['pf_fast']} spurious {f['pf_spurious']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
