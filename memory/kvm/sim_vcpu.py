"""Simulated vCPUs: a trio task that runs a workload against the simulated MMU.

This is the simulated counterpart of ``memory.kvm.vcpu.RealVCPUs`` and has
the same controller interface (``run``, ``vm_start``, ``vm_stop``,
``set_throttle``, ``save_state``, ``load_state``, ``statistics``), which is
all the migration engine knows about vCPUs.

The runner lives in the same trio thread as the migration engine.  A batch
of guest writes (fault path + stores) is synchronous, so once ``vm_stop``
returns no guest write can happen until ``vm_start``: the stop is exact,
which is what the final, stopped dirty sync relies on.

Throttling follows QEMU's cpu-throttle: with ``pct`` percent, after each
10 ms time slice of running the vCPU sleeps ``pct / (100 - pct) * 10`` ms.
"""

from __future__ import annotations

import json
import time

import numpy as np
import trio

from ..workloads import Workload

#: QEMU's CPU_THROTTLE_TIMESLICE_NS
THROTTLE_TIMESLICE_S = 0.010
#: pages per batch for a greedy (unlimited rate) workload
GREEDY_BATCH_PAGES = 8192
#: scheduling tick for rate-limited workloads
TICK_S = 0.005


class SimVCPUs:
    """Runs ``workload`` on ``kvm`` (a SimKVM) at ``rate`` pages/s (None = greedy)."""

    def __init__(self, kvm, workload: Workload, *, rate: float | None = None, vcpu: int = 0) -> None:
        self.kvm = kvm
        self.workload = workload
        self.rate = rate
        self.vcpu = vcpu
        self.running = False
        self.throttle_pct = 0
        self._wakeup = trio.Event()
        self._booted = False
        self.stats = {"batches": 0, "pages_written": 0, "throttle_sleep_ns": 0, "run_ns": 0}

    def _mmu(self, gfns: np.ndarray) -> None:
        self.kvm.vcpu_write(gfns, self.vcpu)

    def boot(self) -> None:
        """The guest's boot-time work (ab zeroes its pages).  Source only."""
        if not self._booted:
            self.workload.boot(self._mmu)
            self._booted = True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        credit = 0.0
        last = time.perf_counter()
        slice_used = 0.0
        while True:
            if not self.running:
                await self._wakeup.wait()
                last = time.perf_counter()
                credit = 0.0
                continue
            now = time.perf_counter()
            if self.rate is None:
                n = GREEDY_BATCH_PAGES
            else:
                credit = min(credit + self.rate * (now - last), self.rate * 0.1 + 1)
                n = int(credit)
                credit -= n
            last = now
            done = 0
            if n:
                t0 = time.perf_counter_ns()
                done = self.workload.step(n, self._mmu)
                elapsed = time.perf_counter_ns() - t0
                self.stats["batches"] += 1
                self.stats["pages_written"] += done
                self.stats["run_ns"] += elapsed
                slice_used += elapsed / 1e9
            if self.throttle_pct and slice_used >= THROTTLE_TIMESLICE_S:
                pct = self.throttle_pct / 100.0
                sleep_s = pct / (1.0 - pct) * THROTTLE_TIMESLICE_S
                slice_used = 0.0
                self.stats["throttle_sleep_ns"] += int(sleep_s * 1e9)
                await trio.sleep(sleep_s)
                last = time.perf_counter()  # no credit accrues while throttled
                continue
            # A greedy guest yields only a checkpoint; an idle one (nothing
            # written) sleeps a tick instead of spinning against the sender.
            await trio.sleep(0 if (self.rate is None and done) else TICK_S)

    async def vm_start(self) -> None:
        self.running = True
        self._wakeup.set()

    async def vm_stop(self) -> None:
        self.running = False
        self._wakeup = trio.Event()

    def set_throttle(self, pct: int) -> None:
        if not 0 <= pct <= 99:
            raise ValueError(f"throttle percentage {pct} not in 0..99")
        self.throttle_pct = pct

    def save_state(self) -> bytes:
        return json.dumps({"kind": "sim", "workload": self.workload.get_state(),
                           "rate": self.rate}).encode()

    def load_state(self, data: bytes) -> None:
        state = json.loads(data)
        if state.get("kind") != "sim":
            raise ValueError(f"vCPU state is for a {state.get('kind')!r} accelerator, not sim")
        wl_state = state["workload"]
        if wl_state.get("name") != self.workload.name:
            # The guest's program comes with its state, as a real guest's
            # code comes with its RAM: the destination need not know it.
            from ..workloads import make_workload

            self.workload = make_workload(wl_state["name"], self.workload.pages,
                                          gfn_base=self.workload.gfn_base)
        self.workload.set_state(wl_state)
        self.rate = state.get("rate")
        self._booted = True

    def statistics(self) -> dict:
        return dict(self.stats, throttle_pct=self.throttle_pct, workload=self.workload.name)
