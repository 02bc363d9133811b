"""Destination RAM loading (RAMLoadState): block checks, zero-page rules."""

import numpy as np
import pytest

from memory import RAMBlock
from migrator.engine._ram import RAMLoadState
from migrator.errors import MigrationError


def _block(npages=8):
    return RAMBlock("pc.ram", npages * 4096)


def test_mem_size_must_match_blocks():
    st = RAMLoadState([_block()])
    with pytest.raises(MigrationError, match="Unknown ramblock"):
        st.mem_size((("other", 8 * 4096),))
    with pytest.raises(MigrationError, match="Length mismatch"):
        st.mem_size((("pc.ram", 4 * 4096),))
    with pytest.raises(MigrationError, match="unannounced"):
        st.load_pages("pc.ram", np.array([0], np.uint64), np.zeros((1, 4096), np.uint8))


@pytest.mark.parametrize("fresh", [True, False])
def test_zero_record_clears_a_page_written_earlier(fresh):
    b = _block()
    st = RAMLoadState([b], fresh=fresh)
    st.mem_size((("pc.ram", b.used_length),))
    st.load_pages("pc.ram", np.array([2 * 4096], np.uint64), np.full((1, 4096), 7, np.uint8))
    assert b.pages[2].max() == 7
    # the page became zero on the source and was resent as a ZERO record
    st.load_zero_pages("pc.ram", np.array([2 * 4096, 3 * 4096], np.uint64))
    assert not b.pages.any()


def test_fresh_shortcut_is_wrong_for_used_ram():
    """The broken variant: a destination whose RAM is not fresh must not skip."""
    b = _block()
    b.pages[5] = 9  # e.g. a guest image loaded before the migration
    st = RAMLoadState([b], fresh=True)
    st.mem_size((("pc.ram", b.used_length),))
    st.load_zero_pages("pc.ram", np.array([5 * 4096], np.uint64))
    assert b.pages[5].max() == 9  # fresh=True trusts the RAM to be zero: stale data stays
    st2 = RAMLoadState([b], fresh=False)
    st2.mem_size((("pc.ram", b.used_length),))
    st2.load_zero_pages("pc.ram", np.array([5 * 4096], np.uint64))
    assert not b.pages.any()


def _sending_machine(mode: dict):
    from memory import GLOBAL_DIRTY_MIGRATION
    from migrator.engine._machine import AccelConfig, Machine
    from migrator.engine._ram import RAMSaveState

    m = Machine(memory_bytes=4 << 20, accel=AccelConfig(kind="sim", **mode), workload="idle")
    m.kvm.vcpu_write(np.arange(m.memory_bytes // 4096, dtype=np.int64))  # a booted guest
    m.ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    ram = RAMSaveState(m.ms, m.ram_blocks(), log_keeps_bits=bool(mode.get("manual_protect")))
    ram.bitmap_sync()
    while ram.next_batch(1 << 16) is not None:  # send everything once
        pass
    return m, ram


MODES = [{}, {"write_protect_all": True}, {"manual_protect": True}]


@pytest.mark.parametrize("mode", MODES, ids=["legacy", "wp-all", "manual"])
def test_sync_counts_rewritten_pending_pages_as_found(mode):
    """``found`` (the exact dirty rate's numerator) counts the pages written
    since the previous fetch; ``new`` (QEMU's num_dirty_pages) only bits not
    already pending.  The broken variant -- the rate from ``new`` -- reads 0
    for a guest that keeps rewriting pages the sender has not reached yet."""
    m, ram = _sending_machine(mode)
    gfns = np.arange(100, 300, dtype=np.int64)
    m.kvm.vcpu_write(gfns)
    first = ram.bitmap_sync()
    assert (first.found_dirty_pages, first.new_dirty_pages) == (200, 200)
    m.kvm.vcpu_write(gfns)  # written again before the sender took them
    again = ram.bitmap_sync()
    assert again.new_dirty_pages == 0  # what a rate from QEMU's counter would see
    # manual protect: the pages were never re-protected (their chunk waits for
    # its CLEAR), so the rewrite did not fault and cannot be told from the
    # previous bit; they are left out rather than counted twice
    assert again.found_dirty_pages == (0 if mode.get("manual_protect") else 200)
    assert ram.pending_bytes == 200 * 4096


@pytest.mark.parametrize("mode", MODES, ids=["legacy", "wp-all", "manual"])
def test_sync_does_not_count_a_kept_bit_twice(mode):
    """Manual protect keeps a page's KVM bit until its chunk is CLEARed: the
    next GET reports it again.  Counting it (``log_keeps_bits=False`` in
    manual mode, the broken variant) would read a guest that stopped writing
    as still dirtying."""
    m, ram = _sending_machine(mode)
    m.kvm.vcpu_write(np.arange(100, 300, dtype=np.int64))
    assert ram.bitmap_sync().found_dirty_pages == 200
    assert ram.bitmap_sync().found_dirty_pages == 0  # nothing written since
    if mode.get("manual_protect"):
        m2, broken = _sending_machine(mode)
        broken.log_keeps_bits = False
        m2.kvm.vcpu_write(np.arange(100, 300, dtype=np.int64))
        broken.bitmap_sync()
        assert broken.bitmap_sync().found_dirty_pages == 200  # the stale bits again
