"""``migrator compare``'s runs: one migration per case, measured through the
memory core's cost meter (a :class:`CauseAccounting`) and the simulated
KVM's public statistics, never by wrapping or patching objects.

Who caused what (the table's "dirty log", "log start" and "guest" rows):

* **dirty log**: the events of the dirty-log causes (``GET_DIRTY_LOG``,
  ``CLEAR_DIRTY_LOG``, ``WRITE_PROTECT_ALL``/``_OFF``, the ring causes), each
  charged the change of ``SimKVM.ioctl_statistics()`` (the VMM's own row)
  across it, so a vCPU process's concurrent faults are never charged to an
  ioctl.  Per global sync: the :class:`SyncCost` records.
* **log start**: ``SET_MEMORY_REGION`` events (turning on
  ``KVM_MEM_LOG_DIRTY_PAGES`` write-protects every mapped page).
* **guest**: the vCPU processes' own statistics rows
  (``SimKVM.vcpu_statistics``), before and after.
* the guest's running time ends at ``VM_STOP``'s begin (the VM's
  ``vm_stop`` hook).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from memory import DIRTY_LOG_CAUSES, NO_METER, TARGET_PAGE_SIZE, Cause

from ..engine._history import MigrationHistory
from ._accounting import AccountingSnapshot, CauseAccounting
from ._compare_model import GUESTS, KVM_STATS, CompareConfig, CompareError, RunResult, aggregate, run_label

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    from memory.kvm import KVMListenerStatistics, SimKVM
    from memory.kvm.sim.sim_vcpu import SimVCPUs

    from ..qmp._vm import VM

__all__ = ["DIRTY_LOG_GROUP", "run_case", "run_compare"]

#: the causes the table calls "dirty log"
DIRTY_LOG_GROUP = DIRTY_LOG_CAUSES | {Cause.WRITE_PROTECT_OFF}

StartFn = Callable[[trio.Nursery], Awaitable[None]]


@asynccontextmanager
async def _destination(cfg: CompareConfig, tmp: Path, name: str) -> AsyncIterator[tuple[str, StartFn]]:
    """The destination: yields ``(uri, start)``; ``await start(nursery)``
    makes it listen.  In-process (default): a VM object in this trio run;
    otherwise a ``migrator run --incoming`` process."""
    sock = tmp / f"{name}.mig"
    uri = f"unix:{sock}"
    if cfg.destination == "inprocess":
        from ..engine._machine import AccelConfig
        from ..qmp._vm import VM

        dst = VM(memory_bytes=cfg.memory_bytes, accel=AccelConfig(kind="sim", smp=cfg.smp), incoming=uri,
                 start_paused=True, label=f"{name}-destination")

        async def start(nursery: trio.Nursery) -> None:
            await nursery.start(dst.run)

        try:
            yield uri, start
        finally:
            dst.machine.ram_block.close()
        return
    log_path = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "migrator", "run", "--accel", "sim", "--smp", str(cfg.smp),
           "--memory", f"{cfg.memory_bytes}B",
           "--qmp", f"unix:{tmp / (name + '.qmp')}", "--incoming", uri, "-S",
           "--label", f"{name}-destination"]
    with open(log_path, "w") as log:
        proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            with trio.move_on_after(30):
                while not sock.exists() and proc.poll() is None:
                    await trio.sleep(0.02)
            if not sock.exists():
                raise CompareError(f"destination {name} did not listen on {sock}: "
                                   f"{log_path.read_text()[-2000:]}")

            async def start(nursery: trio.Nursery) -> None:
                pass

            yield uri, start
        finally:
            await _stop_process(proc)


async def _stop_process(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if proc.poll() is None:
            proc.terminate()
            with trio.move_on_after(5):
                await proc.wait()
        if proc.poll() is None:
            proc.kill()
            await proc.wait()


def _sim_parts(vm: VM) -> tuple[SimKVM, SimVCPUs]:
    """The simulated KVM and vCPU controller the comparison drives (narrowed
    from the VM's seams: the comparison needs the simulator's workloads)."""
    from memory.kvm import SimKVM
    from memory.kvm.sim.sim_vcpu import SimVCPUs

    kvm, vcpus = vm.machine.kvm, vm.vcpus
    if not isinstance(kvm, SimKVM) or not isinstance(vcpus, SimVCPUs):
        raise CompareError(f"the comparison drives the simulated KVM, not {type(kvm).__name__}")
    return kvm, vcpus


def _prewrite(vm: VM) -> None:
    """The guest writes each page of its working set once (through the
    fault path: mapped, writable), before anything logs."""
    from memory.kvm.sim._sim_vcpu_proc import GREEDY_BATCH_PAGES
    from memory.kvm.sim.workloads import StreamWorkload

    kvm, vcpus = _sim_parts(vm)
    for v, wl in enumerate(vcpus.workloads):
        if not isinstance(wl, StreamWorkload):
            raise CompareError(f"vCPU {v} runs {type(wl).__name__}, not the comparison's stream workload")

        def write(gfns: NDArray[np.int64], v: int = v) -> None:
            kvm.vcpu_write(gfns, v)

        target = wl.passes + 1
        while wl.passes < target:
            wl.step(GREEDY_BATCH_PAGES, write)
    vcpus.set_workloads(None)  # pushes the programs' new state to the processes


async def run_case(cfg: CompareConfig, guest: str, wp_all: bool, tmp: Path, *,
                   kvm_hook: Callable[[SimKVM], None] | None = None) -> RunResult:
    """Migrate one guest; returns its history and metrics.

    ``kvm_hook(kvm)``, if given, is called with the source's SimKVM before
    anything runs (tests use it to install a broken variant).

    Raises:
        ValueError: ``guest`` is not one of :data:`GUESTS`.
        CompareError: the listener is not in the expected mode, or the
            destination did not start.
    """
    from memory.kvm.sim.sim_vcpu import parse_fault_cost
    from memory.kvm.sim.workloads import StreamWorkload

    from ..engine._machine import AccelConfig
    from ..engine._status import MigrationStatus as S
    from ..qmp._vm import VM

    if guest not in GUESTS:
        raise ValueError(f"guest must be one of {GUESTS}, not {guest!r}")
    label = run_label(guest, wp_all)
    accel = AccelConfig(kind="sim", write_protect_all=wp_all, manual_protect=False, smp=cfg.smp,
                        fault_cost=parse_fault_cost(cfg.fault_cost))
    vm = VM(memory_bytes=cfg.memory_bytes, accel=accel, workload="stream", start_paused=True, label=label)
    kvm, vcpus = _sim_parts(vm)
    ws = max(1, cfg.working_set // cfg.smp)  # each vCPU writes its share of the working set
    vcpus.set_workloads(lambda pages, base: StreamWorkload(pages, gfn_base=base,
                                                              working_set=min(ws, pages.shape[0])))
    vm.machine.workload_name = f"stream,working-set={cfg.working_set * TARGET_PAGE_SIZE >> 20}M"
    mode = vm.kvm_listener.statistics().mode
    expected = "write-protect-all" if wp_all else "legacy"
    if mode != expected:
        raise CompareError(f"{label}: the KVM listener runs in {mode!r} mode, not {expected!r}")
    vm.options.migrate_set_parameters(max_bandwidth=cfg.max_bandwidth, downtime_limit=cfg.downtime_limit,
                                      cpu_throttle_initial=cfg.cpu_throttle_initial,
                                      cpu_throttle_increment=cfg.cpu_throttle_increment)
    vm.options.migrate_set_capabilities([{"capability": "auto-converge", "state": cfg.auto_converge}])
    if kvm_hook is not None:
        kvm_hook(kvm)
    acct = CauseAccounting(kvm.ioctl_statistics, stat_names=KVM_STATS)
    vm.ms.cost_meter = acct
    if guest == "pre-written":
        _prewrite(vm)
    name = guest.replace("-", "") + ("-on" if wp_all else "-off")
    async with _destination(cfg, tmp, name) as (uri, dest_nursery_start):
        async with trio.open_nursery() as nursery:
            await dest_nursery_start(nursery)
            await nursery.start(vm.run)
            acct.reset()
            guest0 = vcpus.stats  # every vCPU process's row, summed (the "guest" counters)
            kvm_before = kvm.statistics()
            vm.options.migrate_set_parameters(max_bandwidth=256 << 10)  # see below
            await vm.qmp_migrate(uri)
            # the guest starts once logging has started (setup done)
            while vm.state.status in (S.NONE, S.SETUP):
                await trio.sleep(0.001)
            start = vcpus.statistics()
            written0, run_ns0 = start.pages_written or 0, start.run_ns or 0
            t_cont_ns = time.perf_counter_ns()
            await vm.qmp_cont()
            # The vCPUs are processes: on a loaded host one may be scheduled
            # only after a quick run's bulk stage is over, and the first dirty
            # log then finds nothing.  Hold the sender to a trickle until the
            # guest has written its first batch (normally a few ms).
            deadline = time.perf_counter() + 10
            while (vcpus.statistics().pages_written or 0) == written0 and time.perf_counter() < deadline:
                await trio.sleep(0.001)
            vm.options.migrate_set_parameters(max_bandwidth=cfg.max_bandwidth)
            with trio.move_on_after(cfg.timeout_s):
                while vm.state.status in (S.SETUP, S.ACTIVE, S.DEVICE, S.CANCELLING):
                    await trio.sleep(0.005)
            if vm.state.running:  # timed out: cancel, as a user would
                await vm.qmp_migrate_cancel()
                while vm.state.running:
                    await trio.sleep(0.005)
            snap = acct.snapshot()
            stopped_ns = snap[Cause.VM_STOP].first_begin_ns
            t_end_ns = stopped_ns if stopped_ns is not None else time.perf_counter_ns()
            per_vcpu = vcpus.statistics()
            written = (per_vcpu.pages_written or 0) - written0
            run_ns = (per_vcpu.run_ns or 0) - run_ns0
            kvm_after = kvm.statistics()
            guest_now = vcpus.stats
            vdelta = {k: v - guest0.get(k, 0) for k, v in guest_now.items()}
            nursery.cancel_scope.cancel()
    vm.ms.cost_meter = NO_METER
    mig = vm.last_outgoing
    if mig is None:
        raise CompareError(f"{label}: no outgoing migration ran")
    hist = mig.counters.history
    hist.label = label
    guest_s = max((t_end_ns - t_cont_ns) / 1e9, 1e-9)
    lst = vm.kvm_listener.statistics()
    metrics = _metrics(hist, snap, kvm_after.delta(kvm_before), vdelta, lst,
                       written=written, guest_s=guest_s, run_ns=run_ns,
                       throttle=max((r.throttle_pct for r in hist.iterations), default=0))
    metrics["listener-mode"] = mode
    metrics["smp"] = cfg.smp
    metrics["vcpu-mmu-lock-wait-ns"] = vdelta["mmu_lock_wait_ns"]
    metrics["vcpu-fault-cost-ms"] = vdelta["fault_cost_ns"] / 1e6
    metrics["vcpus"] = per_vcpu.to_json()
    metrics["prewrite"] = guest == "pre-written"
    if mig.counters.error_desc:
        metrics["error"] = mig.counters.error_desc
    vm.machine.ram_block.close()
    return RunResult(guest, wp_all, hist, metrics)


def _metrics(hist: MigrationHistory, snap: AccountingSnapshot, d: dict[str, int],
             guest: dict[str, int], lst: KVMListenerStatistics, *, written: int, guest_s: float, run_ns: int,
             throttle: int) -> dict[str, Any]:
    syncs = snap.syncs
    first = syncs[0] if syncs else None
    first_dirty = next((s for s in syncs if s.pages and not s.last_stage), None)
    dl = snap.group(DIRTY_LOG_GROUP)
    memslot = snap[Cause.SET_MEMORY_REGION]
    stop = snap[Cause.VM_STOP]
    g_acq = guest["mmu_lock_acquisitions"]
    return {
        "status": hist.status,
        "guest-dirty-rate-pages-per-s": written / guest_s,
        "guest-pages-written": int(written),
        "guest-running-s": guest_s,
        "guest-cpu-share": run_ns / 1e9 / guest_s,
        "guest-write-speed-pages-per-s": written / (run_ns / 1e9) if run_ns else None,
        "total-time-ms": hist.total_time_ms,
        "iterations": len(hist.iterations),
        "downtime-ms": None if hist.downtime is None else hist.downtime.total_ms,
        "max-throttle-pct": throttle,
        "vm-stop-ms": stop.time_ns / 1e6 if stop.calls else None,
        "first-sync-ms": first.dirty_log_ns / 1e6 if first else None,
        "first-dirty-log-ms": first_dirty.dirty_log_ns / 1e6 if first_dirty else None,
        "first-dirty-log-sync": first_dirty.index if first_dirty else None,
        "first-dirty-log-pages": first_dirty.pages if first_dirty else None,
        "first-dirty-log-sptes-write-protected": (first_dirty.stat("sptes_write_protected")
                                                  if first_dirty else None),
        "dirty-log-ms": dl.time_ns / 1e6,
        "dirty-log-calls": dl.calls,
        "dirty-log-sptes-write-protected": dl.stat("sptes_write_protected"),
        "dirty-log-mmu-lock-hold-ms": dl.stat("mmu_lock_hold_ns") / 1e6,
        "dirty-log-max-mmu-lock-hold-ms": dl.max_stat("mmu_lock_hold_ns") / 1e6,
        "log-start-sptes-write-protected": memslot.stat("sptes_write_protected"),
        "log-start-ms": memslot.time_ns / 1e6,
        "guest-sptes-write-protected": guest["sptes_write_protected"],
        "guest-mmu-lock-hold-ms": guest["mmu_lock_hold_ns"] / 1e6,
        "guest-mmu-lock-mean-hold-us": guest["mmu_lock_hold_ns"] / 1e3 / g_acq if g_acq else None,
        "mmu-lock-hold-ms": d["mmu_lock_hold_ns"] / 1e6,
        "mmu-lock-acquisitions": d["mmu_lock_acquisitions"],
        "faults-fast": d["faults_fast"],
        "faults-push-down": d["faults_push_down"],
        "faults-map": d["faults_map"],
        "sptes-write-protected": d["sptes_write_protected"],
        "tlb-flushes": d["tlb_flushes"],
        "root-reloads": d["root_reloads"],
        "syncs": [{"sync": s.index, "last_stage": s.last_stage, "dirty_log_ns": s.dirty_log_ns,
                   "sptes_write_protected": s.stat("sptes_write_protected"),
                   "mmu_lock_hold_ns": s.stat("mmu_lock_hold_ns"), "pages": s.pages,
                   "dirty_log_ms": s.dirty_log_ns / 1e6} for s in syncs],
        "listener": {"global-syncs": lst.global_syncs, "pages-fetched": lst.pages_fetched,
                     "write-protect-all-calls": lst.write_protect_all_calls},
    }


async def run_compare(cfg: CompareConfig, *, repeat: int = 1,
                      progress: Callable[[str], None] | None = None) -> list[RunResult]:
    """The four cases, ``repeat`` times each, interleaved (off, on, off,
    on...) so that a slow spell of the host hits both modes alike."""
    runs: dict[tuple[str, bool], list[RunResult]] = {(g, w): [] for g in GUESTS for w in (False, True)}
    with tempfile.TemporaryDirectory(prefix="migrator-compare-") as tmp:
        for rep in range(repeat):
            for guest in GUESTS:
                for wp_all in (False, True):
                    if progress:
                        progress(f"running {run_label(guest, wp_all)}"
                                 + (f" (repeat {rep + 1}/{repeat})" if repeat > 1 else "") + " ...")
                    runs[(guest, wp_all)].append(await run_case(cfg, guest, wp_all, Path(tmp)))
    return [aggregate(rs) for rs in runs.values()]
