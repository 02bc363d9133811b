"""Simulated vCPUs: N processes running the guest's program against the
shared simulated MMU (``migrator run --accel sim --smp N``).

This is the simulated counterpart of ``memory.kvm.real.vcpu.RealVCPUs`` and has
the same controller interface (``run``, ``vm_start``, ``vm_stop``,
``set_throttle``, ``save_state``, ``load_state``, ``statistics``), which is
all the migration engine knows about vCPUs.

Each vCPU is a process (:mod:`memory.kvm.sim._sim_vcpu_proc`, a synchronous
loop) started with trio; it inherits the simulated KVM's state memfd and
the RAM memfd (``pass_fds``), so it stores into the same guest pages and
faults on the same sptes as everything else.  The guest's RAM is split
into one page range per vCPU (:func:`vcpu_range`); each vCPU runs its own
copy of the workload on its range (so QEMU's ``check_guests_ram`` applies
per range for ``ab``).

The controller keeps the authoritative copy of every vCPU's program state
in this process: it is pushed to a vCPU before it runs (``vm_start``) if
it changed (boot, ``load_state``), and pulled back when it stops
(``vm_stop``), so ``save_state`` needs no vCPU process.  Boot runs here,
in-process, through the same fault path (:meth:`SimKVM.vcpu_write` with
the vCPU's index).

``vm_stop`` is exact (see :mod:`._sim_vcpu_proc`): it stores a new stop
epoch and returns only once every vCPU has acknowledged it at the top of
its loop, with no fault and no store in flight: when it returns, no vCPU
store can still land in guest RAM until the next ``vm_start``.  Every
change of a vCPU's ``C_RUN`` or ``C_CMD`` rings its doorbell
(:func:`ring_doorbell`), the word all of the vCPU's waits sleep on, and
the vCPUs answer through one eventfd this process sleeps on, so neither
side waits for a timeout.  Each stop's latency (kick to the last state
pulled back) is kept; :meth:`SimVCPUs.expected_stop_ns` is the engine's
stop term of the downtime prediction.

Throttling follows QEMU's cpu-throttle: with ``pct`` percent, after each
10 ms time slice of running the vCPU sleeps ``pct / (100 - pct) * 10`` ms.
Fault cost: every VM exit the simulated fault path takes is charged its
configured cost (``--accel sim,fault-cost=...``) as time the vCPU does not
run the guest (see the README's model).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio  # type: ignore[import-untyped,unused-ignore]  # trio < 0.23 ships no py.typed

from .._backend import VCPUControllerStatistics, VCPUCounters
from . import _sim_shm as S
from ._sim_vcpu_proc import (CMD_LOAD, CMD_QUIT, CMD_SAVE, IDLE_TIMEOUT_S, make_vcpu_workload, ring_doorbell,
                             vcpu_range)

if TYPE_CHECKING:
    import numpy as np

    from ..._ramblock import RAMBlock
    from .simulated import SimKVM
    from .workloads import Workload

__all__ = ["FAULT_COSTS", "SimVCPUCounters", "SimVCPUStatistics", "SimVCPUs", "parse_fault_cost", "vcpu_range"]

#: per-fault cost profiles in ns: (fast page fault, slow-path fault).
#: ``host``: measured on this nested host with real KVM
#: (tests/kvm/measure_kvm.py: 35-90 us per tracked write; the lockless
#: fast fault at the low end, a mapping / push-down fault at the high
#: end); ``hw``: a typical bare-metal VM exit + fault, 1-2 us; ``0``:
#: free (the simulator's raw speed).
FAULT_COSTS = {"host": (35_000, 90_000), "hw": (1_500, 2_000), "0": (0, 0)}
DEFAULT_FAULT_COST = "host"


def parse_fault_cost(text: str) -> tuple[int, int]:
    """``host`` | ``hw`` | ``0`` | ``FAST_US[:SLOW_US]`` -> (fast ns, slow ns)."""
    if text in FAULT_COSTS:
        return FAULT_COSTS[text]
    fast, _, slow = text.partition(":")
    try:
        f = float(fast)
        s = float(slow) if slow else f
    except ValueError:
        raise ValueError(f"fault-cost must be host, hw, 0 or FAST_US[:SLOW_US], not {text!r}") from None
    if f < 0 or s < 0 or f > 1e6 or s > 1e6:
        raise ValueError(f"fault-cost {text!r}: microseconds must be in 0..1e6")
    return int(f * 1000), int(s * 1000)


#: how many recent stop latencies expected_stop_ns looks at (their maximum)
STOP_HISTORY = 5
#: before any stop was measured: the handshake beside the batch in flight
#: (two wake-ups each way and the state's JSON; ~0.3-1 ms measured here)
STOP_HANDSHAKE_NS = 1_000_000
#: how often a wait for the vCPUs' answers checks they are still alive
_LIVENESS_POLL_S = 0.05

_CHILD = "import sys, json; from memory.kvm.sim._sim_vcpu_proc import main; sys.exit(main(json.loads(sys.argv[1])))"


#: the simulated MMU's fault kinds (``VCPUCounters.faults`` keys)
SIM_FAULT_KINDS = ("fast", "map", "push_down")
#: the other per-vCPU counters a record carries (``VCPUCounters.counters``)
SIM_VCPU_COUNTERS = ("mmu_lock_acquisitions", "pml_logged", "fast_pf_cas_failed", "root_reloads",
                     "fault_cost_ns", "store_retries", "batches")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimVCPUCounters(VCPUCounters):
    """One simulated vCPU process's counters: its pid and guest program beside
    the neutral ones (faults ``fast``/``map``/``push_down``, exits
    ``mmio``/``dirty_ring_full``, counters :data:`SIM_VCPU_COUNTERS`)."""

    pid: int = 0
    workload: str = ""
    throttle_pct: int = 0

    def to_json(self) -> dict[str, Any]:
        f, e, c = self.faults, self.exits, self.counters
        return {
            "cpu-index": self.index, "pid": self.pid, "workload": self.workload,
            "pages-written": self.pages_written, "mmu-lock-wait-ns": self.mmu_lock_wait_ns,
            "mmu-lock-acquisitions": c["mmu_lock_acquisitions"],
            "faults-fast": f["fast"], "faults-map": f["map"], "faults-push-down": f["push_down"],
            "pml-logged": c["pml_logged"], "fast-pf-cmpxchg-failed": c["fast_pf_cas_failed"],
            "root-reloads": c["root_reloads"], "fault-cost-ns": c["fault_cost_ns"],
            "store-retries": c["store_retries"], "mmio-exits": e["mmio"],
            "dirty-ring-full-exits": e["dirty_ring_full"], "batches": c["batches"],
            "run-ns": self.run_ns, "throttle-sleep-ns": self.throttle_sleep_ns, "throttle-pct": self.throttle_pct,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class SimVCPUStatistics(VCPUControllerStatistics):
    """:meth:`SimVCPUs.statistics`: the vCPU processes' counters; no
    controller totals in x-query-accel-stats (``to_json()`` is the list of
    the vCPUs' objects).  ``counters`` has ``stop_ns_last`` after a stop."""

    def controller_json(self) -> dict[str, Any] | None:
        return None

    def to_json(self) -> list[dict[str, Any]]:
        return [v.to_json() for v in self.vcpus]


class SimVCPUs:
    """``smp`` vCPU processes running ``workload`` on ``kvm`` (a SimKVM).

    Args:
        kvm: the SimKVM (created with ``nr_vcpus=smp``).
        ram: the RAMBlock (guest-physical 0), shared with the processes.
        workload: workload name; each vCPU runs it on its page range.
        rate: pages/s per vCPU (None = greedy).
        fault_cost: (fast ns, slow ns) charged per VM exit.
        idle_timeout_s: how long a stopped vCPU sleeps before it checks that
            this process is alive (never a latency: the doorbell wakes it).
        wait_word: ``"doorbell"``; ``"run"`` is the broken variant for the
            tests (the vCPUs sleep on C_RUN and miss commands).
    """

    def __init__(self, kvm: SimKVM, ram: RAMBlock, workload: str, *, smp: int = 1, seed: int = 0,
                 rate: float | None = None,
                 fault_cost: tuple[int, int] = FAULT_COSTS[DEFAULT_FAULT_COST],
                 idle_timeout_s: float = IDLE_TIMEOUT_S, wait_word: str = "doorbell") -> None:
        if smp < 1 or smp != kvm.nr_vcpus:
            raise ValueError(f"smp {smp} does not match the VM's {kvm.nr_vcpus} vCPUs")
        self.kvm = kvm
        self.ram = ram
        self.smp = smp
        self.seed = seed
        self.rate = rate
        self.workloads = [make_vcpu_workload(workload, ram.pages, smp, v, seed) for v in range(smp)]
        self.running = False
        self.throttle_pct = 0
        self.fault_cost = fault_cost
        shm = kvm.shared_state
        self._shm = shm
        shm["hdr"][S.H_COST_FAST], shm["hdr"][S.H_COST_MAP] = fault_cost
        self._ctl = shm["vcpu_ctl"]
        self._epoch = 0  # even: stopped
        self._dirty_state = [True] * smp  # the process has not got this state yet
        self._cmd_seq = 0
        self._procs: list[Any] = []  # trio.Process
        self._booted = False
        #: called when a vCPU waits in a dirty-ring-full exit (QEMU's reaper:
        #: the KVM listener's reap), if the VM uses the dirty ring
        self.on_ring_full: Callable[[], object] | None = None
        self.idle_timeout_s = idle_timeout_s
        self.wait_word = wait_word
        self._notify_fd: int | None = None  # the eventfd the vCPUs write their answers to
        self._control = trio.Lock()  # one vm_start / vm_stop at a time
        #: the latest stop latencies (ns): kick to every vCPU's state pulled back
        self.stop_ns: deque[int] = deque(maxlen=STOP_HISTORY)

    # -- compatibility with the single-vCPU interface -------------------------
    @property
    def workload(self) -> Workload:
        return self.workloads[0]

    def set_workloads(self, factory: Callable[[np.ndarray, int], Workload] | None) -> None:
        """Replace every vCPU's program: ``factory(pages, gfn_base)`` per range
        (stopped); ``None``: keep the programs, whose state this process
        changed, and send it to the vCPUs at the next vm_start."""
        if self.running:
            raise RuntimeError("set_workloads while the vCPUs run")
        npages = self.ram.pages.shape[0]
        for v in range(self.smp):
            if factory is not None:
                lo, hi = vcpu_range(npages, self.smp, v)
                self.workloads[v] = factory(self.ram.pages[lo:hi], lo)
            self._dirty_state[v] = True

    @property
    def stats(self) -> dict[str, int]:
        """Counters summed over the vCPUs (pages_written, run_ns, ...)."""
        out: dict[str, int] = {}
        for v in range(self.smp):
            for k, x in self.kvm.vcpu_statistics(v).items():
                out[k] = out.get(k, 0) + x
        return out

    # -- the processes --------------------------------------------------------
    def _addr(self, v: int, word: int) -> int:
        return self._shm.addr("vcpu_ctl", v * S.C_WORDS + word)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the vCPU processes (stopped), then supervise them."""
        shm = self._shm
        self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        fds = (shm.fd, self.ram.fd, self._notify_fd)
        p = shm.params
        try:
            for v in range(self.smp):
                cfg = {"vcpu": v, "nr_vcpus": self.smp, "state_fd": shm.fd, "ram_fd": self.ram.fd,
                       "ram_size": self.ram.used_length, "workload": self.workloads[v].name,
                       "seed": self.seed, "rate": self.rate, "notify_fd": self._notify_fd,
                       "idle_timeout_s": self.idle_timeout_s, "wait_word": self.wait_word,
                       "params": {"nr_vcpus": p.nr_vcpus, "l1_rows": p.l1_rows, "l2_rows": p.l2_rows,
                                  "l3_rows": p.l3_rows, "arena_bytes": p.arena_bytes,
                                  "ring_entries": p.ring_entries}}
                env = dict(os.environ)
                # the tree this package is in (memory/kvm/sim/ -> its root)
                root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
                env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
                proc = await trio.lowlevel.open_process(
                    [sys.executable, "-c", _CHILD, json.dumps(cfg)],
                    pass_fds=fds, env=env)
                self._procs.append(proc)
            deadline = trio.current_time() + 60
            for v in range(self.smp):
                while not self._ctl[v, S.C_ALIVE]:
                    if self._procs[v].poll() is not None:
                        raise RuntimeError(f"simulated vCPU {v} exited at start (status {self._procs[v].returncode})")
                    if trio.current_time() > deadline:
                        raise RuntimeError(f"simulated vCPU {v} did not start")
                    await trio.sleep(0.005)
            task_status.started()
            async with trio.open_nursery() as nursery:
                for v, proc in enumerate(self._procs):
                    nursery.start_soon(self._watch, v, proc)
                if shm["hdr"][S.H_RING_SIZE]:
                    nursery.start_soon(self._reaper)
        finally:
            with trio.CancelScope(shield=True):
                await self._shutdown()

    async def _reaper(self) -> None:
        """kvm_dirty_ring_reaper_thread: reap when a vCPU is ring-full."""
        while True:
            await trio.sleep(0.002)
            if self.on_ring_full is not None and self._ctl[:, S.C_RING_FULL].any():
                self.on_ring_full()

    async def _watch(self, v: int, proc: Any) -> None:  # proc: trio.Process
        status = await proc.wait()
        raise RuntimeError(f"simulated vCPU {v} (pid {proc.pid}) died with status {status}")

    async def _shutdown(self) -> None:
        for v, proc in enumerate(self._procs):
            if proc.poll() is None:
                self._cmd(v, CMD_QUIT)
        deadline = time.monotonic() + 2.0
        for proc in self._procs:
            while proc.poll() is None and time.monotonic() < deadline:
                await trio.sleep(0.005)
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
        self._ctl[:, S.C_ALIVE] = 0  # exited (a killed vCPU could not say so)
        self._procs = []
        self.running = False
        if self._notify_fd is not None:
            os.close(self._notify_fd)
            self._notify_fd = None

    def _alive(self, v: int) -> bool:
        return v < len(self._procs) and self._procs[v].poll() is None

    def _cmd(self, v: int, code: int) -> int:
        self._cmd_seq += 1
        cmd = self._cmd_seq << 8 | code
        S.store8(self._addr(v, S.C_CMD), cmd)
        ring_doorbell(self._addr(v, S.C_DOORBELL))
        return cmd

    async def _answered(self, word: int, values: dict[int, int], doing: str) -> None:
        """Wait until ``C_<word>`` of every vCPU ``v`` in ``values`` is ``values[v]``.

        Sleeps on the eventfd the vCPUs write after each answer (a counter:
        an answer between the check and the sleep leaves it readable); the
        periodic wake-up only checks that the vCPUs are alive."""
        fd = self._notify_fd
        while True:
            pending = [v for v, want in values.items() if S.load8(self._addr(v, word)) != want]
            if not pending:
                return
            for v in pending:
                if not self._alive(v):
                    raise RuntimeError(f"simulated vCPU {v} died while {doing}")
            if fd is None:
                raise RuntimeError("the simulated vCPU processes are not running")
            with trio.move_on_after(_LIVENESS_POLL_S):
                await trio.lowlevel.wait_readable(fd)
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass

    def _mbox_put(self, v: int, data: bytes) -> None:
        import numpy as np

        if len(data) > S.MBOX_BYTES:
            raise ValueError(f"vCPU {v} state is {len(data)} bytes, more than {S.MBOX_BYTES}")
        self._shm["mbox"][v, : len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._ctl[v, S.C_MBOX_LEN] = len(data)

    def _mbox_get(self, v: int) -> dict[str, Any]:
        n = int(self._ctl[v, S.C_MBOX_LEN])
        state: dict[str, Any] = json.loads(bytes(self._shm["mbox"][v, :n]))
        return state

    # -- the controller interface -------------------------------------------
    def boot(self) -> None:
        """The guest's boot-time work (ab zeroes its pages), in-process through
        the same fault path as vCPU ``v``.  Source only, before vm_start."""
        if self._booted:
            return
        for v, wl in enumerate(self.workloads):
            wl.boot(functools.partial(self.kvm.vcpu_write, vcpu=v))
            self._dirty_state[v] = True
        self._booted = True

    async def vm_start(self) -> None:
        async with self._control:
            if self.running:
                return
            if not self._procs:
                raise RuntimeError("vm_start before the vCPU processes run")
            load = {}
            for v in range(self.smp):
                if self._dirty_state[v]:
                    self._mbox_put(v, json.dumps({"workload": self.workloads[v].get_state(),
                                                  "rate": self.rate}).encode())
                    load[v] = self._cmd(v, CMD_LOAD)
            await self._answered(S.C_CMD_ACK, load, "loading its state")
            for v in load:
                self._dirty_state[v] = False
            self._epoch += 1  # odd: run
            for v in range(self.smp):
                S.store8(self._addr(v, S.C_RUN), self._epoch)
                ring_doorbell(self._addr(v, S.C_DOORBELL))
            self.running = True

    async def vm_stop(self) -> None:
        """Kick every vCPU and wait for its exit: when this returns, no guest
        store or fault is in flight, and none starts until vm_start."""
        async with self._control:
            if not self.running:
                return
            # Once the stop epoch is posted the stop runs to its end, cancelled
            # or not (the waits are bounded: a dead vCPU raises): half a stop
            # would leave the vCPUs stopped while ``running`` says otherwise,
            # and vm_start would then never resume them.
            with trio.CancelScope(shield=True):
                await self._stop()

    async def _stop(self) -> None:
        t0 = time.perf_counter_ns()
        self._epoch += 1  # even: stop
        for v in range(self.smp):
            S.store8(self._addr(v, S.C_RUN), self._epoch)
            ring_doorbell(self._addr(v, S.C_DOORBELL))
        await self._answered(S.C_ACK, dict.fromkeys(range(self.smp), self._epoch), "stopping")
        self.running = False
        # pull the program state back (the vCPUs are stopped: it is final),
        # from all of them at once
        save = {v: self._cmd(v, CMD_SAVE) for v in range(self.smp)}
        await self._answered(S.C_CMD_ACK, save, "saving its state")
        for v in range(self.smp):
            self.workloads[v].set_state(self._mbox_get(v)["workload"])
        self.stop_ns.append(time.perf_counter_ns() - t0)

    def expected_stop_ns(self) -> int:
        """What the next ``vm_stop`` is expected to take (ns): the longest of
        the last STOP_HISTORY stops; before any, the longest batch a vCPU
        runs between two looks at its run word (``run-ns / batches``, the
        exit a kick waits for) plus STOP_HANDSHAKE_NS."""
        if self.stop_ns:
            return max(self.stop_ns)
        batch = 0
        for v in range(self.smp):
            st = self.kvm.vcpu_statistics(v)
            if st["batches"]:
                batch = max(batch, st["run_ns"] // st["batches"])
        return int(batch + STOP_HANDSHAKE_NS)

    def set_throttle(self, pct: int) -> None:
        if not 0 <= pct <= 99:
            raise ValueError(f"throttle percentage {pct} not in 0..99")
        self.throttle_pct = pct
        self._ctl[:, S.C_THROTTLE] = pct

    def save_state(self) -> bytes:
        if self.running:
            raise RuntimeError("save_state while the vCPUs run")
        return json.dumps({"kind": "sim", "smp": self.smp, "rate": self.rate,
                           "vcpus": [wl.get_state() for wl in self.workloads]}).encode()

    def load_state(self, data: bytes) -> None:
        state = json.loads(data)
        if state.get("kind") != "sim":
            raise ValueError(f"vCPU state is for a {state.get('kind')!r} accelerator, not sim")
        vcpus = state.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != self.smp:
            n = len(vcpus) if isinstance(vcpus, list) else "?"
            raise ValueError(f"vCPU state has {n} vCPUs, this machine has -smp {self.smp}")
        new = []
        for v, wl_state in enumerate(vcpus):
            wl = self.workloads[v]
            if wl_state.get("name") != wl.name:
                # The guest's program comes with its state, as a real guest's
                # code comes with its RAM: the destination need not know it.
                wl = make_vcpu_workload(wl_state["name"], self.ram.pages, self.smp, v, 0)
            wl.set_state(wl_state)
            new.append(wl)
        self.workloads = new
        self.rate = state.get("rate")
        self._dirty_state = [True] * self.smp
        self._booted = True

    def statistics(self) -> SimVCPUStatistics:
        """Every vCPU's counters (``to_json()``: x-query-accel-stats' ``vcpus``)."""
        vcpus = []
        for v in range(self.smp):
            st = self.kvm.vcpu_statistics(v)
            vcpus.append(SimVCPUCounters(
                index=v, pid=int(self._ctl[v, S.C_PID]), workload=self.workloads[v].name,
                pages_written=st["pages_written"], run_ns=st["run_ns"], mmu_lock_wait_ns=st["mmu_lock_wait_ns"],
                throttle_sleep_ns=st["throttle_sleep_ns"], throttle_pct=self.throttle_pct,
                faults={kind: st[f"faults_{kind}"] for kind in SIM_FAULT_KINDS},
                exits={"mmio": st["mmio_exits"], "dirty_ring_full": st["ring_full_exits"]},
                counters={name: st[name] for name in SIM_VCPU_COUNTERS}))
        stops = {"stop_ns_last": self.stop_ns[-1]} if self.stop_ns else {}
        return SimVCPUStatistics(vcpus=tuple(vcpus), throttle_pct=self.throttle_pct, counters=stops)
