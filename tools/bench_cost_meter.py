"""Benchmark: what the cost-meter hooks cost a global dirty sync.

On the simulated KVM through the KVM listener (legacy mode, one slot per
``--slot`` bytes), the guest dirties every ``--stride``-th page, then one
global sync is timed; three meters, interleaved, on one VM:

* ``off``: ``NO_METER`` (the default: what every product run pays);
* ``timing``: a ``CauseAccounting`` without a probe (time, calls, pages);
* ``probed``: a ``CauseAccounting`` reading ``SimKVM.ioctl_statistics``
  around every ioctl (what ``migrator compare`` uses).

Prints the median sync time of each and the ratios to ``off``; no target is
asserted (the machine is shared).

    python tools/bench_cost_meter.py [--memory 256M] [--slot 64M] [--stride 4] [--repeats 31]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from memory import GLOBAL_DIRTY_MIGRATION, NO_METER, TARGET_PAGE_SIZE, CostMeter, MemorySystem  # noqa: E402
from memory.kvm import KVMMemoryListener, SimKVM  # noqa: E402
from migrator.engine._machine import parse_size  # noqa: E402
from migrator.reports._accounting import CauseAccounting  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--memory", default="256M")
    p.add_argument("--slot", default="64M")
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--repeats", type=int, default=31)
    args = p.parse_args(argv)
    mem = parse_size(args.memory, default_suffix="M")
    slot = parse_size(args.slot, default_suffix="M")
    npages = mem // TARGET_PAGE_SIZE
    kvm = SimKVM(nr_vcpus=1)
    ms = MemorySystem()
    kml = KVMMemoryListener(ms, kvm, write_protect_all=False, manual_protect=False, max_slot_size=slot)
    ms.memory_listener_register(kml, ms.address_space_memory)
    ms.system_memory.add_subregion(0, ms.memory_region_init_ram("pc.ram", mem))
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    gfns = np.arange(0, npages, args.stride, dtype=np.int64)
    kvm.vcpu_write(np.arange(npages, dtype=np.int64))
    ms.memory_global_dirty_log_sync()
    meters: dict[str, CostMeter] = {
        "off": NO_METER,
        "timing": CauseAccounting(),
        "probed": CauseAccounting(kvm.ioctl_statistics),
    }
    times: dict[str, list[int]] = {name: [] for name in meters}
    for _ in range(args.repeats):
        for name, meter in meters.items():
            kvm.vcpu_write(gfns)
            ms.cost_meter = meter
            t0 = time.perf_counter_ns()
            ms.memory_global_dirty_log_sync()
            times[name].append(time.perf_counter_ns() - t0)
            ms.cost_meter = NO_METER
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{npages:,} pages, {-(-mem // slot)} slots, {len(gfns):,} dirty pages per sync, "
          f"median of {args.repeats}")
    for name, ns in med.items():
        print(f"  {name:7s} {ns / 1e6:8.3f} ms   ratio to off {ns / med['off']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
