"""The vCPU controller: :class:`RealVCPUs`, the vCPU threads, stop/kick,
throttle, state save/load and statistics over :class:`RealVCPU` fds.

The accelerator-side vCPU controller the migration engine drives has the
same interface as :class:`memory.kvm.sim.sim_vcpu.SimVCPUs`: ``run``,
``running``, ``vm_start``, ``vm_stop``, ``set_throttle``, ``save_state``,
``load_state``, ``statistics``.  The state blob's format and its validator
are :mod:`._state`.

Threads.  Each vCPU runs ``KVM_RUN`` in its own OS thread (a
``trio.to_thread.run_sync`` worker owned by :meth:`RealVCPUs.run`'s
nursery).  ``fcntl.ioctl(fd, KVM_RUN, 0)`` releases the GIL, so the guest
runs while Python code runs elsewhere; ``sys.setswitchinterval(1e-4)``
while running keeps exit handling responsive when the main thread is busy
(reference/kvm.md pitfall 3).

Stopping (the ordering rule vm_stop relies on).  A kick is:

1. under the vCPU's lock, set the request flag and ``kvm_run->immediate_exit
   = 1``;
2. if the thread is inside (or about to enter) ``KVM_RUN``,
   ``pthread_kill(SIGUSR1)`` so the running ``KVM_RUN`` returns ``EINTR``.

The thread re-enters ``KVM_RUN`` only after re-checking the flags under the
same lock, and only resets ``immediate_exit`` to 0 when nothing is pending,
so a kick can never be lost between two ``KVM_RUN`` calls.  A stop is
acknowledged only after a ``KVM_RUN`` that returned ``EINTR``
(``KVM_EXIT_INTR``): with ``immediate_exit`` set, that last ``KVM_RUN``
first completes any pending I/O (the ``out`` the guest exited on), so once
:meth:`RealVCPUs.vm_stop` returns no guest instruction runs any more and
REGS/SREGS describe an instruction boundary.  The Python SIGUSR1 handler
(a no-op, installed from the main thread) only exists so that the signal
does not kill the process; ``fcntl.ioctl`` raises ``InterruptedError``,
which is ``KVM_EXIT_INTR``.

With N vCPUs (``--smp N``) :meth:`RealVCPUs.vm_stop` first sets
``running = False`` under the controller's condition, then kicks every vCPU,
then waits for every vCPU's ``stopped`` event.  ``stopped`` is set only by
the vCPU's own thread, and only when it is out of ``KVM_RUN`` for good:
after the acknowledging ``KVM_EXIT_INTR``, while parked, or while halted.
It is cleared under the same condition, before the thread runs guest code
again: by ``vm_start`` for parked threads, and by the thread itself when it
leaves a hlt (a vCPU woken from hlt while ``running`` would otherwise still
carry the ``stopped`` it set when it halted, and ``vm_stop`` would return
while it is in ``KVM_RUN``).  So when ``vm_stop`` returns no vCPU thread is
in ``KVM_RUN`` and none will enter it before the next ``vm_start``.
Each stop's latency is kept; :meth:`RealVCPUs.expected_stop_ns` (the
longest of the last few) is the downtime prediction's stop term.
Counters written by vCPU threads are per vCPU (``_Ctl.stats``,
``_Ctl.exit_reasons``): two threads never update the same counter.

Throttling follows QEMU's cpu-throttle: every ``10 ms / (1 - pct)`` each
vCPU is kicked and sleeps ``pct / (1 - pct) * 10 ms``, each in its own
thread (so every vCPU loses the same share of its time).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import trio

from .. import linux_kvm as K
from .._backend import VCPUControllerStatistics, VCPUCounters
from ._state import VCPUStateError, VCPUStateImage, VCPUStateRecord, encode_vcpu_states, validate_vcpu_states
from ._vcpu_fd import RealVCPU, VCPUError, install_kick_handler
from .guests import LAYOUT, Ctrl, HostRAM, ab_pages_written

__all__ = ["THROTTLE_TIMESLICE_S", "KvmVCPUCounters", "KvmVCPUStatistics", "RealVCPUs"]

#: QEMU's CPU_THROTTLE_TIMESLICE_NS
THROTTLE_TIMESLICE_S = 0.010



#: how many recent stop latencies expected_stop_ns looks at (their maximum)
STOP_HISTORY = 5
#: expected_stop_ns before any stop: the kick (SIGUSR1 + immediate_exit), the
#: KVM_EXIT_INTR and one thread hand-off per vCPU; measured here
#: (tools/bench_vcpu_stop.py) 0.5-0.6 ms median, p95 1-3 ms on a shared host
DEFAULT_STOP_NS = 1_000_000

class _Ctl:
    """Per-vCPU run control shared by the vCPU thread and the controller."""

    def __init__(self, vcpu: RealVCPU) -> None:
        self.vcpu = vcpu
        self.lock = threading.Lock()
        self.tid: int | None = None
        self.in_run = False
        self.stop_pending = False
        self.throttle_pending = False
        self.stopped = threading.Event()
        self.stopped.set()
        self.halted = False
        self.halt_wake = False
        #: written only by this vCPU's thread (no lost updates between threads)
        self.stats: Counter[str] = Counter()
        self.exit_reasons: Counter[int] = Counter()

    def kick(self, *, stop: bool = False, throttle: bool = False) -> None:
        with self.lock:
            self.stop_pending |= stop
            self.throttle_pending |= throttle
            self.vcpu.set_immediate_exit(1)
            if self.in_run and self.tid is not None:
                signal.pthread_kill(self.tid, signal.SIGUSR1)


class RealVCPUs:
    """The vCPU controller over real KVM vCPUs (see the module docstring).

    ``serial``: callback receiving bytes written to COM1 (port 0x3f8);
    ``serial_path``: file the bytes are appended to.  ``on_ring_full(vcpu_id)``
    is called in the vCPU thread on ``KVM_EXIT_DIRTY_RING_FULL`` and must
    harvest and reset the rings before returning (default:
    ``vm.reap_into_stash``).  ``io_handlers[port](vcpu_id, data)`` run in the
    vCPU thread for other ``out`` ports (a handler may block, e.g. to stop a
    test guest exactly at its GUEST_SYNC).
    """

    def __init__(
        self,
        vcpus: list[RealVCPU] | RealVCPU,
        *,
        program: str | None = None,
        ram: HostRAM | None = None,
        serial: Callable[[bytes], None] | None = None,
        serial_path: str | os.PathLike[str] | None = None,
        on_ring_full: Callable[[int], None] | None = None,
        io_handlers: dict[int, Callable[[int, bytes], None]] | None = None,
    ) -> None:
        self.vcpus = [vcpus] if isinstance(vcpus, RealVCPU) else list(vcpus)
        if not self.vcpus:
            raise ValueError("no vCPUs")
        self.vm = self.vcpus[0].vm
        self.program = program
        self.ram = ram
        self.serial = serial
        self.serial_path = serial_path
        self.on_ring_full = on_ring_full
        self.io_handlers = dict(io_handlers or {})
        self.running = False
        self.throttle_pct = 0
        self.serial_output = bytearray()
        self._ctls = [_Ctl(v) for v in self.vcpus]
        self._cond = threading.Condition()
        self._quit = False
        self._serial_file: BinaryIO | None = None
        self._active = False
        self._msr_rejected: list[int] = []
        self._stats: Counter[str] = Counter()  # controller-side (stops); per-vCPU counters live in each _Ctl
        #: the latest stop latencies (ns), for expected_stop_ns
        self.stop_ns: deque[int] = deque(maxlen=STOP_HISTORY)

    # ------------------------------------------------------------ trio side
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the vCPU threads until cancelled (vCPUs start stopped)."""
        install_kick_handler()
        if self._active:
            raise RuntimeError("RealVCPUs.run() is already running")
        self._active = True
        self._quit = False
        old_interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        if self.serial_path is not None:
            self._serial_file = open(self.serial_path, "ab", buffering=0)
        try:
            async with trio.open_nursery() as nursery:
                for ctl in self._ctls:
                    nursery.start_soon(self._thread_task, ctl)
                nursery.start_soon(self._throttle_ticker)
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._shutdown()
        finally:
            sys.setswitchinterval(old_interval)
            if self._serial_file is not None:
                self._serial_file.close()
                self._serial_file = None
            self._active = False

    async def _thread_task(self, ctl: _Ctl) -> None:
        try:
            await trio.to_thread.run_sync(self._vcpu_thread, ctl, abandon_on_cancel=False)
        finally:
            ctl.stopped.set()

    def _shutdown(self) -> None:
        with self._cond:
            self._quit = True
            self._cond.notify_all()
        for ctl in self._ctls:
            ctl.kick(stop=True)

    async def _throttle_ticker(self) -> None:
        while True:
            pct = self.throttle_pct
            if pct <= 0 or not self.running:
                await trio.sleep(THROTTLE_TIMESLICE_S)
                continue
            await trio.sleep(THROTTLE_TIMESLICE_S / (1 - pct / 100))
            if self.running and self.throttle_pct > 0:
                for ctl in self._ctls:
                    ctl.kick(throttle=True)

    async def vm_start(self) -> None:
        """Resume every vCPU (``cont``)."""
        if not self._active:
            raise RuntimeError("RealVCPUs.run() is not running")
        with self._cond:
            for ctl in self._ctls:
                with ctl.lock:
                    ctl.stop_pending = False
                ctl.stopped.clear()
            self.running = True
            self._cond.notify_all()

    async def vm_stop(self) -> None:
        """Stop every vCPU; on return no guest instruction runs any more."""
        t0 = time.perf_counter_ns()
        with self._cond:
            self.running = False
            self._cond.notify_all()  # wakes halted / throttled threads
        for ctl in self._ctls:
            ctl.kick(stop=True)
        # not cancellable half-way (the kick makes every thread stop soon):
        # the caller then records the stop (runstate, stop latencies)
        with trio.CancelScope(shield=True):
            for ctl in self._ctls:
                if not ctl.stopped.is_set():
                    await trio.to_thread.run_sync(ctl.stopped.wait)
        dt = time.perf_counter_ns() - t0
        self._stats["stops"] += 1
        self._stats["stop_ns_total"] += dt
        self._stats["stop_ns_max"] = max(self._stats["stop_ns_max"], dt)
        self._stats["stop_ns_last"] = dt
        self.stop_ns.append(dt)

    def expected_stop_ns(self) -> int:
        """What the next ``vm_stop`` is expected to take (ns): the longest of
        the last STOP_HISTORY stops, or DEFAULT_STOP_NS before any."""
        return max(self.stop_ns) if self.stop_ns else DEFAULT_STOP_NS

    def set_throttle(self, pct: int) -> None:
        if not 0 <= pct < 100:
            raise ValueError(f"throttle percentage {pct} not in [0, 100)")
        self.throttle_pct = int(pct)

    def wake(self) -> None:
        """Wake vCPUs halted by the guest's hlt (an interrupt, in QEMU terms)."""
        with self._cond:
            for ctl in self._ctls:
                ctl.halt_wake = True
            self._cond.notify_all()

    def halted(self) -> bool:
        return all(ctl.halted for ctl in self._ctls)

    # ------------------------------------------------------------ vCPU thread
    def _vcpu_thread(self, ctl: _Ctl) -> None:
        vcpu = ctl.vcpu
        with ctl.lock:
            ctl.tid = threading.get_ident()
        try:
            while True:
                # Parked: wait until running (or quit).
                with self._cond:
                    while not (self.running and not ctl.stop_pending) and not self._quit:
                        ctl.stopped.set()
                        self._cond.wait()
                    if self._quit:
                        return
                    if ctl.halted:
                        if not ctl.halt_wake:
                            ctl.stopped.set()  # a halted vCPU runs no guest code
                            self._cond.wait(0.05)
                            continue
                        ctl.halted = ctl.halt_wake = False
                        # it runs guest code again: under _cond, so a vm_stop
                        # either saw it halted and parked it, or waits for it
                        ctl.stopped.clear()
                self._run_until_kicked(ctl, vcpu)
        finally:
            with ctl.lock:
                ctl.tid = None
                ctl.in_run = False

    def _run_until_kicked(self, ctl: _Ctl, vcpu: RealVCPU) -> None:
        """KVM_RUN loop; returns once a stop request was honoured or the guest halted."""
        while True:
            with ctl.lock:
                if not (ctl.stop_pending or ctl.throttle_pending):
                    vcpu.set_immediate_exit(0)
                ctl.in_run = True
            reason = vcpu.run_once()
            with ctl.lock:
                ctl.in_run = False
            ctl.exit_reasons[reason] += 1
            if reason == K.KVM_EXIT_INTR:
                # Pending I/O was completed by this KVM_RUN: registers are at an
                # instruction boundary.
                if ctl.throttle_pending:
                    with ctl.lock:
                        ctl.throttle_pending = False
                    self._throttle_sleep(ctl)
                if ctl.stop_pending or self._quit:
                    ctl.stopped.set()
                    return
                continue
            if reason == K.KVM_EXIT_IO:
                self._handle_io(ctl, vcpu)
            elif reason == K.KVM_EXIT_HLT:
                ctl.stats["halts"] += 1
                with self._cond:
                    ctl.halted = True
                return
            elif reason == K.KVM_EXIT_DIRTY_RING_FULL:
                ctl.stats["ring_full_exits"] += 1
                if self.on_ring_full is not None:
                    self.on_ring_full(vcpu.vcpu_id)
                else:
                    self.vm.reap_into_stash()
            else:
                regs = vcpu.get_regs()
                raise VCPUError(f"unexpected exit reason {reason}", vcpu_id=vcpu.vcpu_id,
                                exit_reason=reason, rip=regs.rip,
                                run_data=bytes(vcpu._run_map[32:64]).hex())

    def _throttle_sleep(self, ctl: _Ctl) -> None:
        pct = self.throttle_pct
        if pct <= 0:
            return
        ratio = pct / (100 - pct)
        t0 = time.perf_counter_ns()
        with self._cond:
            self._cond.wait_for(lambda: ctl.stop_pending or self._quit or not self.running,
                                timeout=ratio * THROTTLE_TIMESLICE_S)
        ctl.stats["throttle_sleep_ns"] += time.perf_counter_ns() - t0

    def _handle_io(self, ctl: _Ctl, vcpu: RealVCPU) -> None:
        direction, size, port, count, data = vcpu.io_exit()
        if direction == K.KVM_EXIT_IO_IN:
            ctl.stats["io_in"] += 1  # reads see whatever is in the buffer (zeros)
            return
        if port == LAYOUT["PORT_SERIAL"]:
            out = data[::size] if size > 1 else data
            self.serial_output += out
            ctl.stats["serial_bytes"] += len(out)
            if self._serial_file is not None:
                self._serial_file.write(out)
            if self.serial is not None:
                self.serial(out)
        elif port == LAYOUT["PORT_EXCEPTION"]:
            info = {}
            if self.ram is not None:
                c = Ctrl(self.ram)
                info = {"vector": c["exc_vector"], "error_code": c["exc_error"], "rip": c["exc_rip"]}
            raise VCPUError(f"guest exception {info}", vcpu_id=vcpu.vcpu_id, exit_reason=K.KVM_EXIT_IO, **info)
        else:
            if port == LAYOUT["PORT_SYNC"]:
                ctl.stats["syncs"] += 1
            handler = self.io_handlers.get(port)
            if handler is not None:
                handler(vcpu.vcpu_id, data)
            elif port != LAYOUT["PORT_SYNC"]:
                ctl.stats["io_unhandled"] += 1

    # ------------------------------------------------------------ state
    def _require_stopped(self) -> None:
        if self.running or not all(c.stopped.is_set() for c in self._ctls):
            raise RuntimeError("vCPU state can only be moved while the vCPUs are stopped")

    def save_state(self) -> bytes:
        """Every vCPU's state, in vCPU order (:func:`._state.encode_vcpu_states`):
        REGS, SREGS, FPU, VCPU_EVENTS, MP_STATE and every MSR of
        KVM_GET_MSR_INDEX_LIST that can be read."""
        self._require_stopped()
        msr_list = self.vm.get_msr_index_list()
        records = []
        for ctl in self._ctls:
            v = ctl.vcpu
            msrs = tuple((index, value) for index in msr_list if (value := v.get_msr(index)) is not None)
            records.append(VCPUStateRecord(
                id=v.vcpu_id, halted=ctl.halted, sregs=v.get_sregs(), regs=v.get_regs(), fpu=v.get_fpu(),
                events=v.get_vcpu_events(), mp_state=v.get_mp_state(), msrs=msrs))
        return encode_vcpu_states(VCPUStateImage(program=self.program, vcpus=tuple(records)))

    def check_state(self, image: VCPUStateImage) -> None:
        """The state fits this VM: one record per vCPU of ours, same ids in
        the same order (QEMU matches the ``cpu`` sections by instance id; a
        source with another ``-smp`` fails the load the same way)."""
        ours = [v.vcpu_id for v in self.vcpus]
        theirs = [st.id for st in image.vcpus]
        if theirs != ours:  # the count was checked by validate_vcpu_states, with a better message
            raise VCPUStateError(f"vCPU ids {theirs} in the stream, this VM has {ours}")

    def load_state(self, data: bytes) -> None:
        """Destination side, before the first run: validate the whole blob
        (:func:`._state.validate_vcpu_states` with this VM's vCPU count,
        :meth:`check_state`) before touching any vCPU, then
        :meth:`apply_state`."""
        self._require_stopped()
        image = validate_vcpu_states(data, len(self.vcpus))
        self.check_state(image)
        self.apply_state(image)

    def apply_state(self, image: VCPUStateImage) -> None:
        """Load validated state into every vCPU.  CPUID was set when the vCPU
        was created; then SREGS, MSRS, REGS, FPU, EVENTS, MP_STATE."""
        self._require_stopped()
        self.program = image.program or self.program
        for ctl, st in zip(self._ctls, image.vcpus):
            v = ctl.vcpu
            v.set_sregs(st.sregs)
            for index, value in st.msrs:
                if not v.set_msr(index, value):
                    self._msr_rejected.append(index)  # e.g. MSR_KVM_ASYNC_PF_INT here
            v.set_regs(st.regs)
            v.set_fpu(st.fpu)
            v.set_vcpu_events(st.events)
            v.set_mp_state(st.mp_state)
            ctl.halted = st.halted

    # ------------------------------------------------------------ statistics
    def vcpu_statistics(self) -> tuple[KvmVCPUCounters, ...]:
        """One record per vCPU (``x-query-accel-stats`` ``"vcpus"``).

        ``pages_written``: the ab guest's own count (VC_WRITES of the vCPU's
        control slot, published by the guest once per pass, plus the pages
        of the pass in progress read from RAM: :func:`ab_pages_written`); it
        lives in guest RAM and registers, so it migrates with the guest;
        ``None`` for other programs.  ``faults``: the
        ``pf_*`` statistics of the vCPU's KVM_GET_STATS_FD, names as the
        kernel spells them.  ``mmu_lock_wait_ns``: ``None``, KVM exposes no
        mmu_lock wait time (neither in the binary stats nor elsewhere
        without tracing); ``run_ns``: ``None``, not measured.
        """
        ram = self.ram if self.program == "ab" else None
        ctrl = Ctrl(ram) if ram is not None else None
        out = []
        for i, ctl in enumerate(self._ctls):
            kstats = ctl.vcpu.kernel_stats()
            out.append(KvmVCPUCounters(
                index=ctl.vcpu.vcpu_id,
                pages_written=None if ctrl is None or ram is None else ab_pages_written(
                    ram.host, ctrl.vcpu(i, "start"), ctrl.vcpu(i, "end"), ctrl.vcpu(i, "writes")),
                passes=ctrl.vcpu(i, "pass") if ctrl is not None else None,
                faults={k: v for k, v in kstats.items() if k.startswith("pf_")},
                exits={_EXIT_NAMES.get(r, str(r)): n for r, n in ctl.exit_reasons.items()},
                kvm_exits=kstats.get("exits"),
                throttle_sleep_ns=ctl.stats["throttle_sleep_ns"],
                halted=ctl.halted,
            ))
        return tuple(out)

    def statistics(self) -> KvmVCPUStatistics:
        """Controller totals (stops, serial bytes, throttle...), the exits
        summed over the vCPUs, and :meth:`vcpu_statistics`."""
        totals: Counter[str] = Counter()
        exits: Counter[int] = Counter()
        for ctl in self._ctls:
            totals.update(ctl.stats)  # adds
            exits.update(ctl.exit_reasons)
        counters: dict[str, int] = dict(self._stats)
        counters.update(totals)
        counters.setdefault("serial_bytes", 0)
        return KvmVCPUStatistics(
            vcpus=self.vcpu_statistics(), throttle_pct=self.throttle_pct, counters=counters,
            exits={_EXIT_NAMES.get(r, str(r)): n for r, n in exits.items()},
            msr_rejected=tuple(self._msr_rejected),
            passes=Ctrl(self.ram)["pass"] if self.ram is not None and self.program == "ab" else None,
            guest_syncs=Ctrl(self.ram)["syncs"] if self.ram is not None and self.program == "selftest" else None)


@dataclass(frozen=True, slots=True, kw_only=True)
class KvmVCPUCounters(VCPUCounters):
    """One real-KVM vCPU thread's counters: ``faults`` are the kernel's
    ``pf_*`` statistics, ``exits`` the exit reasons this thread saw;
    ``passes``: the ab guest's pass count (``None`` for other programs),
    ``kvm_exits``: the kernel's ``exits`` statistic, ``halted``: in HLT."""

    passes: int | None = None
    kvm_exits: int | None = None
    halted: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "cpu-index": self.index, "pages-written": self.pages_written, "passes": self.passes,
            "faults": dict(self.faults), "mmu-lock-wait-ns": self.mmu_lock_wait_ns, "exits": dict(self.exits),
            "kvm-exits": self.kvm_exits, "throttle-sleep-ns": self.throttle_sleep_ns, "halted": self.halted,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class KvmVCPUStatistics(VCPUControllerStatistics):
    """:meth:`RealVCPUs.statistics`.  ``counters``: ``stops``,
    ``stop_ns_total``/``_max``/``_last`` (after a stop) and the vCPU threads'
    counters summed (``halts``, ``serial_bytes``, ``throttle_sleep_ns``...);
    ``msr_rejected``: MSRs KVM refused at load; ``passes`` (ab) and
    ``guest_syncs`` (selftest): the guest's own counters."""

    msr_rejected: tuple[int, ...] = ()
    passes: int | None = None
    guest_syncs: int | None = None

    def controller_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["exits"] = dict(self.exits)
        out["exits_total"] = sum(self.exits.values())
        out["msr_rejected"] = list(self.msr_rejected)
        out["throttle_pct"] = self.throttle_pct
        out["smp"] = len(self.vcpus)
        if self.passes is not None:
            out["passes"] = self.passes
        if self.guest_syncs is not None:
            out["guest_syncs"] = self.guest_syncs
        return out

    def to_json(self) -> dict[str, Any]:
        out = self.controller_json()
        out["vcpus"] = [v.to_json() for v in self.vcpus]
        return out


_EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(K).items() if k.startswith("KVM_EXIT_")
               and isinstance(v, int) and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}
