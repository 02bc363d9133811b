"""One simulated vCPU as a process: a plain synchronous loop, as a CPU is.

Started by :class:`memory.kvm.sim.sim_vcpu.SimVCPUs` (``python -m
memory.kvm.sim._sim_vcpu_proc CONFIG_JSON``) with the simulated KVM's shared
state memfd and the RAM memfds inherited at the same descriptor numbers
(``pass_fds``).  It maps them (:mod:`._sim_shm`), builds a
:class:`memory.kvm.SimKVM` attached to the same state, and runs its
workload on its share of guest RAM through the same fault code the
deterministic in-process mode runs (:meth:`SimKVM.vcpu_write`).

One iteration (a *batch* of page writes)::

    bell = C_DOORBELL                before reading what it announces
    read C_CMD, C_RUN                stopped? -> ack it (C_ACK = C_RUN), wait on bell
    pay fault-cost debt, throttle    (VM exits / cpu-throttle sleeps: waits on bell)
    pick the pages                   (the workload's program)
    vcpu_write(pages)                the VM exits: faults, under SRCU, lock / cmpxchg
    guest_seq += 1 (odd)             enter guest mode (a locked add: full fence)
    guest_can_store(pages)?          re-read sptes + reload request AFTER entering
      yes: store; guest_seq += 1     the stores retire in guest mode
      no:  guest_seq += 1; again     a protection or request came in between

Why ``vm_stop`` is exact.  The VMM stores a new (even) epoch in ``C_RUN``
and waits until every vCPU has stored the same epoch in ``C_ACK``.  A vCPU
writes ``C_ACK`` only at the top of its loop, after the previous batch's
stores and faults are complete, and from then on re-reads ``C_RUN`` before
anything else; so when the VMM sees every ack, no fault and no store is in
flight and none can start until the next (odd) epoch.  This is KVM's kick
+ exit: the request is the epoch, the exit is the ack.  **Guarantee: when
``vm_stop`` returns, no store of any vCPU can still land in guest RAM**
(and no fault can still set a dirty bit) until the next ``vm_start``.

Why a stop or a command is never slept through (the doorbell).  Every
wait of the loop (stopped and idle, fault-cost debt, throttle, rate tick,
ring full) is ``futex_wait(C_DOORBELL, bell)`` on the value ``bell`` read
*before* the loop read ``C_CMD`` and ``C_RUN``; the VMM changes ``C_RUN``
or ``C_CMD`` first, then increments ``C_DOORBELL``, then wakes it (all
sequentially consistent).  Either the loop's reads saw the change, or the
increment comes after its read of ``bell`` and the futex compares unequal
(returns at once) or wakes the queued waiter.  The timeouts are only for
noticing a dead VMM, never for latency -- except two that nobody rings:
the ring-full wait polls every 0.5 ms for the reaper's reset (which does
not ring the bell), and a rate-limited vCPU's tick is its pace (a stop
or a command still rings both awake).  (Before: a stopped vCPU slept on
``C_RUN`` while a command changed ``C_CMD``; a command posted between the
loop's read of ``C_CMD`` and the sleep was noticed only when the 50 ms
timeout expired -- 51 of the demo's 60 ms of downtime.  The other waits
were plain sleeps of up to 5 ms.)  The VMM in turn sleeps on an eventfd
that each vCPU writes after storing ``C_ACK`` or ``C_CMD_ACK`` (a
level-triggered counter: nothing to lose either).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _sim_shm as S

if TYPE_CHECKING:
    from .workloads import Workload

#: QEMU's CPU_THROTTLE_TIMESLICE_NS
THROTTLE_TIMESLICE_S = 0.010
#: pages per batch for a greedy (unlimited rate) workload
GREEDY_BATCH_PAGES = 8192
#: scheduling tick for rate-limited workloads
TICK_S = 0.005
#: mailbox commands (low byte of C_CMD)
CMD_LOAD, CMD_SAVE, CMD_QUIT = 1, 2, 3
#: longest idle wait: only how soon a stopped vCPU notices that the VMM died
IDLE_TIMEOUT_S = 0.05
#: the words a vCPU may wait on: the doorbell, and the broken variant the
#: tests run to show a wait on C_RUN misses commands ("run")
WAIT_WORDS = ("doorbell", "run")


def vcpu_range(npages: int, nr_vcpus: int, vcpu: int) -> tuple[int, int]:
    """Pages [lo, hi) of guest RAM that vCPU ``vcpu``'s program works on
    (64-page aligned boundaries, so the vCPUs share no dirty-bitmap word
    except by accident of the workload)."""
    lo = (npages * vcpu // nr_vcpus) & ~63
    hi = npages if vcpu == nr_vcpus - 1 else (npages * (vcpu + 1) // nr_vcpus) & ~63
    return lo, hi


def make_vcpu_workload(name: str, pages: np.ndarray, nr_vcpus: int, vcpu: int, seed: int) -> Workload:
    from .workloads import make_workload

    lo, hi = vcpu_range(pages.shape[0], nr_vcpus, vcpu)
    return make_workload(name, pages[lo:hi], seed=seed + vcpu, gfn_base=lo)


class _Ctl:
    """Addresses and views of this vCPU's control words."""

    def __init__(self, shm: S.SharedState, vcpu: int) -> None:
        self.row = shm["vcpu_ctl"][vcpu]
        self.base = shm.addr("vcpu_ctl", vcpu * S.C_WORDS)
        self.mbox = shm["mbox"][vcpu]

    def addr(self, word: int) -> int:
        return self.base + 8 * word

    def load(self, word: int) -> int:
        return S.load8(self.addr(word))

    def store(self, word: int, value: int) -> None:
        S.store8(self.addr(word), value)


class Doorbell:
    """The vCPU's side of the doorbell (see the module essay): ``seen =
    read()`` before reading C_CMD / C_RUN, then ``wait(seen, timeout)``.

    ``word="run"`` is the broken variant (the wait before the doorbell):
    it sleeps on C_RUN, which a command does not change."""

    def __init__(self, ctl: _Ctl, word: str = "doorbell") -> None:
        if word not in WAIT_WORDS:
            raise ValueError(f"wait word {word!r} not in {WAIT_WORDS}")
        self.addr = ctl.addr(S.C_DOORBELL if word == "doorbell" else S.C_RUN)

    def read(self) -> int:
        return S.load8(self.addr)

    def wait(self, seen: int, timeout_s: float) -> None:
        S.futex_wait(self.addr, seen, timeout_s)


def ring_doorbell(addr: int) -> None:
    """The VMM's side: after changing C_RUN or C_CMD of the vCPU whose
    C_DOORBELL is at ``addr``."""
    S.fetch_add8(addr, 1)
    S.futex_wake(addr)


def main(config: dict[str, Any]) -> int:
    from ._sim_vm import _Retry
    from .simulated import SimKVM
    from ._sim_memslot import unique_first

    vcpu = int(config["vcpu"])
    nr = int(config["nr_vcpus"])
    params = S.Params(**config["params"])
    kvm = SimKVM(nr_vcpus=nr, params=params, _attach=(int(config["state_fd"]), 0))
    kvm.self_vcpu = vcpu
    shm = kvm.shared_state
    ctl = _Ctl(shm, vcpu)
    hdr = shm["hdr"]
    stats = S.StatRow(shm["stats"], vcpu)
    import mmap

    ram_fd, ram_size = int(config["ram_fd"]), int(config["ram_size"])
    ram_map = mmap.mmap(ram_fd, ram_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    pages = np.frombuffer(ram_map, dtype=np.uint8).reshape(-1, 4096)
    wl = make_vcpu_workload(config["workload"], pages, nr, vcpu, int(config.get("seed", 0)))
    rate = config.get("rate")
    bell = Doorbell(ctl, config.get("wait_word", "doorbell"))
    idle_timeout = float(config.get("idle_timeout_s", IDLE_TIMEOUT_S))
    notify_fd = config.get("notify_fd")

    def tell_vmm() -> None:
        """After storing C_ACK (a stop) or C_CMD_ACK: wake the VMM's wait."""
        if notify_fd is not None:
            os.eventfd_write(int(notify_fd), 1)

    ctl.store(S.C_PID, os.getpid())
    ctl.store(S.C_ALIVE, 1)
    parent = os.getppid()
    seq_addr = ctl.addr(S.C_GUEST_SEQ)
    i_fast, i_map, i_push = (S.STAT_INDEX[n] for n in ("faults_fast", "faults_map", "faults_push_down"))
    i_pml = S.STAT_INDEX["pml_logged"]
    i_batches = S.STAT_INDEX["batches"]
    row = shm["stats"][vcpu]
    ring = bool(hdr[S.H_RING_SIZE])
    debt_s = 0.0
    slice_used = 0.0
    credit = 0.0
    last = time.perf_counter()
    cmd_done = 0

    def interruptible_sleep(total: float, epoch: int, stat: str) -> float:
        """Sleep up to ``total`` s while C_RUN stays ``epoch``; returns what is left."""
        end = time.perf_counter() + total
        while True:
            left = end - time.perf_counter()
            if left <= 0:
                return 0.0
            seen = bell.read()
            if ctl.load(S.C_RUN) != epoch:
                return left
            t0 = time.perf_counter_ns()
            bell.wait(seen, left)
            stats[stat] += time.perf_counter_ns() - t0

    while True:
        seen = bell.read()  # before C_CMD and C_RUN: what rings later wakes the waits below
        cmd = ctl.load(S.C_CMD)
        if cmd != cmd_done:
            code = cmd & 0xFF
            if code == CMD_QUIT:
                ctl.store(S.C_ALIVE, 0)
                ctl.store(S.C_CMD_ACK, cmd)
                tell_vmm()
                return 0
            if code == CMD_LOAD:
                n = int(ctl.row[S.C_MBOX_LEN])
                state = json.loads(bytes(ctl.mbox[:n]))
                wl = _load(wl, state["workload"], pages, nr, vcpu)
                rate = state.get("rate")
            elif code == CMD_SAVE:
                data = json.dumps({"workload": wl.get_state(), "rate": rate}).encode()
                if len(data) > S.MBOX_BYTES:
                    ctl.store(S.C_ERROR, 1)
                else:
                    ctl.mbox[: len(data)] = np.frombuffer(data, dtype=np.uint8)
                    ctl.row[S.C_MBOX_LEN] = len(data)
            cmd_done = cmd
            ctl.store(S.C_CMD_ACK, cmd)
            tell_vmm()
            continue
        epoch = ctl.load(S.C_RUN)
        if not epoch & 1:
            # stopped: nothing in flight; say so, then sleep until the bell rings
            if ctl.load(S.C_ACK) != epoch:
                ctl.store(S.C_ACK, epoch)
                tell_vmm()
            bell.wait(seen, idle_timeout)
            if os.getppid() != parent:
                ctl.store(S.C_ALIVE, 0)
                return 0
            last = time.perf_counter()
            credit = 0.0
            continue
        if ctl.load(S.C_ACK) != epoch:
            ctl.store(S.C_ACK, epoch)
        # the VMM died (PR_SET_PDEATHSIG would fire when trio's spawning
        # worker thread exits, not the VMM): stop with it
        if int(row[i_batches]) & 127 == 0 and os.getppid() != parent:
            ctl.store(S.C_ALIVE, 0)
            return 0
        # VM exits still to be paid for (fault cost), then cpu-throttle
        if debt_s > 0:
            t = time.perf_counter()
            debt_s = interruptible_sleep(debt_s, epoch, "fault_cost_ns")
            slice_used += time.perf_counter() - t
            continue
        pct = int(ctl.row[S.C_THROTTLE])
        if pct and slice_used >= THROTTLE_TIMESLICE_S:
            p = pct / 100.0
            slice_used = 0.0
            interruptible_sleep(p / (1.0 - p) * THROTTLE_TIMESLICE_S, epoch, "throttle_sleep_ns")
            last = time.perf_counter()
            continue
        if ring:
            free = kvm.ring_free(vcpu)
            if free <= 0:
                # KVM_EXIT_DIRTY_RING_FULL: wait (outside guest mode, no
                # fault in flight) until userspace harvested and reset
                if not ctl.load(S.C_RING_FULL):
                    ctl.store(S.C_RING_FULL, 1)
                    stats["ring_full_exits"] += 1
                bell.wait(seen, 0.0005)
                continue
            if ctl.load(S.C_RING_FULL):
                ctl.store(S.C_RING_FULL, 0)
        now = time.perf_counter()
        if rate is None:
            n = GREEDY_BATCH_PAGES
        else:
            credit = min(credit + rate * (now - last), rate * 0.1 + 1)
            n = int(credit)
            credit -= n
        last = now
        if ring:
            n = min(n, free)  # each page may push one entry
        if n <= 0:
            bell.wait(seen, TICK_S)
            continue
        idx = wl.next_pages(n)
        if idx.size == 0:
            bell.wait(seen, TICK_S)
            continue
        t0 = time.perf_counter_ns()
        g = idx + wl.gfn_base
        u, _ = unique_first(g)
        before = (int(row[i_fast]), int(row[i_map]), int(row[i_push]), int(row[i_pml]))
        efault = False
        while True:
            try:
                kvm.vcpu_write(u, vcpu)
            except _Retry:
                os.sched_yield()
                continue
            except OSError as exc:
                # a page outside every slot / in a read-only slot: KVM exits
                # to userspace (KVM_EXIT_MMIO); the batch's stores do not
                # happen (no guest memory changes), the vCPU goes on
                stats["mmio_exits"] += 1
                ctl.store(S.C_ERROR, exc.errno or 1)
                efault = True
                break
            S.fetch_add8(seq_addr, 1)  # enter guest mode (odd)
            if kvm.guest_can_store(u, vcpu):
                wl.store(idx)
                S.fetch_add8(seq_addr, 1)  # exit guest mode
                break
            S.fetch_add8(seq_addr, 1)
            stats["store_retries"] += 1
        if efault:
            bell.wait(seen, TICK_S)
            continue
        stats["guest_entries"] += 1
        wl.pages_written += int(idx.size)
        stats["pages_written"] += int(idx.size)
        stats["batches"] += 1
        dfast = int(row[i_fast]) - before[0]
        dmap = int(row[i_map]) - before[1]
        dpml = int(row[i_pml]) - before[3]
        cost_ns = dfast * int(hdr[S.H_COST_FAST]) + dmap * int(hdr[S.H_COST_MAP]) + (
            dpml * int(hdr[S.H_COST_FAST]) >> 9)  # a PML-full exit per 512 logged pages
        debt_s += cost_ns / 1e9
        elapsed = time.perf_counter_ns() - t0
        stats["run_ns"] += elapsed
        slice_used += elapsed / 1e9
        if rate is not None:
            bell.wait(seen, TICK_S)


def _load(wl: Workload, state: dict[str, Any], pages: np.ndarray, nr: int, vcpu: int) -> Workload:
    if state.get("name") != wl.name:
        # the guest's program comes with its state, as a real guest's code with its RAM
        wl = make_vcpu_workload(state["name"], pages, nr, vcpu, 0)
    wl.set_state(state)
    return wl


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
