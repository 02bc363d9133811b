"""RealKVM at the ioctl level: capability probing, errors, manual-protect and
dirty-ring semantics, driven by the ``pages`` guest (deterministic writes)."""

from __future__ import annotations

import errno
import fcntl
import struct

import numpy as np
import pytest

from memory import RAMBlock
from memory.kvm import UserMemoryRegion
from memory.kvm import linux_kvm as K
from memory.kvm.real import RealKVM, kvm_usable
from memory.kvm.real.vcpu import GuestPageWriter

pytestmark = pytest.mark.kvm
LOW = 1 << 20
SLOT = 1
NPAGES = 1024  # test slot: 4 MiB at GPA 1 MiB
BASE_GFN = LOW >> 12


class Rig:
    def __init__(self, *, manual: bool = False, ring: int = 0) -> None:
        self.ram = RAMBlock("rig", LOW + NPAGES * 4096)
        self.vm = RealKVM()
        if manual:
            self.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
        if ring:
            self.vm.enable_dirty_ring(ring)
        self.vm.set_user_memory_region(UserMemoryRegion(0, 0, 0, LOW, self.ram.host[:LOW]))
        self.vm.set_user_memory_region(
            UserMemoryRegion(SLOT, K.KVM_MEM_LOG_DIRTY_PAGES, LOW, NPAGES * 4096, self.ram.host[LOW:]))
        self.writer = GuestPageWriter(self.vm, self.ram.host[:LOW])
        self.bitmap = np.zeros(NPAGES // 64, np.uint64)

    def write(self, pages) -> None:
        self.writer.write(np.asarray(pages, np.uint64) + BASE_GFN)

    def get(self) -> list[int]:
        self.vm.get_dirty_log(SLOT, self.bitmap)
        return np.flatnonzero(np.unpackbits(self.bitmap.view(np.uint8), bitorder="little")).tolist()

    def clear(self, pages, first=0, num=NPAGES) -> None:
        bm = np.zeros((num + 63) // 64, np.uint64)
        for p in pages:
            bm[(p - first) // 64] |= np.uint64(1 << ((p - first) % 64))
        self.vm.clear_dirty_log(SLOT, first, num, bm)

    def close(self) -> None:
        self.vm.close()
        self.ram.close()


@pytest.fixture
def rig(require_kvm):
    r = Rig()
    yield r
    r.close()


@pytest.fixture
def manual_rig(require_kvm):
    r = Rig(manual=True)
    yield r
    r.close()


def test_kvm_usable_reports_ok(require_kvm):
    assert kvm_usable() == (True, "")


def test_write_protect_all_is_absent(rig):
    assert rig.vm.check_extension(K.KVM_CAP_X86_WRITE_PROTECT_ALL_MEM) == 0
    assert rig.vm.check_extension(K.KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT) == 0
    with pytest.raises(OSError) as ei:
        rig.vm.write_protect_all(True)
    assert ei.value.errno == errno.ENOTTY
    rig.write([1])  # the VM still works
    assert rig.get() == [1]


def test_get_dirty_log_flags_are_refused_because_the_kernel_ignores_them(rig):
    rig.write([5])
    with pytest.raises(OSError) as ei:
        rig.vm.get_dirty_log(SLOT, rig.bitmap, K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT)
    assert ei.value.errno == errno.EINVAL
    # Evidence for the guard: the raw ioctl accepts padding1=1 and still
    # write-protects (the next write to page 5 is logged again).
    fcntl.ioctl(rig.vm.fd, K.KVM_GET_DIRTY_LOG, struct.pack("<IIQ", SLOT, 1, rig.bitmap.ctypes.data))
    assert np.flatnonzero(np.unpackbits(rig.bitmap.view(np.uint8), bitorder="little")).tolist() == [5]
    rig.write([5])
    assert rig.get() == [5]


def test_classic_get_fetches_and_reprotects(rig):
    rig.get()  # drop first-touch noise
    rig.write([0, 63, 64, 1023])
    assert rig.get() == [0, 63, 64, 1023]
    assert rig.get() == []  # the GET cleared them
    rig.write([63])  # write-protected again: faults, logged again
    assert rig.get() == [63]
    assert rig.ram.pages[63 + BASE_GFN, 0] == 2


def test_memslot_errors(rig):
    vm = rig.vm
    host = rig.ram.host[LOW:]
    with pytest.raises(OSError) as ei:  # overlaps slot 1
        vm.set_user_memory_region(UserMemoryRegion(2, 0, LOW, 4096 * 16, host))
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(OSError) as ei:  # not page aligned
        vm.set_user_memory_region(UserMemoryRegion(2, 0, 0x10000000 + 1, 4096, host))
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        vm.get_dirty_log(7, rig.bitmap)
    assert ei.value.errno == errno.ENOENT
    with pytest.raises(OSError) as ei:  # the kernel would write past a short bitmap
        vm.get_dirty_log(SLOT, np.zeros(2, np.uint64))
    assert ei.value.errno == errno.EFAULT
    vm.set_user_memory_region(UserMemoryRegion(SLOT, 0, LOW, 0))  # delete
    with pytest.raises(OSError) as ei:
        vm.get_dirty_log(SLOT, rig.bitmap)
    assert ei.value.errno == errno.ENOENT


def test_manual_protect_get_does_not_clear_clear_reprotects_only_its_bits(manual_rig):
    r = manual_rig
    r.write([1, 2, 100])
    assert r.get() == [1, 2, 100]
    assert r.get() == [1, 2, 100]  # GET neither clears nor protects
    r.clear([1, 2], first=0, num=64)  # CLEAR a 64-page range: only bits 1 and 2
    assert r.get() == [100]
    r.write([1])  # re-protected by the CLEAR: faults, logged
    assert r.get() == [1, 100]


def test_manual_protect_write_between_get_and_clear(manual_rig):
    """kvm.md semantics 5: a write between GET and CLEAR to a page already
    dirty (so writable) takes no fault; the CLEAR then drops the bit and the
    write is never reported - hence 'copy after CLEAR'.  A page that was
    clean at GET time faults and keeps its new bit if only fetched bits are
    cleared; an all-ones CLEAR loses it."""
    r = manual_rig
    r.write([10])
    assert r.get() == [10]
    r.write([10, 20])  # 10: writable, no fault; 20: clean, faults
    r.clear([10])  # clear exactly what we fetched
    assert r.get() == [20]  # page 10's second write is not reported: copy after CLEAR
    r.clear([20])
    # broken variant: all-ones CLEAR after GET drops a write that came in between
    r.write([30])
    assert r.get() == [30]
    r.write([40])
    r.clear(range(NPAGES))
    assert r.get() == []  # page 40 was written and is lost
    assert r.ram.pages[40 + BASE_GFN, 0] == 1


def test_clear_alignment_rules(manual_rig):
    r = manual_rig
    with pytest.raises(OSError) as ei:
        r.clear([1], first=1, num=64)
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(OSError) as ei:
        r.clear([1], first=0, num=10)  # not a multiple of 64 and not the slot end
    assert ei.value.errno == errno.EINVAL
    r.clear([NPAGES - 1], first=NPAGES - 64, num=64)  # ends at the slot end: fine


def test_dirty_ring_harvest_reset_semantics(require_kvm):
    with pytest.raises(OSError) as ei:
        with RealKVM() as vm:
            vm.enable_dirty_ring(1000)  # not a power of two
    assert ei.value.errno == errno.EINVAL
    r = Rig(ring=4096)
    try:
        with pytest.raises(OSError) as ei:
            r.vm.get_dirty_log(SLOT, r.bitmap)
        assert ei.value.errno == errno.ENXIO  # no bitmap on a ring VM
        with pytest.raises(OSError) as ei:
            r.vm.enable_dirty_ring(4096)  # after KVM_CREATE_VCPU
        assert ei.value.errno == errno.EINVAL
        r.vm.reap_dirty_rings()
        r.write([7, 3, 900])
        slots, offsets = r.vm.harvest_dirty_rings()
        assert offsets.tolist() == [7, 3, 900] and set(slots.tolist()) == {SLOT}  # fault order
        r.write([7])  # still writable until the reset: no new entry
        assert r.vm.reset_dirty_rings() == 3
        assert len(r.vm.harvest_dirty_rings()[1]) == 0
        r.write([7])  # re-protected by the reset
        assert r.vm.reap_dirty_rings()[1].tolist() == [7]
        st = r.vm.statistics()
        assert st["harvest_entries"] >= 4 and st["reset_entries"] >= 4 and st["harvest_ns"] > 0
    finally:
        r.close()


def test_ring_full_exit_then_reap_lets_the_guest_finish(require_kvm):
    r = Rig(ring=256)  # 256 - 64 reserved: RING_FULL after ~192 entries
    try:
        r.vm.reap_dirty_rings()
        pages = np.arange(0, 1000, 1)
        r.write(pages)  # GuestPageWriter reaps into the stash on RING_FULL
        assert r.writer.exits[K.KVM_EXIT_DIRTY_RING_FULL] >= 3
        slots, offsets, _ = r.vm.reap_dirty_rings()
        assert sorted(set(offsets.tolist())) == pages.tolist()
    finally:
        r.close()


def test_statistics_have_kernel_and_own_counters(rig):
    rig.get()
    rig.write(range(0, 64))
    rig.get()
    st = rig.vm.statistics()
    for key in ("pf_fixed", "exits", "fetch_ns", "fetch_calls", "fetch_dirty_pages", "kvm_vm.pages_4k"):
        assert key in st, key
    assert st["pf_fixed"] >= 64 and st["fetch_calls"] == 2 and st["fetch_dirty_pages"] >= 64
