"""``migrator compare``: case 2 of the 2017 "KVM: MMU: fast write protect"
series (Xiao Guangrong), reproduced on the simulated KVM.

The seed's case 2: a 30G, 8-vCPU VM is live-migrated while a test program
"greedily and repeatedly writes 3000M memory"; once on a newly booted VM
(2.1: the writer's pages are faulted in during the migration) and once on
a VM pre-written first (2.2: no mapping faults needed), each with the
ordinary dirty log (``KVM_GET_DIRTY_LOG`` write-protects the fetched pages
through the rmap, under ``mmu_lock``) and with write-protect-all
(``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT`` + the O(1)
``KVM_WRITE_PROTECT_ALL_MEM``, protection pushed down lazily by faults).

Here: four runs, {fresh, pre-written} x {write-protect-all on, off}, each
a real migration over a unix socket of an in-process source VM (migration
engine and simulated KVM on this trio thread, the guest's vCPUs as
``--smp`` processes on the shared simulated MMU) to a destination VM, the guest running the ``stream`` workload (repeated
ascending passes over a working set, greedy; each write stores one word
per page, so the guest's per-page cost is dominated by its faults, as it
is on hardware where a write fault costs microseconds).  Runs are
repeated (interleaved off/on) and medians reported: the host is shared.

Why in-process: the simulated KVM's counters are split by who caused
them - the source's dirty-log ioctls, the memslot ioctl that starts
logging, the guest's own faults - through the memory core's cost meter (a
``CauseAccounting`` set as ``MemorySystem.cost_meter``, see
``memory/_cost.py`` and ``_compare_run.py``) and the vCPU processes'
statistics rows; that needs the objects, not QMP.  The destination runs in
the same thread by default (``--destination process`` runs ``migrator run
--incoming`` instead): with a process, how fast the destination drains the
socket depends on what else runs on the other core, and a starved
destination lets the greedy guest take the source thread, so totals swing
by seconds between identical runs.

The modules: ``_compare_model.py`` (scenario, records, medians, the O(1)
check), ``_compare_run.py`` (the runs), ``_compare_render.py`` (tables,
JSON) and this one (the essay and the command line).

What transfers from the seed and what does not: see :data:`EXPLANATION`,
printed with the table.

"First dirty log": the engine's first sync runs right after logging
started, before the guest could dirty anything (log start itself
write-protects every mapped page through the rmap in both modes, as
kvm_mmu_slot_apply_flags does; the series does not change that), so the
first sync that the seed's figure corresponds to - the first one that
fetches the written working set - is the first sync that returned dirty
pages (normally dirty-sync-count 2).  Both are reported.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import trio

from memory import TARGET_PAGE_SIZE

from ._compare_model import (
    GUESTS,
    SEED,
    CompareConfig,
    CompareError,
    RunResult,
    aggregate,
    check_o1_dirty_log,
    run_label,
)
from ._compare_render import EXPLANATION, render, runs_table, seed_table, setup_text, to_json
from ._compare_run import run_case, run_compare

__all__ = [
    "EXPLANATION",
    "GUESTS",
    "SEED",
    "CompareConfig",
    "CompareError",
    "RunResult",
    "aggregate",
    "check_o1_dirty_log",
    "compare_main",
    "config_from_args",
    "render",
    "run_case",
    "run_compare",
    "run_label",
    "runs_table",
    "seed_table",
    "to_json",
]

def _size(text: str) -> int:
    """``--memory``: QEMU's ``-m`` rules (a bare number is MiB). Reports never
    import the CLI, so the argparse wrapper is this one function."""
    from ..engine._machine import parse_size

    try:
        return parse_size(text, default_suffix="M")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="migrator compare",
        description="Case 2 of the 2017 fast-write-protect series on the simulated KVM: "
                    "{fresh, pre-written guest} x {write-protect-all on, off}, one convergence report.")
    p.add_argument("--memory", "-m", type=_size, help="guest RAM (default 1G)")
    p.add_argument("--working-set", help="writer's working set: a size (768M) or a percentage of RAM "
                                         "(default 75%%)")
    p.add_argument("--max-bandwidth", type=int, help="bytes/s (default 1 GiB/s)")
    p.add_argument("--downtime-limit", type=int, help="ms (default 300)")
    p.add_argument("--auto-converge", action=argparse.BooleanOptionalAction, default=None,
                   help="the auto-converge capability (default on)")
    p.add_argument("--cpu-throttle-initial", type=int, help="percent (default 50)")
    p.add_argument("--cpu-throttle-increment", type=int, help="percent (default 25)")
    p.add_argument("--timeout", type=float, help="seconds per run before migrate_cancel (default 60)")
    p.add_argument("--destination", choices=("inprocess", "process"),
                   help="inprocess (default): the destination VM runs in the same trio thread; process: a "
                        "'migrator run --incoming' process (on another core, sensitive to host load)")
    p.add_argument("--repeat", type=int, help="runs per case, interleaved; medians are reported (default 2; "
                                            "--quick: 1)")
    p.add_argument("--quick", action="store_true", help="small and fast (for tests): 32M, 64 MiB/s, downtime-limit 500 ms, 1 repeat "
                                                         "unless given")
    p.add_argument("--out", metavar="DIR", help="write report.md/html/json + PNGs, compare.json, compare.md")
    p.add_argument("--json", action="store_true", help="print compare.json instead of the table")
    p.add_argument("--smp", type=int, help="vCPU processes (default 1)")
    p.add_argument("--fault-cost", help="per-fault cost: host (default), hw, 0, or FAST_US[:SLOW_US]")
    return p


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    from ..engine._machine import parse_size

    cfg = CompareConfig()
    if args.quick:
        # converges right after the bulk stage (working set < bandwidth x
        # downtime-limit), which lasts past the first 100 ms bandwidth window
        cfg.memory_bytes = 32 << 20
        cfg.max_bandwidth = 64 << 20
        cfg.downtime_limit = 500
        cfg.timeout_s = 20.0
    if args.memory is not None:
        cfg.memory_bytes = args.memory
    if args.working_set:
        text = args.working_set.strip()
        if text.endswith("%"):
            cfg.working_set_fraction = float(text[:-1]) / 100
            if not 0 < cfg.working_set_fraction <= 1:
                raise ValueError(f"--working-set {text}: a percentage in (0, 100]")
        else:
            cfg.working_set_pages = parse_size(text, default_suffix="M") // TARGET_PAGE_SIZE
            if not 1 <= cfg.working_set_pages <= cfg.npages:
                raise ValueError(f"--working-set {text}: must fit in RAM")
    for name in ("max_bandwidth", "downtime_limit", "cpu_throttle_initial", "cpu_throttle_increment"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, value)
    if args.destination is not None:
        cfg.destination = args.destination
    if args.auto_converge is not None:
        cfg.auto_converge = args.auto_converge
    if args.timeout is not None:
        cfg.timeout_s = args.timeout
    if getattr(args, "smp", None) is not None:
        from ..engine._machine import parse_smp

        cfg.smp = parse_smp(str(args.smp))
    if getattr(args, "fault_cost", None) is not None:
        from memory.kvm.sim.sim_vcpu import parse_fault_cost

        parse_fault_cost(args.fault_cost)
        cfg.fault_cost = args.fault_cost
    return cfg


def compare_main(argv: list[str]) -> int:
    """``migrator compare [options]``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    quiet = args.json
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 2)
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    print(f"migrator compare: {setup_text(cfg)}", file=sys.stderr)

    def progress(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        results = trio.run(functools.partial(run_compare, cfg, repeat=repeat, progress=progress))
    except CompareError as exc:
        print(f"migrator compare: {exc}", file=sys.stderr)
        return 1
    problems = check_o1_dirty_log(results)
    doc = to_json(cfg, results, problems)
    if args.out:
        from ._report import write_report

        out = Path(args.out)
        write_report([r.history for r in results], out,
                     title="Fast write protect (2017 series), case 2: convergence")
        (out / "compare.json").write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")
        (out / "compare.md").write_text(render(cfg, results, problems, markdown=True), encoding="utf-8")
    if args.json:
        print(json.dumps(doc, default=str))
    else:
        print(render(cfg, results, problems, markdown=False))
        if args.out:
            print(f"report written to {args.out}/report.html (table: {args.out}/compare.md)")
    converged = all(r.metrics["status"] == "completed" for r in results)
    return 0 if converged and not problems else 1
