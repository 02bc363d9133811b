"""KVM memory listener (kvm-all.c glue) against a small recording fake VM.

The fake only records ioctls and keeps a per-slot "kernel" dirty set; the MMU
semantics (faults, write protection) are the simulated KVM's business and are
checked by tests/property/test_dirty_invariant.py.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from memory import (
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_VGA,
    GLOBAL_DIRTY_MIGRATION,
    TARGET_PAGE_SIZE,
    KVMListenerError,
    MemoryListener,
    MemorySystem,
)
from memory.kvm._listener import DirtyLogMode, KVMMemoryListener, RegionSyncRule, WriteProtectAllHook
from memory.kvm.linux_kvm import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_CAP_X86_WRITE_PROTECT_ALL_MEM,
    KVM_DIRTY_LOG_MANUAL_CAPS,
    KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_MEM_LOG_DIRTY_PAGES,
)

P = TARGET_PAGE_SIZE
LOG = KVM_MEM_LOG_DIRTY_PAGES
WP_CAPS = {KVM_CAP_X86_WRITE_PROTECT_ALL_MEM: 1, KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT: 1}
MANUAL_CAPS = {KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_DIRTY_LOG_MANUAL_CAPS}


class FakeKvm:
    """Records every call into ``log``; ``bits[slot]`` is the kernel bitmap."""

    page_size = P

    def __init__(self, caps=None, log=None, nr_slots=32):
        self.caps = {KVM_CAP_NR_MEMSLOTS: nr_slots, **(caps or {})}
        self.log = [] if log is None else log
        self.regions = {}
        self.bits: dict[int, set[int]] = {}
        self.manual = False
        self.fail: dict[str, OSError] = {}

    def _maybe_fail(self, what):
        if what in self.fail:
            raise self.fail[what]

    def check_extension(self, cap):
        return self.caps.get(cap, 0)

    def enable_cap(self, cap, *args):
        self._maybe_fail("enable_cap")
        self.log.append(("enable_cap", cap, *args))
        if cap == KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2:
            self.manual = True

    def set_user_memory_region(self, r):
        self._maybe_fail("set_user_memory_region")
        self.log.append(("set", r.slot, r.flags, r.guest_phys_addr, r.memory_size))
        if r.memory_size:
            self.regions[r.slot] = r
        else:
            self.regions.pop(r.slot, None)
            self.bits.pop(r.slot, None)

    def get_dirty_log(self, slot, bitmap, flags=0):
        self._maybe_fail("get_dirty_log")
        self.log.append(("get", slot, flags))
        bitmap[:] = 0
        pages = self.bits.get(slot, set())
        for p in pages:
            bitmap[p // 64] |= np.uint64(1 << (p % 64))
        if not self.manual:
            self.bits[slot] = set()

    def clear_dirty_log(self, slot, first_page, num_pages, bitmap):
        self._maybe_fail("clear_dirty_log")
        bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:num_pages]
        pages = [first_page + int(i) for i in np.flatnonzero(bits)]
        self.log.append(("clear", slot, first_page, num_pages, pages))
        self.bits[slot] = self.bits.get(slot, set()) - set(pages)

    def write_protect_all(self, enable):
        self.log.append(("wp", enable))

    def statistics(self):
        return {}

    def dirty(self, slot, *pages):
        self.bits.setdefault(slot, set()).update(pages)


def setup(caps=None, *, nr_slots=32, **kw):
    ms = MemorySystem()
    kvm = FakeKvm(caps, nr_slots=nr_slots)
    kml = KVMMemoryListener(ms, kvm, **kw)
    ms.memory_listener_register(kml, ms.address_space_memory)
    return ms, kvm, kml


def sets(kvm):
    return [e for e in kvm.log if e[0] == "set"]


# ---------------------------------------------------------------------------
# Slots
# ---------------------------------------------------------------------------


def test_ram_becomes_slot_mmio_does_not():
    ms, kvm, kml = setup()
    r = ms.memory_region_init_ram("r", 8 * P)
    io = ms.memory_region_init_io("io", 2 * P)
    with ms.transaction():
        ms.system_memory.add_subregion(0x100000, r)
        ms.system_memory.add_subregion(0x200000, io)
    assert sets(kvm) == [("set", 0, 0, 0x100000, 8 * P)]
    (slot,) = kml.slots
    assert slot.ram_start_offset == r.ram_addr and slot.dirty_bmap is None
    assert np.shares_memory(slot.ram, r.ram_block.host) and slot.ram.ctypes.data == r.ram_block.host_addr
    # an MMIO window punched into RAM splits it; the hole is not mapped
    io2 = ms.memory_region_init_io("io2", P)
    kvm.log.clear()
    ms.system_memory.add_subregion(0x100000 + 2 * P, io2, priority=1)
    assert sets(kvm) == [
        ("set", 0, 0, 0x100000, 0),
        ("set", 0, 0, 0x100000, 2 * P),
        ("set", 1, 0, 0x100000 + 3 * P, 5 * P),
    ]
    assert [s.ram_start_offset - r.ram_addr for s in kml.slots] == [0, 3 * P]


def test_align_section_rounds_start_up_and_size_down():
    ms, kvm, kml = setup()
    r = ms.memory_region_init_ram("r", 8 * P)
    # alias starting half a page into the RAM, mapped at a half-page address
    a = ms.memory_region_init_alias("a", r, P // 2, 2 * P)
    ms.system_memory.add_subregion(P + P // 2, a)
    (slot,) = kml.slots
    # gpa [1.5P, 3.5P) -> [2P, 3P): one page, at region offset P
    assert (slot.start_addr, slot.memory_size) == (2 * P, P)
    assert slot.ram_start_offset == r.ram_addr + P
    tiny = ms.memory_region_init_alias("tiny", r, 0, P // 2)
    kvm.log.clear()
    ms.system_memory.add_subregion(0x100000 + 10, tiny)
    assert sets(kvm) == []


def test_split_at_max_slot_size_and_as_id():
    ms, kvm, kml = setup(max_slot_size=4 * P, as_id=1)
    r = ms.memory_region_init_ram("r", 10 * P)
    ms.system_memory.add_subregion(0, r)
    assert sets(kvm) == [
        ("set", 0 | 1 << 16, 0, 0, 4 * P),
        ("set", 1 | 1 << 16, 0, 4 * P, 4 * P),
        ("set", 2 | 1 << 16, 0, 8 * P, 2 * P),
    ]
    assert kml.lookup_matching_slot(4 * P, 4 * P).slot == 1
    assert kml.lookup_matching_slot(4 * P, 6 * P) is None  # exact (start, size) only
    kvm.log.clear()
    ms.system_memory.del_subregion(r)
    assert [e[1] & 0xFFFF for e in sets(kvm)] == [0, 1, 2] and all(e[4] == 0 for e in sets(kvm))
    assert kml.slots == []


def test_commit_applies_deletions_before_additions():
    ms, kvm, kml = setup()
    a = ms.memory_region_init_ram("a", 4 * P)
    b = ms.memory_region_init_ram("b", 4 * P)
    ms.system_memory.add_subregion(0, a)
    ms.system_memory.add_subregion(16 * P, b)
    kvm.log.clear()
    with ms.transaction():  # swap them: the new a overlaps the old b's slot
        a.set_address(16 * P)
        b.set_address(0)
    sizes = [e[4] for e in sets(kvm)]
    assert sizes == [0, 0, 4 * P, 4 * P]
    # freed ids are reused lowest first
    assert sorted(e[1] for e in sets(kvm)[2:]) == [0, 1]
    assert {(s.start_addr, s.ram_start_offset) for s in kml.slots} == {(0, b.ram_addr), (16 * P, a.ram_addr)}


def test_out_of_slots_is_an_error():
    ms, kvm, kml = setup(nr_slots=2)
    for i in range(2):
        ms.system_memory.add_subregion(i * 0x10000, ms.memory_region_init_ram(f"r{i}", P))
    with pytest.raises(KVMListenerError):
        ms.system_memory.add_subregion(0x100000, ms.memory_region_init_ram("r2", P))


def test_ioctl_errors_propagate_as_oserror_with_evidence():
    ms, kvm, kml = setup()
    kvm.fail["set_user_memory_region"] = OSError(errno.EEXIST, "File exists")
    with pytest.raises(OSError) as ei:
        ms.system_memory.add_subregion(0x3000, ms.memory_region_init_ram("r", P))
    assert ei.value.errno == errno.EEXIST
    assert any("slot=0 gpa=0x3000" in n for n in ei.value.__notes__)
    assert kml.slots == []
    del kvm.fail["set_user_memory_region"]
    r = ms.memory_region_init_ram("q", P)
    ms.system_memory.add_subregion(0x10000, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    kvm.fail["get_dirty_log"] = OSError(errno.ENOENT, "no bitmap")
    ms.memory_global_dirty_log_sync()  # ENOENT is fine
    kvm.fail["get_dirty_log"] = OSError(errno.EFAULT, "Bad address")
    with pytest.raises(OSError) as ei:
        ms.memory_global_dirty_log_sync()
    assert ei.value.errno == errno.EFAULT


# ---------------------------------------------------------------------------
# Logging flags, harvesting, merging into clients
# ---------------------------------------------------------------------------


def test_log_start_stop_reissue_flags_only_on_first_and_last_client():
    ms, kvm, kml = setup()
    v = ms.memory_region_init_ram("vram", 4 * P)
    ms.system_memory.add_subregion(0, v)
    kvm.log.clear()
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    assert sets(kvm) == [("set", 0, LOG, 0, 4 * P)]
    assert kml.slots[0].dirty_bmap is not None and len(kml.slots[0].dirty_bmap) == 1
    kvm.log.clear()
    v.set_log(True)  # old mask MIG != 0: nothing to do
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)  # new mask VGA != 0
    assert sets(kvm) == []
    v.set_log(False)
    assert sets(kvm) == [("set", 0, 0, 0, 4 * P)]


def test_sync_merges_into_every_active_client_at_ram_addr():
    ms, kvm, kml = setup()
    filler = ms.memory_region_init_ram("filler", 64 * P)
    r = ms.memory_region_init_ram("r", 16 * P)
    # the slot starts 3 pages into the block: unaligned ram_addr (general path)
    a = ms.memory_region_init_alias("a", r, 3 * P, 8 * P)
    ms.system_memory.add_subregion(0x100000, filler)
    ms.system_memory.add_subregion(0, a)
    dm = ms.dirty_memory
    for c in (0, 1, 2):
        dm.xchg_words(c, 0, dm.nwords)
    a_slot = kml.lookup_matching_slot(0, 8 * P)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    kvm.dirty(a_slot.id, 0, 5)
    ms.memory_global_dirty_log_sync()
    base = r.ram_addr // P + 3
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, dm.npages), [base, base + 5])
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_VGA, 0, dm.npages), [base, base + 5])
    assert dm.count(1) == 0  # CODE: no TCG
    assert kml.statistics().last_sync_pages == 2
    # tracking off: a display fetch still feeds VGA but not MIGRATION
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)
    a.set_log(True)  # aliases cannot log; the target region does
    r.set_log(True)
    dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, dm.nwords)
    kvm.dirty(a_slot.id, 7)
    ms.memory_region_sync_dirty_bitmap(r)
    assert dm.get_dirty(DIRTY_MEMORY_VGA, base + 7, 1)
    assert dm.count(DIRTY_MEMORY_MIGRATION) == 0


def test_vga_snapshot_never_steals_migration_bits():
    ms, kvm, kml = setup()
    v = ms.memory_region_init_ram("vram", 4 * P)
    ms.system_memory.add_subregion(0, v)
    v.set_log(True)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    dm = ms.dirty_memory
    dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, dm.nwords)
    dm.xchg_words(DIRTY_MEMORY_VGA, 0, dm.nwords)  # new RAM starts dirty
    kvm.dirty(0, 1, 2)
    snap = ms.memory_region_snapshot_and_clear_dirty(v, 0, 4 * P, DIRTY_MEMORY_VGA)
    assert [ms.memory_region_snapshot_get_dirty(v, snap, i * P, P) for i in range(4)] == [False, True, True, False]
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 4), [1, 2])


def test_deleting_logged_slot_harvests_first():
    ms, kvm, kml = setup()
    r = ms.memory_region_init_ram("r", 8 * P)
    ms.system_memory.add_subregion(0x40000, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    dm = ms.dirty_memory
    dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, dm.nwords)
    kvm.dirty(0, 6)
    kvm.log.clear()
    r.set_address(0x80000)  # move: delete (harvest) then add
    assert [e[0] for e in kvm.log] == ["get", "set", "set"]
    assert kvm.log[0] == ("get", 0, 0)  # protecting fetch
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 8), [6])
    assert kml.statistics().harvests == 1


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caps", "kw", "mode"),
    [
        ({}, {}, DirtyLogMode.LEGACY),
        (MANUAL_CAPS, {}, DirtyLogMode.MANUAL_PROTECT),
        ({**WP_CAPS, **MANUAL_CAPS}, {}, DirtyLogMode.WRITE_PROTECT_ALL),
        ({**WP_CAPS, **MANUAL_CAPS}, {"manual_protect": True}, DirtyLogMode.MANUAL_PROTECT),
        ({**WP_CAPS, **MANUAL_CAPS}, {"write_protect_all": False}, DirtyLogMode.MANUAL_PROTECT),
        ({**WP_CAPS, **MANUAL_CAPS}, {"write_protect_all": False, "manual_protect": False}, DirtyLogMode.LEGACY),
        ({KVM_CAP_X86_WRITE_PROTECT_ALL_MEM: 1}, {}, DirtyLogMode.LEGACY),  # needs both caps
    ],
)
def test_mode_selection(caps, kw, mode):
    ms, kvm, kml = setup(caps, **kw)
    assert kml.mode is mode
    enabled = [e for e in kvm.log if e[0] == "enable_cap"]
    if mode is DirtyLogMode.MANUAL_PROTECT:
        assert enabled == [("enable_cap", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_CAPS)]
    else:
        assert enabled == []
    assert (ms._write_protect_all_fn is not None) == (mode is DirtyLogMode.WRITE_PROTECT_ALL)


def test_mode_errors_and_fallback():
    with pytest.raises(KVMListenerError):
        setup({}, write_protect_all=True)
    with pytest.raises(KVMListenerError):
        setup({}, manual_protect=True)
    with pytest.raises(KVMListenerError):
        setup({**WP_CAPS, **MANUAL_CAPS}, write_protect_all=True, manual_protect=True)
    ms, kvm = MemorySystem(), FakeKvm(MANUAL_CAPS)
    kvm.fail["enable_cap"] = OSError(errno.EINVAL, "no")
    assert KVMMemoryListener(ms, kvm).mode is DirtyLogMode.LEGACY  # QEMU falls back
    with pytest.raises(OSError):
        KVMMemoryListener(ms, kvm, manual_protect=True)


def test_write_protect_all_global_sync_protects_after_last_fetch():
    log = []

    class Other(MemoryListener):
        """A second logging listener (e.g. vhost) that syncs after KVM."""

        priority = 20

        def log_sync(self, section):
            log.append(("other-sync", section.offset_within_address_space))

    ms = MemorySystem()
    kvm = FakeKvm(WP_CAPS, log=log)
    kml = KVMMemoryListener(ms, kvm, max_slot_size=4 * P)
    ms.memory_listener_register(kml, ms.address_space_memory)
    ms.memory_listener_register(Other(), ms.address_space_memory)
    r = ms.memory_region_init_ram("r", 8 * P)
    ms.system_memory.add_subregion(0, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    kvm.dirty(0, 1)
    log.clear()
    ms.memory_global_dirty_log_sync()
    W = KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT
    assert log == [("get", 0, W), ("get", 1, W), ("other-sync", 0), ("wp", True)]
    st = kml.statistics()
    assert st.write_protect_all_calls == 1 and st.last_sync_pages == 1 and st.global_syncs == 1
    log.clear()
    ms.memory_global_dirty_log_sync()  # every unprotected GET is followed by one WP-all
    assert log[-1] == ("wp", True)


def test_write_protect_all_off_only_when_no_slot_logs():
    ms, kvm, kml = setup(WP_CAPS)
    v = ms.memory_region_init_ram("vram", 4 * P)
    r = ms.memory_region_init_ram("r", 4 * P)
    ms.system_memory.add_subregion(0, v)
    ms.system_memory.add_subregion(0x10000, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    v.set_log(True)
    kvm.log.clear()
    v.set_log(False)  # mid-migration: everything still logs
    ms.memory_global_dirty_log_sync()
    v.set_log(True)
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)  # vram still logs VGA
    assert ("wp", False) not in kvm.log
    kvm.log.clear()
    v.set_log(False)  # the last logging slot stops: deferred to commit, after the flags
    assert kvm.log == [("set", 0, 0, 0, 4 * P), ("wp", False)]
    assert kml.statistics().write_protect_off_calls == 1


@pytest.mark.parametrize(
    ("rule", "flags", "wp_after"),
    [
        (RegionSyncRule.PROTECTING_FETCH, 0, False),
        (RegionSyncRule.WRITE_PROTECT_ALL, KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT, True),
        (RegionSyncRule.NAIVE, KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT, False),
    ],
)
def test_per_region_sync_rules(rule, flags, wp_after):
    ms, kvm, kml = setup(WP_CAPS, region_sync_rule=rule)
    v = ms.memory_region_init_ram("vram", 4 * P)
    other = ms.memory_region_init_ram("other", 4 * P)
    ms.system_memory.add_subregion(0, v)
    ms.system_memory.add_subregion(0x10000, other)
    v.set_log(True)
    kvm.dirty(0, 2)
    kvm.log.clear()
    ms.memory_region_snapshot_and_clear_dirty(v, 0, 4 * P, DIRTY_MEMORY_VGA)
    expected = [("get", 0, flags)] + ([("wp", True)] if wp_after else [])
    assert kvm.log == expected  # only vram's slot; no global write-protect unless the rule says so
    assert kml.statistics().region_syncs == 1


def test_manual_protect_clears_only_fetched_bits_in_range():
    ms, kvm, kml = setup(MANUAL_CAPS)
    r = ms.memory_region_init_ram("r", 200 * P)
    ms.system_memory.add_subregion(0, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    kvm.dirty(0, 10, 70, 100, 130, 199)
    ms.memory_global_dirty_log_sync()
    kvm.dirty(0, 71)  # set after our GET: never fetched, must survive
    kvm.log.clear()
    # [66, 110): start aligned down to 64, padding 64..65 masked, end at 128
    ms.memory_region_clear_dirty_bitmap(r, 66 * P, 44 * P)
    assert kvm.log == [("clear", 0, 64, 64, [70, 100])]
    assert kvm.bits[0] == {10, 71, 130, 199}
    ms.memory_region_clear_dirty_bitmap(r, 66 * P, 44 * P)  # already cleared from dirty_bmap
    assert len(kvm.log) == 1
    # the last chunk may end at the slot end (not 64-aligned)
    ms.memory_region_clear_dirty_bitmap(r, 128 * P, 72 * P)
    assert kvm.log[-1] == ("clear", 0, 128, 72, [130, 199])
    st = kml.statistics()
    assert st.clear_dirty_log_calls == 2 and st.pages_cleared == 4
    # legacy: log_clear is a no-op
    ms2, kvm2, _ = setup({})
    r2 = ms2.memory_region_init_ram("r", 64 * P)
    ms2.system_memory.add_subregion(0, r2)
    ms2.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    ms2.memory_global_dirty_log_sync()
    ms2.memory_region_clear_dirty_bitmap(r2, 0, 64 * P)
    assert [e for e in kvm2.log if e[0] == "clear"] == []


class FakeRingKvm(FakeKvm):
    def __init__(self):
        super().__init__()
        self.ring: list[tuple[int, int]] = []
        self.resets = 0

    def get_dirty_log(self, slot, bitmap, flags=0):
        raise OSError(errno.ENXIO, "ring VM has no bitmap")

    def reap_dirty_rings(self):
        self.log.append(("reap", len(self.ring)))
        slots = np.array([s for s, _ in self.ring], dtype=np.uint32)
        offs = np.array([o for _, o in self.ring], dtype=np.uint64)
        n = len(self.ring)
        self.ring = []
        return slots, offs, n


def test_dirty_ring_uses_log_sync_global():
    ms = MemorySystem()
    kvm = FakeRingKvm()
    kml = KVMMemoryListener(ms, kvm, dirty_ring=True, max_slot_size=4 * P)
    ms.memory_listener_register(kml, ms.address_space_memory)
    r = ms.memory_region_init_ram("r", 8 * P)
    ms.system_memory.add_subregion(0, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    dm = ms.dirty_memory
    dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, dm.nwords)
    kvm.ring = [(1, 0), (0, 3), (1, 0), (7, 1)]  # slot 7 is not ours: ignored
    ms.memory_global_dirty_log_sync()
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 8), [3, 4])
    assert all(not s.dirty_bmap.any() for s in kml.slots)
    # deleting harvests through the ring too
    kvm.ring = [(0, 1)]
    ms.system_memory.del_subregion(r)
    assert dm.get_dirty(DIRTY_MEMORY_MIGRATION, 1, 1)
    assert kml.mode is DirtyLogMode.DIRTY_RING


def _two_address_spaces(kvm, *, second_has_ram: bool):
    """KVM's as 0 (system memory) and as 1 (an SMRAM-like space), one listener each,
    both in write-protect-all mode on the same VM: QEMU's kvm_init registers the
    write-protect-all function once per VM, not once per listener."""
    ms = MemorySystem()
    smm_root = ms.memory_region_init("smm-root", 1 << 32)
    smm_as = ms.address_space_init(smm_root, "smm")
    kml0 = KVMMemoryListener(ms, kvm, as_id=0)
    ms.memory_listener_register(kml0, ms.address_space_memory)
    kml1 = KVMMemoryListener(ms, kvm, as_id=1, name="kvm-smram")
    ms.memory_listener_register(kml1, smm_as)
    r = ms.memory_region_init_ram("r", 4 * P)
    ms.system_memory.add_subregion(0, r)
    if second_has_ram:
        s = ms.memory_region_init_ram("smram", 4 * P)
        smm_root.add_subregion(0xA0000, s)
    return ms, kml0, kml1, r


@pytest.mark.parametrize("second_has_ram", [False, True])
def test_write_protect_all_is_per_vm_not_per_listener(second_has_ram):
    """The write-protect-all hook must run after the last fetch of EVERY listener
    and must fire when ANY of them fetched without protection - here the as-1
    listener registered last (its hook would replace as 0's) and fetched nothing."""
    log = []
    kvm = FakeKvm(WP_CAPS, log=log)
    ms, kml0, kml1, _ = _two_address_spaces(kvm, second_has_ram=second_has_ram)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    assert ms._write_protect_all_fn is kml0._wp_hook is kml1._wp_hook
    W = KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT

    def sync_log():
        kvm.dirty(0, 2)
        log.clear()
        ms.memory_global_dirty_log_sync()
        gets = [e for e in log if e[0] == "get"]
        assert gets[0] == ("get", 0, W) and all(e[2] == W for e in gets)
        return list(log)

    # the broken variant: one hook per listener, the last registered (as 1) wins
    shared = ms._write_protect_all_fn
    per_listener = WriteProtectAllHook(kvm)
    per_listener.listeners.append(kml1)
    ms.memory_register_write_protect_all(per_listener)
    out = sync_log()
    if second_has_ram:
        assert out[-1] == ("wp", True)  # saved by as 1 having fetched something too
    else:
        assert ("wp", True) not in out  # as 0's page 2 left writable and unlogged
    kml0._wp_pending = kml1._wp_pending = False
    ms.memory_register_write_protect_all(shared)
    out = sync_log()
    assert out[-1] == ("wp", True) and out.count(("wp", True)) == 1  # once, after every fetch
    # the stopping side is per VM too: off only when no slot of ANY listener logs
    log.clear()
    kml1.unregister()
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)
    assert log.count(("wp", False)) == 1 and ms._write_protect_all_fn is not None
    kml0.unregister()
    assert ms._write_protect_all_fn is None


def test_write_protect_all_off_waits_for_every_listener_of_the_vm():
    log = []
    kvm = FakeKvm(WP_CAPS, log=log)
    ms, _, kml1, _ = _two_address_spaces(kvm, second_has_ram=True)
    smram = kml1.address_space.root.subregions[0]
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    smram.set_log(True)  # a (hypothetical) display on SMRAM keeps as 1 logging
    log.clear()
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)  # as 0 stops logging
    assert ("wp", False) not in log  # as 1's slot still relies on the lazy protection
    smram.set_log(False)
    assert log[-1] == ("wp", False)


def test_dirty_ring_reap_marks_exactly_the_harvested_pages():
    """The vectorised reap (one OR per word of entries, O(entries)) against a
    per-entry reference: unsorted entries, repeats, several slots, entries past
    a slot's end or for a slot that is not ours are dropped."""
    ms = MemorySystem()
    kvm = FakeRingKvm()
    kml = KVMMemoryListener(ms, kvm, dirty_ring=True, max_slot_size=200 * P)
    ms.memory_listener_register(kml, ms.address_space_memory)
    r = ms.memory_region_init_ram("r", 500 * P)  # slots of 200, 200, 100 pages
    ms.system_memory.add_subregion(0, r)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    dm = ms.dirty_memory
    dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, dm.nwords)
    rng = np.random.default_rng(1)
    kvm.ring = [(int(s), int(o)) for s, o in zip(rng.integers(0, 4, 3000), rng.integers(0, 210, 3000))]
    expect = sorted({s * 200 + o for s, o in kvm.ring if s < 3 and o < (200, 200, 100)[s]})
    ms.memory_global_dirty_log_sync()
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 500), expect)
