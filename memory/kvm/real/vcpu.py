"""Real vCPUs: :class:`RealVCPU` (one vCPU fd) and :class:`RealVCPUs`, the
accelerator-side vCPU controller the migration engine drives (same interface
as :class:`memory.kvm.sim.sim_vcpu.SimVCPUs`: ``run``, ``running``,
``vm_start``, ``vm_stop``, ``set_throttle``, ``save_state``,
``load_state``, ``statistics``).

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

import ctypes
import fcntl
import json
import mmap
import os
import signal
import struct
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import trio

from .. import linux_kvm as K
from .._backend import UserMemoryRegion
from .guests import LAYOUT, Ctrl, GuestEntry, ab_pages_written, load_guest_image
from .real import RealKVM, StatsReader, get_cpuid2

#: QEMU's CPU_THROTTLE_TIMESLICE_NS
THROTTLE_TIMESLICE_S = 0.010
STATE_MAGIC = b"MGKVCPU1"
STATE_SECTIONS = ("sregs", "regs", "fpu", "events", "mp_state")


#: how many recent stop latencies expected_stop_ns looks at (their maximum)
STOP_HISTORY = 5
#: expected_stop_ns before any stop: the kick (SIGUSR1 + immediate_exit), the
#: KVM_EXIT_INTR and one thread hand-off per vCPU; measured here
#: (tools/bench_vcpu_stop.py) 0.5-0.6 ms median, p95 1-3 ms on a shared host
DEFAULT_STOP_NS = 1_000_000


class VCPUError(RuntimeError):
    """A vCPU stopped on something it cannot handle; carries the evidence."""

    def __init__(self, message: str, *, vcpu_id: int, exit_reason: int | None = None, **evidence) -> None:
        super().__init__(f"vCPU {vcpu_id}: {message}")
        self.vcpu_id = vcpu_id
        self.exit_reason = exit_reason
        self.evidence = evidence


def _sigusr1_noop(signum, frame) -> None:
    pass


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler (must run in the main thread)."""
    current = signal.getsignal(signal.SIGUSR1)
    if current in (signal.SIG_DFL, None):
        if threading.current_thread() is not threading.main_thread():
            raise VCPUError("SIGUSR1 handler must be installed from the main thread", vcpu_id=-1)
        signal.signal(signal.SIGUSR1, _sigusr1_noop)


class RealVCPU:
    """One vCPU: fd, ``kvm_run`` mapping and the state ioctls."""

    def __init__(self, vm: RealKVM, vcpu_id: int = 0) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.fd = fcntl.ioctl(vm.fd, K.KVM_CREATE_VCPU, vcpu_id)
        self._run_map = mmap.mmap(self.fd, vm.vcpu_mmap_size, flags=mmap.MAP_SHARED,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_u8 = np.frombuffer(self._run_map, dtype=np.uint8)
        # Opened now: KVM_GET_STATS_FD is a vCPU ioctl, it waits for vcpu->mutex,
        # which KVM_RUN holds while the guest runs; reading the stats fd later
        # takes no lock, so statistics can be read from a running vCPU.
        try:
            self._stats: StatsReader | None = StatsReader(self.fd)
        except OSError:
            self._stats = None
        self.set_cpuid2(cpuid_for_vcpu(vm.get_supported_cpuid(), vcpu_id))
        vm._register_vcpu(self)

    # -- kvm_run fields
    @property
    def exit_reason(self) -> int:
        return struct.unpack_from("<I", self._run_map, K.KVM_RUN_EXIT_REASON)[0]

    def set_immediate_exit(self, value: int) -> None:
        self.run_u8[K.KVM_RUN_IMMEDIATE_EXIT] = value

    def io_exit(self) -> tuple[int, int, int, int, bytes]:
        """``(direction, size, port, count, data)`` of a KVM_EXIT_IO."""
        d, size, port, count, off = struct.unpack_from("<BBHIQ", self._run_map, K.KVM_RUN_IO_DIRECTION)
        return d, size, port, count, bytes(self._run_map[off : off + size * count])

    def run_once(self) -> int:
        """One ``KVM_RUN`` (arg must be 0); ``EINTR`` -> ``KVM_EXIT_INTR``."""
        try:
            fcntl.ioctl(self.fd, K.KVM_RUN, 0)
        except InterruptedError:
            return K.KVM_EXIT_INTR
        return self.exit_reason

    # -- state ioctls
    def _get(self, request: int, ctype) -> object:
        buf = bytearray(ctypes.sizeof(ctype))
        fcntl.ioctl(self.fd, request, buf, True)
        return ctype.from_buffer_copy(buf)

    def _set(self, request: int, value) -> None:
        fcntl.ioctl(self.fd, request, bytes(value))

    def get_regs(self) -> K.kvm_regs:
        return self._get(K.KVM_GET_REGS, K.kvm_regs)

    def set_regs(self, regs: K.kvm_regs) -> None:
        self._set(K.KVM_SET_REGS, regs)

    def get_sregs(self) -> K.kvm_sregs:
        return self._get(K.KVM_GET_SREGS, K.kvm_sregs)

    def set_sregs(self, sregs: K.kvm_sregs) -> None:
        self._set(K.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> K.kvm_fpu:
        return self._get(K.KVM_GET_FPU, K.kvm_fpu)

    def set_fpu(self, fpu: K.kvm_fpu) -> None:
        self._set(K.KVM_SET_FPU, fpu)

    def get_vcpu_events(self) -> K.kvm_vcpu_events:
        return self._get(K.KVM_GET_VCPU_EVENTS, K.kvm_vcpu_events)

    def set_vcpu_events(self, events: K.kvm_vcpu_events) -> None:
        self._set(K.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        return self._get(K.KVM_GET_MP_STATE, K.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        self._set(K.KVM_SET_MP_STATE, K.kvm_mp_state(mp_state=state))

    def get_msr(self, index: int) -> int | None:
        """One MSR (KVM_GET_MSRS stops at the first failing MSR, so one at a time)."""
        m = K.kvm_msrs_1(nmsrs=1)
        m.entries[0].index = index
        buf = bytearray(bytes(m))
        n = fcntl.ioctl(self.fd, K.KVM_GET_MSRS, buf, True)
        return K.kvm_msrs_1.from_buffer_copy(buf).entries[0].data if n == 1 else None

    def set_msr(self, index: int, value: int) -> bool:
        m = K.kvm_msrs_1(nmsrs=1)
        m.entries[0].index = index
        m.entries[0].data = value
        # a mutable buffer makes fcntl.ioctl return the ioctl's result (the
        # number of MSRs processed) instead of a copy of the buffer
        return fcntl.ioctl(self.fd, K.KVM_SET_MSRS, bytearray(bytes(m)), True) == 1

    def set_cpuid2(self, cpuid: bytes) -> None:
        # > 1024 bytes: must be a mutable buffer (passed by pointer, GIL held)
        fcntl.ioctl(self.fd, K.KVM_SET_CPUID2, bytearray(cpuid), True)

    def get_cpuid2(self) -> np.ndarray:
        """``KVM_GET_CPUID2``: the vCPU's CPUID entries (structured array)."""
        raw = get_cpuid2(self.fd, K.KVM_GET_CPUID2)
        return np.frombuffer(raw, dtype=np.dtype(K.KVM_CPUID_ENTRY2_DTYPE), offset=K.KVM_CPUID2_HEADER_SIZE)

    def apply_entry(self, entry: GuestEntry) -> None:
        """Start state of a test guest (SREGS, then MSRS, then REGS)."""
        sregs = self.get_sregs()
        for name, seg in entry.segments.items():
            dst = getattr(sregs, name)
            for f in ("selector", "type", "dpl", "s", "l", "db", "g", "base", "limit", "present", "unusable"):
                setattr(dst, f, getattr(seg, f))
            dst.avl = 0
        sregs.gdt.base, sregs.gdt.limit = entry.gdt
        sregs.idt.base, sregs.idt.limit = entry.idt
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
        self.set_sregs(sregs)
        for index, value in entry.msrs.items():
            self.set_msr(index, value)
        regs = K.kvm_regs()
        regs.rip, regs.rsp, regs.rflags = entry.rip, entry.rsp, entry.rflags
        for name, value in entry.gprs.items():
            setattr(regs, name, value)
        self.set_regs(regs)

    def kernel_stats(self) -> dict[str, int]:
        """The vCPU's binary stats (empty where the kernel has none)."""
        if self._stats is None:
            return {}
        try:
            return self._stats.read()
        except OSError:
            return {}

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
            self._stats = None
        if self.fd >= 0:
            self.run_u8 = None  # type: ignore[assignment]
            try:
                self._run_map.close()
            except BufferError:
                pass
            os.close(self.fd)
            self.fd = -1


def cpuid_for_vcpu(cpuid: bytes, apic_id: int) -> bytes:
    """The supported CPUID (``struct kvm_cpuid2``) with vCPU ``apic_id``'s
    APIC IDs, as QEMU gives each vCPU its own: leaf 1 EBX[31:24] (initial
    APIC ID) and EDX of every subleaf of 0xB and 0x1F (x2APIC ID).  The
    test guests do not read them; a guest enumerating CPUs would."""
    buf = bytearray(cpuid)
    (nent,) = struct.unpack_from("<I", buf, 0)
    e = np.frombuffer(buf, dtype=np.dtype(K.KVM_CPUID_ENTRY2_DTYPE), count=nent, offset=K.KVM_CPUID2_HEADER_SIZE)
    leaf1 = e["function"] == 1
    e["ebx"][leaf1] = (e["ebx"][leaf1] & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
    e["edx"][(e["function"] == 0xB) | (e["function"] == 0x1F)] = apic_id
    return bytes(buf)


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
        self.stats: Counter = Counter()
        self.exit_reasons: Counter = Counter()

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
        ram=None,
        serial: Callable[[bytes], None] | None = None,
        serial_path: str | os.PathLike | None = None,
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
        self._serial_file = None
        self._active = False
        self._msr_rejected: list[int] = []
        self._stats: Counter = Counter()  # controller-side (stops); per-vCPU counters live in each _Ctl
        #: the latest stop latencies (ns), for expected_stop_ns
        self.stop_ns: deque[int] = deque(maxlen=STOP_HISTORY)

    # ------------------------------------------------------------ trio side
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
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
        for ctl in self._ctls:
            if not ctl.stopped.is_set():
                await trio.to_thread.run_sync(ctl.stopped.wait, abandon_on_cancel=True)
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
        """Every vCPU's state, in vCPU order: a JSON header describing the
        sections, then the raw structs (REGS, SREGS, FPU, VCPU_EVENTS,
        MP_STATE) and every MSR of KVM_GET_MSR_INDEX_LIST that can be read."""
        self._require_stopped()
        msr_list = self.vm.get_msr_index_list()
        payload = bytearray()
        header: dict = {"format": "migrator-kvm-vcpu", "version": 1, "program": self.program, "vcpus": []}
        for ctl in self._ctls:
            v = ctl.vcpu
            regs = v.get_regs()
            blobs = {
                "sregs": bytes(v.get_sregs()),
                "regs": bytes(regs),
                "fpu": bytes(v.get_fpu()),
                "events": bytes(v.get_vcpu_events()),
                "mp_state": struct.pack("<I", v.get_mp_state()),
            }
            sections = {}
            for name in STATE_SECTIONS:
                sections[name] = [len(payload), len(blobs[name])]
                payload += blobs[name]
            msrs = []
            for index in msr_list:
                value = v.get_msr(index)
                if value is not None:
                    msrs.append([index, value])
            header["vcpus"].append({
                "id": v.vcpu_id,
                "halted": ctl.halted,
                "sections": sections,
                "msrs": msrs,
                "regs": {name: getattr(regs, name) for name, _ in K.kvm_regs._fields_},
            })
        hj = json.dumps(header, sort_keys=True).encode()
        return STATE_MAGIC + struct.pack("<I", len(hj)) + hj + bytes(payload)

    def check_state(self, image: VCPUStateImage) -> None:
        """The state fits this VM: one record per vCPU of ours, same ids in
        the same order (QEMU matches the ``cpu`` sections by instance id; a
        source with another ``-smp`` fails the load the same way)."""
        ours = [v.vcpu_id for v in self.vcpus]
        theirs = [st.id for st in image.vcpus]
        if len(theirs) != len(ours):
            raise VCPUStateError(
                f"the migration stream carries the state of {len(theirs)} vCPU(s), this VM has {len(ours)} "
                f"(--smp {len(ours)}); start the destination with --smp {len(theirs)}")
        if theirs != ours:
            raise VCPUStateError(f"vCPU ids {theirs} in the stream, this VM has {ours}")

    def load_state(self, data: bytes) -> None:
        """Destination side, before the first run: parse and validate the
        whole blob (:func:`parse_vcpu_state`, :meth:`check_state`) before
        touching any vCPU, then :meth:`apply_state`."""
        self._require_stopped()
        image = parse_vcpu_state(data)
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
    def vcpu_statistics(self) -> list[dict]:
        """One object per vCPU (``x-query-accel-stats`` ``"vcpus"``).

        ``pages-written``: the ab guest's own count (VC_WRITES of the vCPU's
        control slot, published by the guest once per pass, plus the pages
        of the pass in progress read from RAM: :func:`ab_pages_written`); it
        lives in guest RAM and registers, so it migrates with the guest;
        ``None`` for other programs.  ``faults``: the
        ``pf_*`` statistics of the vCPU's KVM_GET_STATS_FD, names as the
        kernel spells them.  ``mmu-lock-wait-ns``: ``None``, KVM exposes no
        mmu_lock wait time (neither in the binary stats nor elsewhere
        without tracing).
        """
        ctrl = Ctrl(self.ram) if self.ram is not None and self.program == "ab" else None
        out = []
        for i, ctl in enumerate(self._ctls):
            kstats = ctl.vcpu.kernel_stats()
            out.append({
                "cpu-index": ctl.vcpu.vcpu_id,
                "pages-written": None if ctrl is None else ab_pages_written(
                    self.ram.host, ctrl.vcpu(i, "start"), ctrl.vcpu(i, "end"), ctrl.vcpu(i, "writes")),
                "passes": ctrl.vcpu(i, "pass") if ctrl is not None else None,
                "faults": {k: v for k, v in kstats.items() if k.startswith("pf_")},
                "mmu-lock-wait-ns": None,
                "exits": {_EXIT_NAMES.get(r, str(r)): n for r, n in ctl.exit_reasons.items()},
                "kvm-exits": kstats.get("exits"),
                "throttle-sleep-ns": ctl.stats["throttle_sleep_ns"],
                "halted": ctl.halted,
            })
        return out

    def statistics(self) -> dict:
        """Controller totals (exits, serial bytes, stops, throttle...) and
        ``"vcpus"``: :meth:`vcpu_statistics`."""
        totals: Counter = Counter()
        exits: Counter = Counter()
        for ctl in self._ctls:
            totals.update(ctl.stats)  # adds
            exits.update(ctl.exit_reasons)
        out = dict(self._stats)
        out.update(totals)
        out["exits"] = {_EXIT_NAMES.get(r, str(r)): n for r, n in exits.items()}
        out["exits_total"] = sum(exits.values())
        out["serial_bytes"] = out.get("serial_bytes", 0)
        out["msr_rejected"] = list(self._msr_rejected)
        out["throttle_pct"] = self.throttle_pct
        out["smp"] = len(self._ctls)
        if self.ram is not None and self.program == "ab":
            out["passes"] = Ctrl(self.ram)["pass"]
        if self.ram is not None and self.program == "selftest":
            out["guest_syncs"] = Ctrl(self.ram)["syncs"]
        out["vcpus"] = self.vcpu_statistics()
        return out


class VCPUStateError(ValueError):
    """A vCPU state blob that cannot be loaded (malformed, or not for this VM)."""


@dataclass(frozen=True)
class VCPUStateRecord:
    """One vCPU's state as parsed from the blob (the kernel's structs)."""

    id: int
    halted: bool
    sregs: K.kvm_sregs
    regs: K.kvm_regs
    fpu: K.kvm_fpu
    events: K.kvm_vcpu_events
    mp_state: int
    msrs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VCPUStateImage:
    program: str | None
    vcpus: tuple[VCPUStateRecord, ...]


_SECTION_TYPES = {"sregs": K.kvm_sregs, "regs": K.kvm_regs, "fpu": K.kvm_fpu, "events": K.kvm_vcpu_events}


def parse_vcpu_state(data: bytes) -> VCPUStateImage:
    """Parse and validate a :meth:`RealVCPUs.save_state` blob without touching
    any vCPU: magic, header, every section inside the payload with the size
    of its struct, MSRs as (u32 index, u64 value).  Raises
    :class:`VCPUStateError` naming the first problem."""
    data = bytes(data)
    if data[:8] != STATE_MAGIC:
        raise VCPUStateError(f"not a vCPU state blob (magic {data[:8]!r})")
    if len(data) < 12:
        raise VCPUStateError("vCPU state blob truncated in its header length")
    (hlen,) = struct.unpack_from("<I", data, 8)
    try:
        header = json.loads(data[12 : 12 + hlen])
    except ValueError as exc:
        raise VCPUStateError(f"vCPU state header is not JSON: {exc}") from None
    payload = memoryview(data)[12 + hlen :]
    if not isinstance(header, dict):
        raise VCPUStateError("vCPU state header is not an object")
    if header.get("format") != "migrator-kvm-vcpu" or header.get("version") != 1:
        raise VCPUStateError(f"unknown vCPU state format {header.get('format')!r} v{header.get('version')}")
    vcpus = header.get("vcpus")
    if not isinstance(vcpus, list) or not vcpus:
        raise VCPUStateError("vCPU state lists no vCPUs")
    records = []
    for n, st in enumerate(vcpus):
        where = f"vCPU state record {n}"
        try:
            vid, halted, sections, msrs = st["id"], st.get("halted", False), st["sections"], st["msrs"]
        except (TypeError, KeyError) as exc:
            raise VCPUStateError(f"{where}: missing field {exc}") from None
        if not isinstance(vid, int) or not isinstance(halted, bool) or not isinstance(sections, dict):
            raise VCPUStateError(f"{where}: malformed id/halted/sections")
        blobs = {}
        for name in STATE_SECTIONS:
            sec = sections.get(name)
            size = 4 if name == "mp_state" else ctypes.sizeof(_SECTION_TYPES[name])
            if (not isinstance(sec, list) or len(sec) != 2 or not all(isinstance(x, int) for x in sec)
                    or sec[1] != size or not 0 <= sec[0] <= len(payload) - size):
                raise VCPUStateError(f"{where} (vCPU {vid}): section {name!r} {sec!r} is not {size} bytes "
                                     f"inside the {len(payload)}-byte payload")
            blobs[name] = bytes(payload[sec[0] : sec[0] + size])
        if not isinstance(msrs, list) or not all(
                isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) for x in m)
                and 0 <= m[0] < 1 << 32 and 0 <= m[1] < 1 << 64 for m in msrs):
            raise VCPUStateError(f"{where} (vCPU {vid}): malformed MSR list")
        records.append(VCPUStateRecord(
            id=vid, halted=halted,
            sregs=K.kvm_sregs.from_buffer_copy(blobs["sregs"]),
            regs=K.kvm_regs.from_buffer_copy(blobs["regs"]),
            fpu=K.kvm_fpu.from_buffer_copy(blobs["fpu"]),
            events=K.kvm_vcpu_events.from_buffer_copy(blobs["events"]),
            mp_state=struct.unpack("<I", blobs["mp_state"])[0],
            msrs=tuple((m[0], m[1]) for m in msrs),
        ))
    program = header.get("program")
    if program is not None and not isinstance(program, str):
        raise VCPUStateError("vCPU state: program is not a string")
    return VCPUStateImage(program=program, vcpus=tuple(records))


_EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(K).items() if k.startswith("KVM_EXIT_")
               and isinstance(v, int) and k not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


class GuestPageWriter:
    """Guest writes to pages of the host's choosing, for tests of the dirty log
    on real KVM (the counterpart of the simulated KVM's ``vcpu_write``).

    Loads the ``pages`` program into ``low`` (the host view of guest-physical
    [0, 1 MiB), which must be mapped by some memslot) and runs vCPU
    ``vcpu_id`` synchronously in the calling thread: :meth:`write` makes the
    guest increment byte 0 of each listed page, then waits for its hlt.
    """

    def __init__(self, vm: RealKVM, low, *, vcpu_id: int = 0) -> None:
        self.vm = vm
        self.low = getattr(low, "host", low)
        entry = load_guest_image(self.low, "pages")
        self.ctrl = Ctrl(self.low)
        self.vcpu = RealVCPU(vm, vcpu_id)
        self.vcpu.apply_entry(entry)
        self.list = self.low[LAYOUT["LIST_GPA"] : LAYOUT["DATA_START"]].view(np.uint64)
        self.exits: Counter = Counter()

    def write(self, gfns) -> None:
        gfns = np.asarray(gfns, dtype=np.uint64)
        if len(gfns) > len(self.list):
            raise ValueError(f"at most {len(self.list)} pages per write")
        self.list[: len(gfns)] = gfns << np.uint64(12)
        self.ctrl["list_count"] = len(gfns)
        while True:
            reason = self.vcpu.run_once()
            self.exits[reason] += 1
            if reason == K.KVM_EXIT_HLT:
                return
            if reason == K.KVM_EXIT_DIRTY_RING_FULL:
                self.vm.reap_into_stash()
            elif reason != K.KVM_EXIT_INTR:
                regs = self.vcpu.get_regs()
                raise VCPUError(f"unexpected exit {reason}", vcpu_id=self.vcpu.vcpu_id, exit_reason=reason,
                                rip=regs.rip)


def create_vcpus(vm: RealKVM, smp: int = 1, *, ram=None, program: str | None = None,
                 ctrl: dict[str, int] | None = None) -> tuple[list[RealVCPU], GuestEntry | None]:
    """Create vCPUs 0..smp-1 (after the dirty ring was enabled, if any).
    With ``ram`` and ``program`` the guest image is built for ``smp`` vCPUs
    first (``ab`` splits its data range per vCPU, see
    :func:`memory.kvm.real.guests.vcpu_ranges`) and each vCPU gets its own entry
    state; without, the vCPUs are left for ``load_state`` (a destination)."""
    entry = load_guest_image(ram, program, vcpus=smp, **(ctrl or {})) if program is not None else None
    vcpus = [RealVCPU(vm, i) for i in range(smp)]
    if entry is not None:
        for i, v in enumerate(vcpus):
            v.apply_entry(entry.for_vcpu(i))
    return vcpus, entry


class RealMachine:
    """A complete test machine: VM, guest image in the RAM block, ``smp`` vCPUs.

    ``dirty_log``: ``"bitmap"`` (classic GET_DIRTY_LOG), ``"clear"``
    (MANUAL_DIRTY_LOG_PROTECT2 with ENABLE|INITIALLY_SET, as QEMU enables it)
    or ``"ring"`` (dirty ring of ``ring_size`` entries, enabled before the
    vCPU exists).  With ``create_memslot=False`` the memslots are left to the
    KVM memory listener (``vm.set_user_memory_region``).  ``load_image=False``
    (migration destination) leaves RAM alone: state comes from ``load_state``.
    """

    def __init__(
        self,
        program: str = "ab",
        memory_bytes: int = 64 << 20,
        ram_block=None,
        *,
        dirty_log: str = "bitmap",
        ring_size: int = 4096,
        create_memslot: bool = True,
        log_dirty: bool = True,
        load_image: bool = True,
        ctrl: dict[str, int] | None = None,
        smp: int = 1,
        **vcpus_kwargs,
    ) -> None:
        if dirty_log not in ("bitmap", "clear", "ring"):
            raise ValueError(f"dirty_log must be bitmap, clear or ring, not {dirty_log!r}")
        if ram_block is None:
            from ..._ramblock import RAMBlock

            ram_block = RAMBlock("pc.ram", memory_bytes)
        self.ram = ram_block
        self.dirty_log = dirty_log
        self.vm = RealKVM()
        try:
            if dirty_log == "ring":
                self.vm.enable_dirty_ring(ring_size)
            elif dirty_log == "clear":
                self.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_CAPS)
            if create_memslot:
                self.vm.set_user_memory_region(UserMemoryRegion(
                    slot=0, flags=K.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0, guest_phys_addr=0,
                    memory_size=ram_block.used_length, host=ram_block.host))
            vcpus, self.entry = create_vcpus(self.vm, smp, ram=ram_block, program=program if load_image else None,
                                             ctrl=ctrl)
            self.vcpu = vcpus[0]
            self.vcpus = RealVCPUs(vcpus, program=program, ram=ram_block, **vcpus_kwargs)
        except BaseException:
            self.vm.close()
            raise
        self.ctrl = Ctrl(ram_block)

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> RealMachine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["RealVCPU", "RealVCPUs", "RealMachine", "GuestPageWriter", "VCPUError", "VCPUStateError",
           "VCPUStateImage", "VCPUStateRecord", "parse_vcpu_state", "create_vcpus", "install_kick_handler"]
