"""Destination RAM loading (RAMLoadState): block checks, zero-page rules."""

import numpy as np
import pytest

from memory import RAMBlock
from migrator._ram import RAMLoadState
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
