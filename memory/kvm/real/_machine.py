"""Assembled real-KVM machines: :func:`create_vcpus`, :class:`RealMachine`
(VM, guest image, memslot, vCPUs and their controller) and
:class:`GuestPageWriter` (a guest writing pages of the host's choosing)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .. import linux_kvm as K
from .._backend import UserMemoryRegion
from ._control import RealVCPUs
from ._vcpu_fd import RealVCPU, VCPUError
from .guests import LAYOUT, Ctrl, GuestEntry, GuestRAM, load_guest_image
from .real import RealKVM

if TYPE_CHECKING:
    from ..._ramblock import RAMBlock

__all__ = ["GuestPageWriter", "RealMachine", "create_vcpus"]


class GuestPageWriter:
    """Guest writes to pages of the host's choosing, for tests of the dirty log
    on real KVM (the counterpart of the simulated KVM's ``vcpu_write``).

    Loads the ``pages`` program into ``low`` (the host view of guest-physical
    [0, 1 MiB), which must be mapped by some memslot) and runs vCPU
    ``vcpu_id`` synchronously in the calling thread: :meth:`write` makes the
    guest increment byte 0 of each listed page, then waits for its hlt.
    """

    def __init__(self, vm: RealKVM, low: GuestRAM, *, vcpu_id: int = 0) -> None:
        self.vm = vm
        self.low: npt.NDArray[np.uint8] = low if isinstance(low, np.ndarray) else low.host
        entry = load_guest_image(self.low, "pages")
        self.ctrl = Ctrl(self.low)
        self.vcpu = RealVCPU(vm, vcpu_id)
        self.vcpu.apply_entry(entry)
        self.list = self.low[LAYOUT["LIST_GPA"] : LAYOUT["DATA_START"]].view(np.uint64)
        self.exits: Counter[int] = Counter()

    def write(self, pages: npt.ArrayLike) -> None:
        gfns = np.asarray(pages, dtype=np.uint64)
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


def create_vcpus(vm: RealKVM, smp: int = 1, *, ram: GuestRAM | None = None, program: str | None = None,
                 ctrl: dict[str, int] | None = None) -> tuple[list[RealVCPU], GuestEntry | None]:
    """Create vCPUs 0..smp-1 (after the dirty ring was enabled, if any).
    With ``ram`` and ``program`` the guest image is built for ``smp`` vCPUs
    first (``ab`` splits its data range per vCPU, see
    :func:`memory.kvm.real.guests.vcpu_ranges`) and each vCPU gets its own entry
    state; without, the vCPUs are left for ``load_state`` (a destination)."""
    entry = None
    if program is not None:
        if ram is None:
            raise ValueError(f"guest program {program!r} needs the guest RAM to load into")
        entry = load_guest_image(ram, program, vcpus=smp, **(ctrl or {}))
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
        ram_block: RAMBlock | None = None,
        *,
        dirty_log: str = "bitmap",
        ring_size: int = 4096,
        create_memslot: bool = True,
        log_dirty: bool = True,
        load_image: bool = True,
        ctrl: dict[str, int] | None = None,
        smp: int = 1,
        **vcpus_kwargs: Any,
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

    def __exit__(self, *exc: object) -> None:
        self.close()
