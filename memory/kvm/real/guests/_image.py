"""Building a test guest's image in guest RAM (host side).

The guest runs natively only at CPL3 on this kvm_pvm host (CPL0 is
emulated), so everything privileged is prepared by the host, below 1 MiB of
guest RAM, and loaded with KVM_SET_SREGS (see reference/kvm.md, "A guest
design that runs natively here"):

* identity map of the first 4 GiB with 2 MiB pages; every level has U=1,
  and A/D are preset so the guest never needs the (emulated) A/D updates.
  Consequence (kvm.md pitfall 7): a *read* of a page whose guest PTE is R/W
  with D=1 gets a writable SPTE and is logged dirty (e.g. the code page);
* a GDT in Linux's layout (kernel CS 0x10, user DS 0x2b, user CS 0x33) with
  a 64-bit TSS whose RSP0 is ``KSTACK_TOP`` and whose 8 KiB I/O bitmap
  allows every port (IOPL=3 is stripped on this host, the bitmap is what
  makes ``out`` legal at CPL3);
* an IDT of 32 interrupt gates pointing at the stubs of ``common.inc``;
* the control page (``CTRL_*``) and the program's bytes at ``CODE_GPA``.

Only the RAM block's host view is needed: memslots are created separately
(by the KVM memory listener, or by a test).  ``load_guest_image`` returns the
:class:`GuestEntry` the vCPU is started with.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeAlias, Union

import numpy as np
import numpy.typing as npt

GUESTS_DIR = Path(__file__).resolve().parent


def _parse_layout(path: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*\.equ\s+(\w+)\s*,\s*(0x[0-9a-fA-F]+|\d+)", line)
        if m:
            out[m.group(1)] = int(m.group(2), 0)
    return out


#: every ``.equ`` of layout.inc (CTRL_*, ports, selectors, addresses)
LAYOUT: dict[str, int] = _parse_layout(GUESTS_DIR / "layout.inc")


PROGRAMS = ("ab", "selftest", "pages")
PAGE_SIZE = 4096
TSS_SIZE = 104
IOPB_SIZE = 8192
TSS_LIMIT = TSS_SIZE + IOPB_SIZE  # includes the trailing 0xff byte

# page table entry bits
_P, _RW, _US, _A, _D, _PS = 1, 2, 4, 0x20, 0x40, 0x80

# GDT: (selector, 8-byte descriptor).  Flat segments; L=1 for 64-bit code.
_GDT_ENTRIES = {
    0x08: 0x00CF9A000000FFFF,  # kernel 32-bit code (unused)
    LAYOUT["KERNEL_CS"]: 0x00AF9A000000FFFF,
    LAYOUT["KERNEL_DS"]: 0x00CF92000000FFFF,
    LAYOUT["USER32_CS"] & ~3: 0x00CFFA000000FFFF,
    LAYOUT["USER_DS"] & ~3: 0x00CFF2000000FFFF,
    LAYOUT["USER_CS"] & ~3: 0x00AFFA000000FFFF,
}
_ERROR_CODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}

MSR_STAR = 0xC0000081
EFER_SCE, EFER_LME, EFER_LMA = 1 << 0, 1 << 8, 1 << 10
CR0_VALUE = 0x80050033  # PG | AM | WP | NE | ET | MP | PE
CR4_PAE, CR4_FSGSBASE = 1 << 5, 1 << 16


@dataclass(frozen=True)
class Segment:
    selector: int
    type: int
    dpl: int
    s: int = 1
    l: int = 0
    db: int = 0
    g: int = 1
    base: int = 0
    limit: int = 0xFFFFFFFF
    present: int = 1
    unusable: int = 0


@dataclass(frozen=True)
class GuestEntry:
    """Initial vCPU state for a program (applied with SET_SREGS/REGS/MSRS)."""

    program: str
    rip: int
    rsp: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt: tuple[int, int]  # base, limit
    idt: tuple[int, int]
    segments: dict[str, Segment] = field(default_factory=dict)
    msrs: dict[int, int] = field(default_factory=dict)
    #: general registers set at entry besides rip/rsp/rflags (ab: r15 = control slot)
    gprs: dict[str, int] = field(default_factory=dict)
    #: vCPUs the image was built for (TSSes, kernel stacks, control slots)
    vcpus: int = 1

    def for_vcpu(self, index: int) -> GuestEntry:
        """The entry state of vCPU ``index``: its own TSS (TR base and limit;
        the selector and GDT are shared, TR's hidden part is what the CPU
        uses), hence its own kernel stack, and for ``ab`` its control slot."""
        if not 0 <= index < self.vcpus:
            raise ValueError(f"vCPU {index}: the image was built for {self.vcpus} vCPU(s)")
        base, limit = tss_base_limit(index)
        segments = dict(self.segments)
        segments["tr"] = replace(segments["tr"], base=base, limit=limit)
        gprs = dict(self.gprs)
        if "r15" in gprs:
            gprs["r15"] = vcpu_slot_gpa(index)
        return replace(self, segments=segments, gprs=gprs)


def program_bytes(program: str) -> bytes:
    if program not in PROGRAMS:
        raise ValueError(f"unknown guest program {program!r} (have {PROGRAMS})")
    return (GUESTS_DIR / f"{program}.bin").read_bytes()


class HostRAM(Protocol):
    """Guest RAM with a host view (a :class:`memory.RAMBlock`): byte 0 = GPA 0."""

    host: npt.NDArray[np.uint8]


#: a RAMBlock or its host view (1-D uint8)
GuestRAM: TypeAlias = Union[HostRAM, npt.NDArray[np.uint8]]


def _host_view(ram: GuestRAM) -> npt.NDArray[np.uint8]:
    host = getattr(ram, "host", ram)
    if not isinstance(host, np.ndarray) or host.dtype != np.uint8 or host.ndim != 1:
        raise TypeError("need a RAMBlock or a 1-D uint8 numpy view of guest RAM")
    return host


def tss_base_limit(index: int) -> tuple[int, int]:
    """TSS base and limit of vCPU ``index``.  vCPU 0's TSS sits at TSS_GPA
    followed by the I/O bitmap; vCPU i >= 1 has a 104-byte TSS TSS_STRIDE * i
    below it (between the IDT and TSS_GPA) whose I/O map base is the offset
    of that same bitmap, so all vCPUs share one bitmap."""
    base = LAYOUT["TSS_GPA"] - LAYOUT["TSS_STRIDE"] * index
    return base, (LAYOUT["TSS_GPA"] + TSS_SIZE - base) + IOPB_SIZE


def vcpu_slot_gpa(index: int) -> int:
    """GPA of vCPU ``index``'s control slot (VC_* fields)."""
    return LAYOUT["VCPU_CTRL_GPA"] + LAYOUT["VCPU_CTRL_SIZE"] * index


def vcpu_ranges(start: int, end: int, vcpus: int) -> list[tuple[int, int]]:
    """The per-vCPU split of the data range ``[start, end)``: contiguous
    shares in vCPU order, page-aligned, the first ``npages % vcpus`` one page
    longer (so ``vcpu_ranges(s, e, 1) == [(s, e)]``)."""
    npages = (end - start) // PAGE_SIZE
    if vcpus < 1 or npages < vcpus:
        raise ValueError(f"cannot split {npages} data pages over {vcpus} vCPU(s)")
    q, r = divmod(npages, vcpus)
    out, a = [], start
    for i in range(vcpus):
        b = a + PAGE_SIZE * (q + (i < r))
        out.append((a, b))
        a = b
    out[-1] = (out[-1][0], end)
    return out


def _gdt_bytes() -> bytes:
    table = bytearray(LAYOUT["TSS_SEL"] + 16)
    for sel, desc in _GDT_ENTRIES.items():
        struct.pack_into("<Q", table, sel, desc)
    base, limit = LAYOUT["TSS_GPA"], TSS_LIMIT
    lo = (
        (limit & 0xFFFF)
        | ((base & 0xFFFFFF) << 16)
        | (0x89 << 40)  # present, DPL 0, type 9 = available 64-bit TSS
        | (((limit >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56)
    )
    struct.pack_into("<QQ", table, LAYOUT["TSS_SEL"], lo, base >> 32)
    return bytes(table)


def _idt_bytes() -> bytes:
    table = bytearray(16 * LAYOUT["IDT_VECTORS"])
    for vec in range(LAYOUT["IDT_VECTORS"]):
        off = LAYOUT["CODE_GPA"] + LAYOUT["STUBS_OFFSET"] + 16 * vec
        # offset[15:0], selector, ist, type_attr (P, DPL0, 64-bit interrupt gate), offset[31:16], offset[63:32]
        struct.pack_into("<HHBBHII", table, 16 * vec, off & 0xFFFF, LAYOUT["KERNEL_CS"], 0, 0x8E,
                         (off >> 16) & 0xFFFF, off >> 32, 0)
    return bytes(table)


def load_guest_image(ram: GuestRAM, program: str, *, vcpus: int = 1, **ctrl: int) -> GuestEntry:
    """Write ``program`` and its page tables, GDT, IDT, TSSes and control page
    into guest RAM (a RAMBlock or its host view; byte 0 = GPA 0).

    The data range defaults to [DATA_START, end of RAM).  ``ctrl`` overrides
    control-page fields by lower-case name without the ``CTRL_`` prefix
    (``start=``, ``end=``, ``iteration=``, ``per_loop=``, ``rng=``...).
    ``vcpus``: how many vCPUs run the program (only ``ab`` runs on more than
    one); the data range is split by :func:`vcpu_ranges` into their control
    slots.  Returns vCPU 0's entry; ``entry.for_vcpu(i)`` gives vCPU i's.
    """
    if not 1 <= vcpus <= LAYOUT["VCPU_MAX"]:
        raise ValueError(f"{vcpus} vCPUs: the test guests' layout has room for 1..{LAYOUT['VCPU_MAX']}")
    if vcpus > 1 and program != "ab":
        raise ValueError(f"guest program {program!r} runs on one vCPU (only 'ab' splits its range per vCPU)")
    host = _host_view(ram)
    size = len(host)
    if size < LAYOUT["DATA_START"]:
        raise ValueError(f"guest RAM too small: {size} bytes (need >= {LAYOUT['DATA_START']:#x})")
    if size > PAGE_SIZE * 512 * 512 * LAYOUT["PD_COUNT"]:
        raise ValueError("guest RAM above 4 GiB is not mapped by the test guests")
    code = program_bytes(program)
    if len(code) > LAYOUT["GDT_GPA"] - LAYOUT["CODE_GPA"]:
        raise ValueError(f"{program}.bin too large ({len(code)} bytes)")

    low = host[: LAYOUT["DATA_START"]]
    low[:] = 0
    # Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries map 2 MiB.
    q = low.view(np.uint64)
    q[LAYOUT["PML4_GPA"] // 8] = LAYOUT["PDPT_GPA"] | _P | _RW | _US | _A
    npd = LAYOUT["PD_COUNT"]
    pd_gpas = LAYOUT["PD_GPA"] + PAGE_SIZE * np.arange(npd, dtype=np.uint64)
    q[LAYOUT["PDPT_GPA"] // 8 : LAYOUT["PDPT_GPA"] // 8 + npd] = pd_gpas | np.uint64(_P | _RW | _US | _A)
    big = np.arange(512 * npd, dtype=np.uint64) << np.uint64(21)
    q[LAYOUT["PD_GPA"] // 8 : LAYOUT["PD_GPA"] // 8 + 512 * npd] = big | np.uint64(_P | _RW | _US | _A | _D | _PS)

    gdt = _gdt_bytes()
    idt = _idt_bytes()
    low[LAYOUT["GDT_GPA"] : LAYOUT["GDT_GPA"] + len(gdt)] = np.frombuffer(gdt, np.uint8)
    low[LAYOUT["IDT_GPA"] : LAYOUT["IDT_GPA"] + len(idt)] = np.frombuffer(idt, np.uint8)
    tss = bytearray(TSS_SIZE)
    struct.pack_into("<Q", tss, 4, LAYOUT["KSTACK_TOP"])  # RSP0
    struct.pack_into("<H", tss, 102, TSS_SIZE)  # I/O map base: right after the TSS
    t = LAYOUT["TSS_GPA"]
    low[t : t + TSS_SIZE] = np.frombuffer(bytes(tss), np.uint8)
    low[t + TSS_SIZE : t + TSS_SIZE + IOPB_SIZE] = 0  # every port allowed
    low[t + TSS_LIMIT] = 0xFF  # the bitmap's terminating byte
    for i in range(1, vcpus):  # the other vCPUs' TSSes share vCPU 0's bitmap
        base, limit = tss_base_limit(i)
        struct.pack_into("<Q", tss, 4, LAYOUT["KSTACK_TOP"] - LAYOUT["KSTACK_SIZE"] * i)
        struct.pack_into("<H", tss, 102, limit - IOPB_SIZE)
        low[base : base + TSS_SIZE] = np.frombuffer(bytes(tss), np.uint8)
    c = LAYOUT["CODE_GPA"]
    low[c : c + len(code)] = np.frombuffer(code, np.uint8)

    fields = {
        "start": LAYOUT["DATA_START"],
        "end": size,
        "stride": PAGE_SIZE,
        "iteration": 1,
        "per_loop": 1024,
        "rng": 0x9E3779B97F4A7C15,
    }
    fields.update(ctrl)
    for name, value in fields.items():
        key = "CTRL_" + name.upper()
        if key not in LAYOUT:
            raise ValueError(f"unknown control field {name!r}")
        q[LAYOUT[key] // 8] = value
    if program != "pages" and (
        not (LAYOUT["DATA_START"] <= fields["start"] < fields["end"] <= size) or fields["start"] % PAGE_SIZE
    ):
        raise ValueError(f"bad data range [{fields['start']:#x}, {fields['end']:#x})")
    if program == "ab":
        for i, (a, b) in enumerate(vcpu_ranges(fields["start"], fields["end"], vcpus)):
            slot = vcpu_slot_gpa(i) // 8
            q[slot + LAYOUT["VC_START"] // 8] = a
            q[slot + LAYOUT["VC_END"] // 8] = b
            q[slot + LAYOUT["VC_INDEX"] // 8] = i

    user_data = Segment(LAYOUT["USER_DS"], type=3, dpl=3, db=1)
    entry = GuestEntry(
        program=program,
        rip=c,
        rsp=LAYOUT["USTACK_TOP"],
        rflags=0x2,
        cr0=CR0_VALUE,
        cr3=LAYOUT["PML4_GPA"],
        cr4=CR4_PAE | CR4_FSGSBASE,
        efer=EFER_SCE | EFER_LME | EFER_LMA,
        gdt=(LAYOUT["GDT_GPA"], len(gdt) - 1),
        idt=(LAYOUT["IDT_GPA"], len(idt) - 1),
        segments={
            "cs": Segment(LAYOUT["USER_CS"], type=11, dpl=3, l=1),
            "ds": user_data, "es": user_data, "fs": user_data, "gs": user_data, "ss": user_data,
            "tr": Segment(LAYOUT["TSS_SEL"], type=11, dpl=0, s=0, g=0, base=t, limit=TSS_LIMIT),
            "ldt": Segment(0, type=2, dpl=0, s=0, g=0, limit=0xFFFF, present=0, unusable=1),
        },
        msrs={MSR_STAR: (LAYOUT["USER32_CS"] << 48) | (LAYOUT["KERNEL_CS"] << 32)},
        gprs={"r15": vcpu_slot_gpa(0)} if program == "ab" else {},
        vcpus=vcpus,
    )
    return entry


class Ctrl:
    """Typed access to the control page of a loaded guest (host side)."""

    def __init__(self, ram: GuestRAM) -> None:
        host = _host_view(ram)
        self._q = host[LAYOUT["CTRL_GPA"] : LAYOUT["CTRL_GPA"] + PAGE_SIZE].view(np.uint64)

    def __getitem__(self, name: str) -> int:
        return int(self._q[(LAYOUT["CTRL_" + name.upper()] - LAYOUT["CTRL_GPA"]) // 8])

    def __setitem__(self, name: str, value: int) -> None:
        self._q[(LAYOUT["CTRL_" + name.upper()] - LAYOUT["CTRL_GPA"]) // 8] = value

    def vcpu(self, index: int, name: str) -> int:
        """Field ``VC_<NAME>`` of vCPU ``index``'s control slot (``start``,
        ``end``, ``pass``, ``writes``, ``index``)."""
        off = vcpu_slot_gpa(index) - LAYOUT["CTRL_GPA"] + LAYOUT["VC_" + name.upper()]
        return int(self._q[off // 8])
