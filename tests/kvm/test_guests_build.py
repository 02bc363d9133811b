"""The committed guest bytes are what the sources assemble to, the layout the
host uses is the one the assembly uses, and the vectorised RAM check is
exactly QEMU's loop."""

from __future__ import annotations

import numpy as np
import pytest

from memory.kvm.real.guests import LAYOUT, PROGRAMS, check_guests_ram, check_guests_ram_loop, load_guest_image
from memory.kvm.real.guests import build


@pytest.mark.parametrize("program", PROGRAMS)
def test_bin_matches_source(program):
    if not build.toolchain_available():
        pytest.skip("binutils (as, objcopy) not installed")
    committed = (build.GUESTS_DIR / f"{program}.bin").read_bytes()
    assert build.assemble(program) == committed


def test_layout_is_parsed_from_the_assembly_include():
    assert LAYOUT["CTRL_GPA"] == 0x7000 and LAYOUT["CODE_GPA"] == 0x8000
    ctrl = [v for k, v in LAYOUT.items() if k.startswith("CTRL_") and k != "CTRL_GPA"]
    assert len(ctrl) == len(set(ctrl)), "two control fields share an address"
    assert all(LAYOUT["CTRL_GPA"] <= v < LAYOUT["CTRL_GPA"] + 4096 for v in ctrl)
    # every fixed structure sits below the data range
    for name in ("PML4_GPA", "PDPT_GPA", "GDT_GPA", "IDT_GPA", "TSS_GPA", "LIST_GPA"):
        assert LAYOUT[name] < LAYOUT["DATA_START"]


def test_image_page_tables_and_tss():
    ram = np.zeros(2 << 20, np.uint8)
    entry = load_guest_image(ram, "ab")
    q = ram.view(np.uint64)
    pml4 = int(q[LAYOUT["PML4_GPA"] // 8])
    assert pml4 & ~0xFFF == LAYOUT["PDPT_GPA"] and pml4 & 0b111 == 0b111  # P, RW, U
    pde1 = int(q[LAYOUT["PD_GPA"] // 8 + 1])
    assert pde1 & ~0xFFF == 2 << 20 and pde1 & 0xE7 == 0xE7  # P RW U A D PS
    tss = LAYOUT["TSS_GPA"]
    assert int.from_bytes(ram[tss + 4 : tss + 12].tobytes(), "little") == LAYOUT["KSTACK_TOP"]
    assert ram[tss + 104 : tss + 104 + 8192].max() == 0 and ram[tss + 104 + 8192] == 0xFF
    assert entry.segments["cs"].selector == 0x33 and entry.segments["cs"].dpl == 3
    assert ram[LAYOUT["CODE_GPA"] : LAYOUT["CODE_GPA"] + 3].tobytes() == build.GUESTS_DIR.joinpath("ab.bin").read_bytes()[:3]
    with pytest.raises(ValueError):
        load_guest_image(ram, "ab", start=LAYOUT["DATA_START"] + 1)


def _ab_pattern(npages: int, v: int, reached: int) -> np.ndarray:
    ram = np.zeros(npages * 4096, np.uint8)
    ram[::4096] = v
    ram[reached * 4096 :: 4096] = (v - 1) % 256
    return ram


@pytest.mark.parametrize("v,reached", [(0, 0), (1, 5), (0, 3), (255, 9), (7, 20)])
def test_check_accepts_the_ab_invariant(v, reached):
    ram = _ab_pattern(20, v, reached)
    assert check_guests_ram(ram, 0, len(ram)).bad == 0
    assert check_guests_ram_loop(ram, 0, len(ram)) == 0


def test_check_counts_a_lost_page():
    ram = _ab_pattern(20, 5, 12)
    ram[3 * 4096] = 3  # missed two increments
    r = check_guests_ram(ram, 0, len(ram))
    assert r.bad == 1 and r.bad_addrs == [3 * 4096]


def test_vectorised_check_equals_qemu_loop():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 40))
        ram = _ab_pattern(n, int(rng.integers(0, 256)), int(rng.integers(0, n + 1)))
        for _ in range(int(rng.integers(0, 4))):
            ram[int(rng.integers(0, n)) * 4096] = rng.integers(0, 256)
        start = 4096 * int(rng.integers(0, n))
        assert check_guests_ram(ram, start, len(ram)).bad == check_guests_ram_loop(ram, start, len(ram))
