"""QEMU's memory API: dirty-memory clients, flat views, transactions, listeners."""

from __future__ import annotations

import numpy as np
import pytest

from memory import (
    DIRTY_MEMORY_CODE,
    DIRTY_MEMORY_MIGRATION,
    DIRTY_MEMORY_VGA,
    GLOBAL_DIRTY_DIRTY_RATE,
    GLOBAL_DIRTY_MIGRATION,
    TARGET_PAGE_SIZE,
    DirtyMemory,
    MemoryListener,
    MemoryRegionError,
    MemorySystem,
)

P = TARGET_PAGE_SIZE
VGA, MIG = 1 << DIRTY_MEMORY_VGA, 1 << DIRTY_MEMORY_MIGRATION


# ---------------------------------------------------------------------------
# Dirty-memory clients
# ---------------------------------------------------------------------------


def _bits(dm: DirtyMemory, client: int) -> np.ndarray:
    """Reference view: one bool per page."""
    b = np.unpackbits(dm.bitmap(client).view(np.uint8), bitorder="little").astype(bool)
    return b[: dm.npages]


def _words_from_pages(pages: np.ndarray, npages: int) -> np.ndarray:
    bits = np.zeros((npages + 63) // 64 * 64, dtype=np.uint8)
    bits[pages] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


@pytest.mark.parametrize("start_page", [0, 64, 1, 37, 63, 130])
def test_set_dirty_lebitmap_matches_per_page_reference(start_page):
    rng = np.random.default_rng(start_page)
    dm = DirtyMemory(1024 * P)
    npages = 200
    pages = np.unique(rng.integers(0, npages, 60))
    words = _words_from_pages(pages, npages)
    words[-1] |= np.uint64(1 << 63)  # garbage beyond npages must be ignored
    count = dm.set_dirty_lebitmap(words, start_page, npages, VGA | MIG)
    assert count == len(pages)
    expected = np.zeros(dm.npages, dtype=bool)
    expected[pages + start_page] = True
    np.testing.assert_array_equal(_bits(dm, DIRTY_MEMORY_VGA), expected)
    np.testing.assert_array_equal(_bits(dm, DIRTY_MEMORY_MIGRATION), expected)
    assert dm.count(DIRTY_MEMORY_CODE) == 0


def test_set_dirty_lebitmap_ors_never_clears():
    dm = DirtyMemory(256 * P)
    dm.set_dirty_range(10, 5, MIG)
    dm.set_dirty_lebitmap(_words_from_pages(np.array([3]), 64), 0, 64, MIG)
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 256), [3, 10, 11, 12, 13, 14])


def test_range_ops_and_snapshot_widening():
    dm = DirtyMemory(256 * P)
    dm.set_dirty_range(60, 10, VGA | MIG)  # pages 60..69, across a word boundary
    dm.set_dirty_range(130, 1, VGA)
    assert dm.get_dirty(DIRTY_MEMORY_VGA, 69, 1)
    assert not dm.get_dirty(DIRTY_MEMORY_VGA, 70, 50)
    # snapshot of [65, 66) is widened to the word [64, 128): it takes 64..69 ...
    snap = dm.snapshot_and_clear(DIRTY_MEMORY_VGA, 65, 1)
    assert (snap.start_page, snap.end_page) == (64, 128)
    np.testing.assert_array_equal(snap.dirty_pages(), [64, 65, 66, 67, 68, 69])
    assert snap.get_dirty(69, 1) and not snap.get_dirty(70, 58)
    with pytest.raises(ValueError):
        snap.get_dirty(60, 8)
    # ... but leaves other words and every other client alone.
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_VGA, 0, 256), [60, 61, 62, 63, 130])
    assert dm.count(DIRTY_MEMORY_MIGRATION) == 10
    assert dm.test_and_clear(DIRTY_MEMORY_MIGRATION, 62, 4)
    assert not dm.test_and_clear(DIRTY_MEMORY_MIGRATION, 62, 4)
    np.testing.assert_array_equal(dm.dirty_pages(DIRTY_MEMORY_MIGRATION, 0, 256), [60, 61, 66, 67, 68, 69])


def test_xchg_words_returns_and_zeroes():
    dm = DirtyMemory(256 * P)
    dm.set_dirty_range(0, 3, MIG)
    dm.set_dirty_range(200, 1, MIG)
    words = dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, 4)
    assert words.dtype == np.uint64 and len(words) == 4
    assert int(words[0]) == 0b111 and int(words[3]) == 1 << (200 - 192)
    assert dm.count(DIRTY_MEMORY_MIGRATION) == 0
    assert not dm.xchg_words(DIRTY_MEMORY_MIGRATION, 0, 4).any()


def test_grow_keeps_bits_and_checks_bounds():
    dm = DirtyMemory(64 * P)
    dm.set_dirty_range(63, 1, VGA)
    dm.grow(1000 * P)
    assert dm.npages == 1000 and dm.get_dirty(DIRTY_MEMORY_VGA, 63, 1)
    with pytest.raises(ValueError):
        dm.set_dirty_range(999, 2, VGA)


# ---------------------------------------------------------------------------
# Recording listener
# ---------------------------------------------------------------------------


def sec(s):
    return (s.mr.name, s.offset_within_address_space, s.size, s.offset_within_region)


class Recorder(MemoryListener):
    def __init__(self, name, log, priority=0):
        super().__init__()
        self.name = name
        self.priority = priority
        self.log = log

    def _rec(self, *ev):
        self.log.append((self.name, *ev))

    def begin(self):
        self._rec("begin")

    def commit(self):
        self._rec("commit")

    def region_add(self, s):
        self._rec("region_add", sec(s))

    def region_del(self, s):
        self._rec("region_del", sec(s))

    def region_nop(self, s):
        self._rec("region_nop", sec(s))

    def log_start(self, s, old, new):
        self._rec("log_start", sec(s), old, new)

    def log_stop(self, s, old, new):
        self._rec("log_stop", sec(s), old, new)

    def log_sync(self, s):
        self._rec("log_sync", sec(s))

    def log_clear(self, s):
        self._rec("log_clear", sec(s))

    def log_global_start(self):
        self._rec("log_global_start")
        return True

    def log_global_stop(self):
        self._rec("log_global_stop")

    def log_global_after_sync(self):
        self._rec("after_sync")


@pytest.fixture
def ms():
    return MemorySystem()


def ram(ms, name, npages):
    return ms.memory_region_init_ram(name, npages * P)


# ---------------------------------------------------------------------------
# FlatView rendering
# ---------------------------------------------------------------------------


def view(ms):
    return [(fr.mr.name, fr.start, fr.size, fr.offset_in_region) for fr in ms.address_space_memory.current_map.ranges]


def test_render_priority_overlap_and_gaps(ms):
    a = ram(ms, "a", 16)
    io = ms.memory_region_init_io("io", 2 * P)
    ms.system_memory.add_subregion(0, a)
    ms.system_memory.add_subregion(4 * P, io, priority=1)
    assert view(ms) == [("a", 0, 4 * P, 0), ("io", 4 * P, 2 * P, 0), ("a", 6 * P, 10 * P, 6 * P)]
    # Lower priority than the RAM: hidden entirely.
    ms.system_memory.del_subregion(io)
    ms.system_memory.add_subregion(4 * P, io, priority=-1)
    assert view(ms) == [("a", 0, 16 * P, 0)]


def test_render_equal_priority_last_added_wins(ms):
    a, b = ram(ms, "a", 4), ram(ms, "b", 4)
    ms.system_memory.add_subregion(0, a)
    ms.system_memory.add_subregion(2 * P, b)
    assert view(ms) == [("a", 0, 2 * P, 0), ("b", 2 * P, 4 * P, 0)]
    ms.system_memory.del_subregion(a)
    ms.system_memory.add_subregion(0, a)  # now a is the newest
    assert view(ms) == [("a", 0, 4 * P, 0), ("b", 4 * P, 2 * P, 2 * P)]


def test_render_aliases_containers_disabled(ms):
    r = ram(ms, "r", 32)
    box = ms.memory_region_init("box", 64 * P)
    lo = ms.memory_region_init_alias("lo", r, 0, 8 * P)
    hi = ms.memory_region_init_alias("hi", r, 20 * P, 4 * P)
    box.add_subregion(0, lo)
    box.add_subregion(16 * P, hi)
    ms.system_memory.add_subregion(0x100000, box)
    # aliases resolve to the RAM region with translated offsets
    assert view(ms) == [("r", 0x100000, 8 * P, 0), ("r", 0x100000 + 16 * P, 4 * P, 20 * P)]
    hi.set_alias_offset(8 * P)  # now contiguous with lo in the region, but not in gpa
    assert view(ms)[1] == ("r", 0x100000 + 16 * P, 4 * P, 8 * P)
    hi.set_address(8 * P)  # contiguous in both: merged
    assert view(ms) == [("r", 0x100000, 12 * P, 0)]
    box.set_enabled(False)
    assert view(ms) == []
    box.set_enabled(True)
    lo.set_enabled(False)
    assert view(ms) == [("r", 0x100000 + 8 * P, 4 * P, 8 * P)]


def test_region_misuse_raises(ms):
    a = ram(ms, "a", 1)
    ms.system_memory.add_subregion(0, a)
    with pytest.raises(MemoryRegionError):
        ms.system_memory.add_subregion(P, a)
    with pytest.raises(MemoryRegionError):
        ms.memory_region_init("c", P).del_subregion(a)
    with pytest.raises(MemoryRegionError):
        a.set_log(False)
    with pytest.raises(MemoryRegionError):
        ms.memory_region_transaction_commit()


# ---------------------------------------------------------------------------
# Transactions and listener order
# ---------------------------------------------------------------------------


def test_transaction_order_priorities_and_nesting(ms):
    log = []
    hi_prio = Recorder("B", log, priority=10)
    lo_prio = Recorder("A", log, priority=0)
    ms.memory_listener_register(hi_prio, ms.address_space_memory)  # registered first...
    ms.memory_listener_register(lo_prio, ms.address_space_memory)  # ...but A sorts first
    log.clear()
    a, b = ram(ms, "a", 4), ram(ms, "b", 4)
    ms.memory_region_transaction_begin()
    ms.system_memory.add_subregion(0, a)
    ms.memory_region_transaction_begin()
    ms.system_memory.add_subregion(8 * P, b)
    ms.memory_region_transaction_commit()
    assert log == []  # nothing before depth 0
    ms.memory_region_transaction_commit()
    A, B = ("a", 0, 4 * P, 0), ("b", 8 * P, 4 * P, 0)
    assert log == [
        ("A", "begin"), ("B", "begin"),
        ("A", "region_add", A), ("B", "region_add", A),
        ("A", "region_add", B), ("B", "region_add", B),
        ("A", "commit"), ("B", "commit"),
    ]  # fmt: skip
    log.clear()
    with ms.transaction():
        ms.system_memory.del_subregion(a)
        ms.system_memory.del_subregion(b)
    # removals: reverse listener order, ranges in address order
    assert log == [
        ("A", "begin"), ("B", "begin"),
        ("B", "region_del", A), ("A", "region_del", A),
        ("B", "region_del", B), ("A", "region_del", B),
        ("A", "commit"), ("B", "commit"),
    ]  # fmt: skip


def test_move_is_del_then_add_and_unchanged_is_nop(ms):
    log = []
    ms.memory_listener_register(Recorder("A", log), ms.address_space_memory)
    a, b = ram(ms, "a", 4), ram(ms, "b", 4)
    ms.system_memory.add_subregion(0, a)
    ms.system_memory.add_subregion(16 * P, b)
    log.clear()
    b.set_address(32 * P)
    assert log == [
        ("A", "begin"),
        ("A", "region_del", ("b", 16 * P, 4 * P, 0)),
        ("A", "region_nop", ("a", 0, 4 * P, 0)),
        ("A", "region_add", ("b", 32 * P, 4 * P, 0)),
        ("A", "commit"),
    ]


def test_log_start_stop_order_and_vga_refcount(ms):
    log = []
    ms.memory_listener_register(Recorder("B", log, 5), ms.address_space_memory)
    ms.memory_listener_register(Recorder("A", log, 0), ms.address_space_memory)
    vram = ram(ms, "vram", 4)
    ms.system_memory.add_subregion(0, vram)
    log.clear()
    vram.set_log(True)
    vram.set_log(True)  # refcounted: no second update
    S = ("vram", 0, 4 * P, 0)
    assert log == [
        ("A", "begin"), ("B", "begin"),
        ("A", "region_nop", S), ("B", "region_nop", S),
        ("A", "log_start", S, 0, VGA), ("B", "log_start", S, 0, VGA),
        ("A", "commit"), ("B", "commit"),
    ]  # fmt: skip
    log.clear()
    vram.set_log(False)
    assert log == []
    vram.set_log(False)
    assert [e for e in log if e[1] == "log_stop"] == [("B", "log_stop", S, VGA, 0), ("A", "log_stop", S, VGA, 0)]


def test_global_dirty_log_start_stop(ms):
    log = []
    ms.memory_listener_register(Recorder("A", log, 0), ms.address_space_memory)
    ms.memory_listener_register(Recorder("B", log, 1), ms.address_space_memory)
    r = ram(ms, "r", 4)
    io = ms.memory_region_init_io("io", P)
    ms.system_memory.add_subregion(0, r)
    ms.system_memory.add_subregion(8 * P, io)
    assert r.get_dirty_log_mask() == 0
    log.clear()
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    R = ("r", 0, 4 * P, 0)
    assert r.get_dirty_log_mask() == MIG and io.get_dirty_log_mask() == 0
    assert [e for e in log if e[1] not in ("region_nop",)] == [
        ("A", "log_global_start"), ("B", "log_global_start"),
        ("A", "begin"), ("B", "begin"),
        ("A", "log_start", R, 0, MIG), ("B", "log_start", R, 0, MIG),
        ("A", "commit"), ("B", "commit"),
    ]  # fmt: skip
    log.clear()
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_DIRTY_RATE)  # not the first flag: nothing
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)  # not the last flag: nothing
    assert log == []
    ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_DIRTY_RATE)
    assert [e for e in log if e[1] in ("log_stop", "log_global_stop")] == [
        ("B", "log_stop", R, MIG, 0), ("A", "log_stop", R, MIG, 0),
        ("B", "log_global_stop"), ("A", "log_global_stop"),
    ]  # fmt: skip
    with pytest.raises(ValueError):
        ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)


def test_global_start_veto_rolls_back(ms):
    log = []

    class Veto(Recorder):
        def log_global_start(self):
            self._rec("log_global_start")
            return False

    ms.memory_listener_register(Recorder("A", log, 0), ms.address_space_memory)
    ms.memory_listener_register(Veto("V", log, 1), ms.address_space_memory)
    log.clear()
    with pytest.raises(RuntimeError):
        ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    assert ms.global_dirty_tracking == 0
    assert log == [("A", "log_global_start"), ("V", "log_global_start"), ("A", "log_global_stop")]


def test_register_replays_and_unregister_reverses(ms):
    r = ram(ms, "r", 4)
    v = ram(ms, "v", 2)
    ms.system_memory.add_subregion(0, r)
    ms.system_memory.add_subregion(16 * P, v)
    v.set_log(True)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    log = []
    listener = Recorder("A", log)
    ms.memory_listener_register(listener, ms.address_space_memory)
    R, V = ("r", 0, 4 * P, 0), ("v", 16 * P, 2 * P, 0)
    assert log == [
        ("A", "begin"), ("A", "log_global_start"),
        ("A", "region_add", R), ("A", "log_start", R, 0, MIG),
        ("A", "region_add", V), ("A", "log_start", V, 0, VGA | MIG),
        ("A", "commit"),
    ]  # fmt: skip
    log.clear()
    ms.memory_listener_unregister(listener)
    assert log == [
        ("A", "begin"),
        ("A", "log_stop", R, MIG, 0), ("A", "region_del", R),
        ("A", "log_stop", V, VGA | MIG, 0), ("A", "region_del", V),
        ("A", "commit"),
    ]  # fmt: skip
    assert listener.address_space is None and listener not in ms.memory_listeners


def test_log_sync_and_log_sync_global_are_exclusive(ms):
    class Both(MemoryListener):
        def log_sync(self, s):
            pass

        def log_sync_global(self, last_stage):
            pass

    with pytest.raises(AssertionError):
        ms.memory_listener_register(Both(), ms.address_space_memory)


# ---------------------------------------------------------------------------
# Syncs, clears, the write-protect-all hook
# ---------------------------------------------------------------------------


def test_global_sync_calls_write_protect_all_after_every_listener(ms):
    log = []

    class Global(MemoryListener):
        name = "G"

        def log_sync_global(self, last_stage):
            log.append(("G", "log_sync_global", last_stage))

    ms.memory_listener_register(Recorder("A", log, 0), ms.address_space_memory)
    ms.memory_listener_register(Global(), ms.address_space_memory)
    ms.memory_register_write_protect_all(lambda on: log.append(("wp-all", on)))
    r, q = ram(ms, "r", 4), ram(ms, "q", 4)
    io = ms.memory_region_init_io("io", P)
    ms.system_memory.add_subregion(0, r)
    ms.system_memory.add_subregion(8 * P, q)
    ms.system_memory.add_subregion(16 * P, io)
    log.clear()
    ms.memory_global_dirty_log_sync()
    assert log == [("G", "log_sync_global", False), ("wp-all", True)]  # nothing logged yet
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    log.clear()
    ms.memory_global_dirty_log_sync(last_stage=True)
    assert log == [
        ("A", "log_sync", ("r", 0, 4 * P, 0)),
        ("A", "log_sync", ("q", 8 * P, 4 * P, 0)),
        ("G", "log_sync_global", True),
        ("wp-all", True),
    ]
    log.clear()
    ms.memory_region_sync_dirty_bitmap(q)  # per region: only q's ranges, no hook
    assert log == [("A", "log_sync", ("q", 8 * P, 4 * P, 0)), ("G", "log_sync_global", False)]


def test_write_protect_all_false_after_every_log_stop(ms):
    """The draft's placement: the hook gets False right after each log_stop of
    a topology update (whether to act is the accelerator's decision)."""
    log = []
    ms.memory_register_write_protect_all(lambda on: log.append(("wp-all", on)))
    ms.memory_listener_register(Recorder("A", log), ms.address_space_memory)
    vram = ram(ms, "vram", 2)
    ms.system_memory.add_subregion(0, vram)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    vram.set_log(True)
    log.clear()
    vram.set_log(False)  # log_stop(VGA|MIG -> MIG)
    V = ("vram", 0, 2 * P, 0)
    assert log == [
        ("A", "begin"), ("A", "region_nop", V), ("A", "log_stop", V, VGA | MIG, MIG), ("wp-all", False), ("A", "commit"),
    ]  # fmt: skip
    log.clear()
    ms.memory_global_dirty_log_sync()  # sync: True after the fetches
    assert log == [("A", "log_sync", V), ("wp-all", True)]


def test_clear_dirty_bitmap_shrinks_sections(ms):
    log = []
    ms.memory_listener_register(Recorder("A", log), ms.address_space_memory)
    r = ram(ms, "r", 16)
    lo = ms.memory_region_init_alias("lo", r, 0, 8 * P)
    hi = ms.memory_region_init_alias("hi", r, 8 * P, 8 * P)
    ms.system_memory.add_subregion(0, lo)
    ms.system_memory.add_subregion(0x10000, hi)
    ms.memory_region_clear_dirty_bitmap(r, 0, 16 * P)
    assert log[-1][1] != "log_clear"  # nothing logged: no log_clear
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    log.clear()
    ms.memory_region_clear_dirty_bitmap(r, 6 * P, 4 * P)  # straddles both ranges
    assert log == [("A", "log_clear", ("r", 6 * P, 2 * P, 6 * P)), ("A", "log_clear", ("r", 0x10000, 2 * P, 8 * P))]


def test_snapshot_and_clear_order_and_clients(ms):
    log = []

    class Fetcher(Recorder):
        def log_sync(self, s):
            super().log_sync(s)
            # what KVM does: OR the fetched bitmap into every active client
            words = np.array([0b1011], dtype=np.uint64)
            ms.physical_memory_set_dirty_lebitmap(words, s.ram_addr // P, 4)

    ms.memory_listener_register(Fetcher("A", log), ms.address_space_memory)
    other = ram(ms, "other", 64)  # pushes vram off word 0 of ram_addr space
    vram = ram(ms, "vram", 4)
    ms.system_memory.add_subregion(0, other)
    ms.system_memory.add_subregion(0x100000, vram)
    vram.set_log(True)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    ms.dirty_memory.xchg_words(DIRTY_MEMORY_VGA, 0, ms.dirty_memory.nwords)  # new blocks start dirty
    ms.dirty_memory.xchg_words(DIRTY_MEMORY_MIGRATION, 0, ms.dirty_memory.nwords)
    log.clear()
    snap = ms.memory_region_snapshot_and_clear_dirty(vram, 0, 4 * P, DIRTY_MEMORY_VGA)
    V = ("vram", 0x100000, 4 * P, 0)
    assert log == [("A", "log_sync", V), ("A", "log_clear", V), ("A", "after_sync")]
    assert [ms.memory_region_snapshot_get_dirty(vram, snap, i * P, P) for i in range(4)] == [True, True, False, True]
    assert not ms.memory_region_get_dirty(vram, 0, 4 * P, DIRTY_MEMORY_VGA)
    # the display consumed VGA; migration still has every fetched page
    assert ms.memory_region_get_dirty(vram, 0, P, DIRTY_MEMORY_MIGRATION)
    assert ms.memory_region_get_dirty(vram, 3 * P, P, DIRTY_MEMORY_MIGRATION)
    assert not ms.memory_region_get_dirty(vram, 2 * P, P, DIRTY_MEMORY_MIGRATION)


def test_new_ram_starts_dirty_and_mask_rules(ms):
    r = ram(ms, "r", 3)
    for c in (DIRTY_MEMORY_VGA, DIRTY_MEMORY_CODE, DIRTY_MEMORY_MIGRATION):
        assert ms.memory_region_get_dirty(r, 0, 3 * P, c)
    assert ms.memory_region_reset_dirty(r, 0, 3 * P, DIRTY_MEMORY_VGA)
    assert not ms.memory_region_get_dirty(r, 0, 3 * P, DIRTY_MEMORY_VGA)
    io = ms.memory_region_init_io("io", P)
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    assert r.get_dirty_log_mask() == MIG and io.get_dirty_log_mask() == 0
    ms.memory_region_set_log(r, True, DIRTY_MEMORY_VGA)
    assert ms.memory_region_get_dirty_log_mask(r) == MIG | VGA
    ms.memory_region_set_dirty(r, P, 1)  # device write: region's clients
    ms.dirty_memory.xchg_words(DIRTY_MEMORY_MIGRATION, 0, 1)
    ms.memory_region_set_dirty(r, P, 1)
    assert ms.memory_region_get_dirty(r, P, P, DIRTY_MEMORY_MIGRATION)
    assert ms.migration_dirty_words(r) == (0, 1)
