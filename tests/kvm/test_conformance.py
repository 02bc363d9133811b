"""One KvmVM conformance suite over both backends: the simulated KVM
(``SimKVM(pml=False)``, always) and real KVM (``RealKVM``, skipped where
/dev/kvm is unusable).  Only behaviour both must share is tested here.

Guest writes: ``SimKVM.vcpu_write(gfns)`` runs the simulated fault path and
the test then stores into the pages; on real KVM the ``pages`` guest program
stores to the listed pages through the real MMU (GuestPageWriter).  Slot 0
holds the low 1 MiB (the real guest's code and page tables) on both.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from memory import RAMBlock
from memory.kvm import KvmStatistics, UserMemoryRegion
from memory.kvm import linux_kvm as K

LOW = 1 << 20
LOG = K.KVM_MEM_LOG_DIRTY_PAGES


class _Backend:
    name = ""

    def __init__(self) -> None:
        self.blocks: list[RAMBlock] = []
        self.low = RAMBlock("low", LOW)
        self.blocks.append(self.low)

    def block(self, npages: int) -> RAMBlock:
        b = RAMBlock(f"b{len(self.blocks)}", npages * 4096)
        self.blocks.append(b)
        return b

    def add_slot(self, slot: int, gpa: int, npages: int, flags: int = LOG) -> RAMBlock:
        b = self.block(npages)
        self.vm.set_user_memory_region(UserMemoryRegion(slot, flags, gpa, npages * 4096, b.host))
        return b

    def get(self, slot: int, npages: int) -> list[int]:
        bm = np.zeros((npages + 63) // 64, np.uint64)
        self.vm.get_dirty_log(slot, bm)
        return np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")).tolist()

    def clear(self, slot: int, pages, first: int = 0, num: int = 64) -> None:
        bm = np.zeros((num + 63) // 64, np.uint64)
        for p in pages:
            bm[(p - first) // 64] |= np.uint64(1 << ((p - first) % 64))
        self.vm.clear_dirty_log(slot, first, num, bm)

    def close(self) -> None:
        for b in self.blocks:
            b.close()


class SimBackend(_Backend):
    name = "sim"

    def __init__(self) -> None:
        super().__init__()
        from memory.kvm.sim.simulated import SimKVM

        self.vm = SimKVM(pml=False)
        self.vm.set_user_memory_region(UserMemoryRegion(0, 0, 0, LOW, self.low.host))

    def write(self, gfns) -> None:
        gfns = np.asarray(gfns, np.int64)
        self.vm.vcpu_write(gfns)
        for pages, idx, _pos in self.vm.host_pages_for(gfns):
            np.add.at(pages[:, 0], idx, 1)  # the guest's store (inc byte 0)

    def close(self) -> None:
        super().close()


class RealBackend(_Backend):
    name = "real"

    def __init__(self) -> None:
        super().__init__()
        from memory.kvm.real import RealKVM
        from memory.kvm.real.vcpu import GuestPageWriter

        self.vm = RealKVM()
        self.vm.set_user_memory_region(UserMemoryRegion(0, 0, 0, LOW, self.low.host))
        self.writer = GuestPageWriter(self.vm, self.low.host)

    def write(self, gfns) -> None:
        self.writer.write(gfns)

    def close(self) -> None:
        self.vm.close()
        super().close()


@pytest.fixture(params=["sim", "real"])
def kvm(request):
    if request.param == "real":
        from memory.kvm.real import kvm_usable

        ok, reason = kvm_usable()
        if not ok:
            pytest.skip(f"real KVM unusable here: {reason}")
        b = RealBackend()
    else:
        b = SimBackend()
    yield b
    b.close()


def _errno(fn) -> int:
    with pytest.raises(OSError) as ei:
        fn()
    return ei.value.errno


# ---------------------------------------------------------------- memslots
def test_slot_create_delete(kvm):
    kvm.add_slot(1, 0x200000, 64)
    assert kvm.get(1, 64) == []
    kvm.vm.set_user_memory_region(UserMemoryRegion(1, 0, 0x200000, 0))
    assert _errno(lambda: kvm.get(1, 64)) == errno.ENOENT


def test_slot_errors(kvm):
    kvm.add_slot(1, 0x200000, 64)
    other = kvm.block(64)
    assert _errno(lambda: kvm.vm.set_user_memory_region(
        UserMemoryRegion(2, LOG, 0x200000 + 0x1000, 0x4000, other.host))) == errno.EEXIST
    assert _errno(lambda: kvm.vm.set_user_memory_region(
        UserMemoryRegion(2, LOG, 0x400000 + 0x800, 0x4000, other.host))) == errno.EINVAL
    assert _errno(lambda: kvm.vm.set_user_memory_region(
        UserMemoryRegion(2, LOG, 0x400000, 0x4000 + 1, other.host))) == errno.EINVAL
    assert _errno(lambda: kvm.vm.set_user_memory_region(
        UserMemoryRegion(2, 1 << 7, 0x400000, 0x4000, other.host))) == errno.EINVAL  # unknown flag
    assert _errno(lambda: kvm.get(9, 64)) == errno.ENOENT
    assert _errno(lambda: kvm.vm.get_dirty_log(1, np.zeros(0, np.uint64))) == errno.EFAULT


def test_unlogged_slot_has_no_dirty_log(kvm):
    kvm.add_slot(1, 0x200000, 64, flags=0)
    assert _errno(lambda: kvm.get(1, 64)) == errno.ENOENT
    kvm.vm.set_user_memory_region(UserMemoryRegion(1, LOG, 0x200000, 64 * 4096, kvm.blocks[-1].host))
    assert kvm.get(1, 64) == []  # logging switched on by a flags change


# ---------------------------------------------------------------- classic dirty log
def test_dirty_log_reports_written_pages_and_reprotects(kvm):
    b = kvm.add_slot(1, 0x200000, 200)
    base = 0x200000 >> 12
    kvm.get(1, 200)
    kvm.write([base + 0, base + 63, base + 64, base + 199])
    assert kvm.get(1, 200) == [0, 63, 64, 199]
    assert kvm.get(1, 200) == []
    kvm.write([base + 63, base + 63])
    assert kvm.get(1, 200) == [63]
    assert b.pages[63, 0] == 3 and b.pages[0, 0] == 1  # the stores landed in the slot's memory


def test_two_slots_are_logged_separately(kvm):
    kvm.add_slot(1, 0x200000, 64)
    kvm.add_slot(2, 0x800000, 128)
    kvm.write([(0x200000 >> 12) + 5, (0x800000 >> 12) + 100])
    assert kvm.get(1, 64) == [5]
    assert kvm.get(2, 128) == [100]


# ---------------------------------------------------------------- manual protect
def test_manual_protect_get_and_clear(kvm):
    kvm.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    kvm.add_slot(1, 0x200000, 128)
    base = 0x200000 >> 12
    kvm.write([base + 1, base + 2, base + 70])
    assert kvm.get(1, 128) == [1, 2, 70]
    assert kvm.get(1, 128) == [1, 2, 70]  # GET does not clear
    kvm.clear(1, [1], first=0, num=64)
    assert kvm.get(1, 128) == [2, 70]
    kvm.write([base + 1])  # the CLEAR re-protected page 1
    assert kvm.get(1, 128) == [1, 2, 70]
    kvm.clear(1, [70], first=64, num=64)
    assert kvm.get(1, 128) == [1, 2]


def test_manual_protect_copy_after_clear_rule(kvm):
    """A write between GET and CLEAR to an already-dirty (writable) page is not
    logged again, so the CLEAR drops it (copy pages after CLEAR); a write to a
    clean page faults and survives a CLEAR of the fetched bits only."""
    kvm.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    kvm.add_slot(1, 0x200000, 64)
    base = 0x200000 >> 12
    kvm.write([base + 10])
    assert kvm.get(1, 64) == [10]
    kvm.write([base + 10, base + 20])
    kvm.clear(1, [10])
    assert kvm.get(1, 64) == [20]


def test_clear_alignment(kvm):
    kvm.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    kvm.add_slot(1, 0x200000, 100)
    assert _errno(lambda: kvm.clear(1, [1], first=1, num=64)) == errno.EINVAL
    assert _errno(lambda: kvm.clear(1, [1], first=0, num=10)) == errno.EINVAL
    assert _errno(lambda: kvm.clear(1, [99], first=64, num=64)) == errno.EINVAL  # past the slot end
    kvm.clear(1, [99], first=64, num=36)  # up to the slot end: allowed


# ---------------------------------------------------------------- misc
def test_write_protect_all_and_caps_agree_with_each_other(kvm):
    wp = kvm.vm.check_extension(K.KVM_CAP_X86_WRITE_PROTECT_ALL_MEM)
    if not wp:
        assert _errno(lambda: kvm.vm.write_protect_all(True)) == errno.ENOTTY
    else:
        kvm.vm.write_protect_all(True)
    assert kvm.vm.check_extension(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE


def test_statistics_exist(kvm):
    kvm.add_slot(1, 0x200000, 64)
    kvm.write([(0x200000 >> 12) + 1])
    kvm.get(1, 64)
    st = kvm.vm.statistics()
    assert isinstance(st, KvmStatistics) and st  # a frozen record read as a mapping
    assert all(isinstance(v, int) for v in st.values())
    assert kvm.vm.page_size == 4096
