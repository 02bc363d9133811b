"""One real vCPU: :class:`RealVCPU` (its fd, the ``kvm_run`` mapping, the
state ioctls), the per-vCPU CPUID, :class:`VCPUError` and the SIGUSR1 kick
handler the vCPU threads rely on (:mod:`._control`)."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import signal
import struct
import threading
from types import FrameType
from typing import TypeVar

import numpy as np

from .. import linux_kvm as K
from .guests import GuestEntry
from .real import RealKVM, StatsReader, get_cpuid2

__all__ = ["RealVCPU", "VCPUError", "cpuid_for_vcpu", "install_kick_handler"]

_S = TypeVar("_S", bound=ctypes.Structure)


class VCPUError(RuntimeError):
    """A vCPU stopped on something it cannot handle; carries the evidence."""

    def __init__(self, message: str, *, vcpu_id: int, exit_reason: int | None = None, **evidence: object) -> None:
        super().__init__(f"vCPU {vcpu_id}: {message}")
        self.vcpu_id = vcpu_id
        self.exit_reason = exit_reason
        self.evidence = evidence


def _sigusr1_noop(signum: int, frame: FrameType | None) -> None:
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
        reason: int = struct.unpack_from("<I", self._run_map, K.KVM_RUN_EXIT_REASON)[0]
        return reason

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
    def _get(self, request: int, ctype: type[_S]) -> _S:
        buf = bytearray(ctypes.sizeof(ctype))
        fcntl.ioctl(self.fd, request, buf, True)
        return ctype.from_buffer_copy(buf)

    def _set(self, request: int, value: ctypes.Structure) -> None:
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
        state: int = self._get(K.KVM_GET_MP_STATE, K.kvm_mp_state).mp_state
        return state

    def set_mp_state(self, state: int) -> None:
        self._set(K.KVM_SET_MP_STATE, K.kvm_mp_state(mp_state=state))

    def get_msr(self, index: int) -> int | None:
        """One MSR (KVM_GET_MSRS stops at the first failing MSR, so one at a time)."""
        m = K.kvm_msrs_1(nmsrs=1)
        m.entries[0].index = index
        buf = bytearray(bytes(m))
        n = fcntl.ioctl(self.fd, K.KVM_GET_MSRS, buf, True)
        data: int = K.kvm_msrs_1.from_buffer_copy(buf).entries[0].data
        return data if n == 1 else None

    def set_msr(self, index: int, value: int) -> bool:
        m = K.kvm_msrs_1(nmsrs=1)
        m.entries[0].index = index
        m.entries[0].data = value
        # a mutable buffer makes fcntl.ioctl return the ioctl's result (the
        # number of MSRs processed) instead of a copy of the buffer
        done: int = fcntl.ioctl(self.fd, K.KVM_SET_MSRS, bytearray(bytes(m)), True)
        return done == 1

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
