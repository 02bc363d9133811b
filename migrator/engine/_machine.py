"""Machine construction: RAM, the memory API, KVM (simulated or real), vCPUs.

``--accel`` syntax, in QEMU's spirit::

    sim[,write-protect-all=on|off][,manual-protect=on|off][,pml=on|off][,dirty-log=bitmap|ring]
       [,dirty-ring-size=N][,fault-cost=host|hw|0|US[:US]]
    kvm[,dirty-log=bitmap|clear|ring][,dirty-ring-size=N]
    auto                      # kvm where /dev/kvm is usable, else sim

Everything the engine needs from a machine is here: ``ms`` (the memory
system), ``ram_blocks()``, ``vcpus`` (the controller) and ``kvm_listener``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memory import MemoryRegion, RAMBlock
from memory.kvm.sim.sim_vcpu import SimVCPUs

if TYPE_CHECKING:
    from memory.kvm import RealKVM, RealVCPUs, SimKVM

    from ._seams import VCPUController

#: multipliers of qemu_strtosz's one-letter suffixes (binary: K is 1024)
_SIZE_SUFFIX = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SIZE_RE = re.compile(r"\s*(\d+)(?:\.(\d+))?([A-Za-z]?)")
#: qemu_strtosz refuses values >= this (they overflow uint64_t through a double)
SIZE_LIMIT = 0xFFFFFFFFFFFFFC00


def parse_size(text: str, *, default_suffix: str = "B") -> int:
    """A size in QEMU's syntax (``qemu_strtosz``, util/cutils.c) -> bytes.

    Rules, as QEMU's:

    * a decimal number, optionally with a decimal fraction (``1.5G``), then
      at most one suffix letter, case-insensitive: ``B`` (bytes), ``K``,
      ``M``, ``G``, ``T``, ``P``, ``E``, binary multiples (``1K`` = 1024);
      nothing may follow the suffix (``256MiB`` and ``1 G`` are errors), only
      leading whitespace is skipped;
    * a bare number takes ``default_suffix``, which depends on the caller:
      ``B`` for byte sizes (``qemu_strtosz``: QMP sizes, block sizes),
      ``M`` for guest RAM (``qemu_strtosz_MiB``: ``-m 4096`` is 4 GiB);
    * a fraction needs a multiplier above bytes (``1.5`` with default ``B``
      and ``0.5B`` are errors); the result is truncated to whole bytes;
    * negative numbers, hexadecimal, exponents, and values of 2**64 - 1024
      and beyond are errors.

    Raises:
        ValueError: ``text`` is not a size by these rules (the message says why).
    """
    unit = _SIZE_SUFFIX.get(default_suffix.upper())
    if unit is None:
        raise ValueError(f"default_suffix must be one of {''.join(_SIZE_SUFFIX)}, not {default_suffix!r}")
    m = _SIZE_RE.fullmatch(text)
    if m is None and text.lstrip().startswith("-"):
        raise ValueError(f"invalid size {text!r}: negative")
    if m is None:
        raise ValueError(f"invalid size {text!r}: a number with an optional suffix B, K, M, G, T, P or E "
                         f"(e.g. 256M, 1.5G)")
    integral, fraction, suffix = m.group(1), m.group(2) or "", m.group(3).upper()
    if suffix:
        shift = _SIZE_SUFFIX.get(suffix)
        if shift is None:
            raise ValueError(f"invalid size {text!r}: unknown suffix {m.group(3)!r} (B, K, M, G, T, P or E)")
    else:
        shift = unit
    if fraction.strip("0") and shift == 0:
        raise ValueError(f"invalid size {text!r}: a fraction of a byte")
    # exact arithmetic: integral << shift plus the fraction's share, truncated
    value = (int(integral) << shift) + ((int(fraction or "0") << shift) // int(10 ** len(fraction)))
    if value >= SIZE_LIMIT:
        raise ValueError(f"invalid size {text!r}: too large (at most {SIZE_LIMIT - 1} bytes)")
    return value


#: upper bound of ``--smp`` (QEMU's own limit depends on the machine type)
SMP_MAX = 256


def parse_smp(text: str | int) -> int:
    """``--smp N`` or ``--smp cpus=N`` (QEMU's spelling): the vCPU count, an int >= 1."""
    value = str(text).strip()
    if value.startswith("cpus="):
        value = value[5:]
    try:
        n = int(value, 10)
    except ValueError:
        raise ValueError(f"invalid --smp {text!r} (a vCPU count, e.g. 2)") from None
    if not 1 <= n <= SMP_MAX:
        raise ValueError(f"--smp {n}: the vCPU count must be between 1 and {SMP_MAX}")
    return n


def _onoff(key: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise ValueError(f"accel property {key!r} expects on|off, not {value!r}")


@dataclass
class AccelConfig:
    kind: str = "sim"  # sim | kvm
    write_protect_all: bool | None = None  # sim: None = use it when KVM offers it
    manual_protect: bool | None = None
    pml: bool = False
    dirty_log: str = "bitmap"  # kvm: bitmap | clear | ring
    dirty_ring_size: int = 4096
    #: sim: ns charged per fast / slow-path fault (see memory.kvm.sim.sim_vcpu.FAULT_COSTS)
    fault_cost: tuple[int, int] | None = None
    #: -smp N: the number of vCPUs (QEMU's name); Machine(smp=) may say it instead
    smp: int = 1

    def describe(self) -> str:
        if self.kind == "sim":
            parts = ["sim"]
            if self.write_protect_all is not None:
                parts.append(f"write-protect-all={'on' if self.write_protect_all else 'off'}")
            if self.manual_protect is not None:
                parts.append(f"manual-protect={'on' if self.manual_protect else 'off'}")
            if self.pml:
                parts.append("pml=on")
            if self.fault_cost is not None:
                parts.append(f"fault-cost={self.fault_cost[0] / 1000:g}:{self.fault_cost[1] / 1000:g}")
            if self.dirty_log == "ring":
                parts.append(f"dirty-log=ring,dirty-ring-size={self.dirty_ring_size}")
            return ",".join(parts)
        out = f"kvm,dirty-log={self.dirty_log}"
        return out + (f",dirty-ring-size={self.dirty_ring_size}" if self.dirty_log == "ring" else "")


def parse_accel(spec: str) -> AccelConfig:
    kind, *props = spec.split(",")
    if kind == "auto":
        from memory.kvm import kvm_usable

        ok, _why = kvm_usable()
        kind = "kvm" if ok else "sim"
    if kind not in ("sim", "kvm"):
        raise ValueError(f"unknown accelerator {kind!r} (sim, kvm, auto)")
    cfg = AccelConfig(kind=kind)
    allowed = {"sim": {"write-protect-all", "manual-protect", "pml", "fault-cost", "dirty-log", "dirty-ring-size"},
               "kvm": {"dirty-log", "dirty-ring-size"}}[kind]
    for prop in props:
        key, sep, value = prop.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"invalid property {prop!r} for accel {kind!r} (allowed: {', '.join(sorted(allowed))})")
        if key == "write-protect-all":
            cfg.write_protect_all = _onoff(key, value)
        elif key == "manual-protect":
            cfg.manual_protect = _onoff(key, value)
        elif key == "pml":
            cfg.pml = _onoff(key, value)
        elif key == "fault-cost":
            from memory.kvm.sim.sim_vcpu import parse_fault_cost

            cfg.fault_cost = parse_fault_cost(value)
        elif key == "dirty-log":
            if value not in ("bitmap", "clear", "ring"):
                raise ValueError(f"dirty-log must be bitmap, clear or ring, not {value!r}")
            cfg.dirty_log = value
        elif key == "dirty-ring-size":
            n = int(value)
            if n < 64 or n & (n - 1):
                raise ValueError(f"dirty-ring-size must be a power of two >= 64, not {value!r}")
            cfg.dirty_ring_size = n
    if cfg.write_protect_all and cfg.manual_protect:
        raise ValueError("write-protect-all=on and manual-protect=on exclude each other")
    if kind == "sim" and cfg.dirty_log == "clear":
        raise ValueError("accel sim: dirty-log=clear is manual-protect=on")
    if kind == "sim" and cfg.dirty_log == "ring" and (cfg.write_protect_all or cfg.manual_protect):
        raise ValueError("accel sim: dirty-log=ring excludes write-protect-all and manual-protect")
    return cfg


class Machine:
    """RAM ("ram" at guest-physical 0, as ``-M none -m SIZE``), the memory API and KVM."""

    RAM_IDSTR = "ram"
    #: the vCPU controller (SimVCPUs or RealVCPUs, by accelerator)
    vcpus: VCPUController

    def __init__(self, *, memory_bytes: int, accel: AccelConfig, workload: str = "idle",
                 workload_opts: dict[str, Any] | None = None, prefault: bool = False,
                 serial_path: str | None = None, destination: bool = False, smp: int = 1) -> None:
        from memory import MemorySystem
        from memory.kvm import KVMMemoryListener

        self.accel = accel
        self.memory_bytes = memory_bytes
        self.workload_name = workload
        self.workload_opts = dict(workload_opts or {})
        self.destination = destination
        # one vCPU count, said by Machine(smp=) or by the AccelConfig
        if smp != 1 and accel.smp not in (1, smp):
            raise ValueError(f"--smp {smp} and the accelerator's smp={accel.smp} disagree")
        self.smp = parse_smp(smp if smp != 1 else accel.smp)
        accel.smp = self.smp
        self.ms = MemorySystem()
        self.ram_mr = self.ms.memory_region_init_ram(self.RAM_IDSTR, memory_bytes)
        block = self.ram_mr.ram_block
        assert block is not None  # a RAM region has its block
        self.ram_block: RAMBlock = block
        self.kvm: SimKVM | RealKVM
        self.vcpus: SimVCPUs | RealVCPUs
        self._dirty_ring = False
        if prefault:
            self.ram_block.prefault()
        if accel.kind == "sim":
            self._init_sim()
        else:
            self._init_kvm(serial_path)
        self.kvm_listener = KVMMemoryListener(
            self.ms, self.kvm, write_protect_all=self._wp_all, manual_protect=self._manual,
            dirty_ring=self._dirty_ring)
        if self._dirty_ring and isinstance(self.vcpus, SimVCPUs):
            self.vcpus.on_ring_full = self.kvm_listener.dirty_ring_reap
        self.ms.memory_listener_register(self.kvm_listener, self.ms.address_space_memory)
        self.ms.memory_region_transaction_begin()
        self.ms.system_memory.add_subregion(0, self.ram_mr)
        self.ms.memory_region_transaction_commit()

    def _init_sim(self) -> None:
        from memory.kvm import SimKVM
        from memory.kvm.sim._sim_shm import Params
        from memory.kvm.sim.sim_vcpu import DEFAULT_FAULT_COST, FAULT_COSTS

        a = self.accel
        npages = self.memory_bytes >> 12
        # table capacity: the RAM's tables 4 times over (slot moves add tables)
        ring = a.dirty_log == "ring"
        params = Params(nr_vcpus=self.smp, l1_rows=4 * (npages // 512) + 1024, l2_rows=4 * (npages >> 18) + 256,
                        l3_rows=64, arena_bytes=4 * npages + (1 << 24),
                        ring_entries=a.dirty_ring_size if ring else 0)
        self.kvm = kvm = SimKVM(pml=a.pml, nr_vcpus=self.smp, params=params)
        self._wp_all = False if ring else a.write_protect_all
        self._manual = False if ring else a.manual_protect
        self._dirty_ring = ring
        if ring:
            # as with real KVM: the ring before any vCPU (and memslot)
            kvm.enable_dirty_ring(a.dirty_ring_size)
        cost = a.fault_cost if a.fault_cost is not None else FAULT_COSTS[DEFAULT_FAULT_COST]
        self.vcpus = SimVCPUs(kvm, self.ram_block, self.workload_name, smp=self.smp,
                              seed=self.workload_opts.get("seed", 0), rate=self.workload_opts.get("rate"),
                              fault_cost=cost)

    def _init_kvm(self, serial_path: str | None) -> None:
        """Real KVM: the memslots are created by the KVM memory listener.

        Order matters to KVM: the dirty ring must be enabled before the first
        vCPU exists; manual protect is enabled by the listener (dirty-log=clear)
        before any memslot logs dirty pages.  A destination loads no guest
        image: its RAM and vCPU state arrive with the migration.
        """
        from memory.kvm import RealKVM, RealVCPUs
        from memory.kvm.real.guests import LAYOUT
        from memory.kvm.real.vcpu import create_vcpus

        a = self.accel
        if self.smp > LAYOUT["VCPU_MAX"]:
            raise ValueError(f"--smp {self.smp}: the kvm test guests have room for at most {LAYOUT['VCPU_MAX']} vCPUs")
        self.kvm = kvm = RealKVM()
        if a.dirty_log == "ring":
            kvm.enable_dirty_ring(a.dirty_ring_size)
        self._wp_all = False
        self._manual = a.dirty_log == "clear"
        self._dirty_ring = a.dirty_log == "ring"
        program = self.workload_name if self.workload_name in ("ab", "selftest") else "ab"
        # --smp N: N vCPU threads; the ab guest splits its data range per vCPU
        try:
            vcpus, _entry = create_vcpus(kvm, self.smp, ram=self.ram_block,
                                         program=None if self.destination else program)
        except BaseException:
            kvm.close()
            raise
        self.vcpus = RealVCPUs(vcpus, program=program, ram=self.ram_block, serial_path=serial_path)

    def ram_blocks(self) -> list[tuple[RAMBlock, MemoryRegion]]:
        return [(self.ram_block, self.ram_mr)]

    def boot(self) -> None:
        """Boot-time guest work (source only; a destination gets memory by migration)."""
        if isinstance(self.vcpus, SimVCPUs):  # real KVM's guest programs boot in their first KVM_RUN
            self.vcpus.boot()
