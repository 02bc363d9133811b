"""The kernel's dirty_log_test verification on real KVM, one test per mode,
plus the wrong variants it must catch (see tests/kvm/dirty_log_selftest.py).

Every correct variant runs with the same delay between fetch and re-protect
as the broken ones, so the only difference is the ordering under test."""

from __future__ import annotations

import pytest

from tests.kvm.dirty_log_selftest import run_dirty_log_selftest

pytestmark = pytest.mark.kvm
DELAY_S = 0.005


def _assert_clean(rep):
    assert rep.violations == 0, rep.first_errors
    # the test must actually have exercised something
    assert rep.iterations >= 16 and rep.guest_writes > 0
    assert rep.dirty_count > 0 and rep.clear_count > 0


async def test_selftest_bitmap(require_kvm):
    rep = await run_dirty_log_selftest("bitmap", iterations=24)
    _assert_clean(rep)
    assert rep.track_next_count > 0  # writes after GET did happen and were reported next round


async def test_selftest_clear_fetched_bits_copy_after_clear(require_kvm):
    rep = await run_dirty_log_selftest("clear", iterations=24, clear_delay_s=DELAY_S)
    _assert_clean(rep)


async def test_selftest_ring_with_ring_full_exits(require_kvm):
    # a 1024-entry ring fills many times per round: harvest+reset on
    # KVM_EXIT_DIRTY_RING_FULL in the vCPU thread, the rest in the main thread
    rep = await run_dirty_log_selftest("ring", iterations=24, ring_size=1024, clear_delay_s=DELAY_S)
    _assert_clean(rep)
    assert rep.ring_full_exits > 0


async def test_selftest_ring_large(require_kvm):
    rep = await run_dirty_log_selftest("ring", iterations=16, ring_size=16384, clear_delay_s=DELAY_S)
    _assert_clean(rep)


async def test_broken_clear_all_ones_loses_writes(require_kvm):
    """CLEAR with an all-ones mask also clears bits set by writes *after* the
    GET (pages that were clean and write-protected): those writes are never
    reported.  The selftest's track rule catches it."""
    rep = await run_dirty_log_selftest("clear", iterations=16, broken="clear_all_ones", clear_delay_s=DELAY_S)
    assert rep.missing_tracked > 0, "the all-ones CLEAR should lose pages written between GET and CLEAR"


async def test_broken_copy_before_clear_loses_writes(require_kvm):
    """Copying before CLEAR: a page dirty (so writable) at GET time is written
    again between the copy and the CLEAR without faulting; the CLEAR drops
    its bit, so the destination keeps the old content."""
    rep = await run_dirty_log_selftest("clear", iterations=16, broken="copy_before_protect", clear_delay_s=DELAY_S)
    assert rep.missing_copies > 0


async def test_broken_copy_before_ring_reset_loses_writes(require_kvm):
    rep = await run_dirty_log_selftest("ring", iterations=16, ring_size=16384, broken="copy_before_protect",
                                       clear_delay_s=DELAY_S)
    assert rep.missing_copies > 0
