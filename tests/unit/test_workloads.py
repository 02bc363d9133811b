"""Simulated workloads and QEMU's check_guests_ram rule."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from memory.kvm.sim.workloads import (AB_START, check_guests_ram, make_workload, parse_workload)

PAGE = 4096


def check_guests_ram_reference(ram, start, end):
    """QEMU's loop, literally (tests/qtest/migration: check_guests_ram)."""
    first = int(ram[start])
    last, hit_edge, bad = first, False, 0
    for addr in range(start + PAGE, end, PAGE):
        b = int(ram[addr])
        if b != last:
            if (b + 1) % 256 == last and not hit_edge:
                hit_edge, last = True, b
            else:
                bad += 1
    return bad


@given(st.lists(st.sampled_from([0, 1, 2, 7, 254, 255]), min_size=1, max_size=40))
def test_vectorised_check_matches_qemu_loop(values):
    ram = np.zeros(len(values) * PAGE, dtype=np.uint8)
    ram[::PAGE] = values
    assert check_guests_ram(ram, 0) == check_guests_ram_reference(ram, 0, ram.size)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, gfns):
        self.calls.append(np.asarray(gfns).copy())


def _ram(npages):
    return np.zeros((npages, PAGE), dtype=np.uint8)


@pytest.mark.parametrize("batch", [1, 7, 100, 1000])
def test_ab_keeps_qemu_pattern_at_any_stop_point(batch):
    pages = _ram(AB_START // PAGE + 300)
    wl = make_workload("ab", pages)
    mmu = Recorder()
    wl.boot(mmu)
    for _ in range(25):
        wl.step(batch, mmu)
        assert check_guests_ram(pages.reshape(-1), AB_START) == 0
    # every store was preceded by the fault path for exactly those pages
    assert all(c.size for c in mmu.calls)


def test_ab_lost_page_is_detected():
    """The broken variant: a page whose increment was lost breaks the pattern."""
    pages = _ram(AB_START // PAGE + 300)
    wl = make_workload("ab", pages)
    wl.boot(Recorder())
    wl.step(450, Recorder())
    pages[AB_START // PAGE + 20, 0] -= 1  # an update the destination never got
    assert check_guests_ram(pages.reshape(-1), AB_START) >= 1


@pytest.mark.parametrize("name", ["ab", "random", "hotset"])
def test_state_roundtrip_is_deterministic(name):
    a, b = _ram(300), _ram(300)
    if name == "ab":
        a, b = _ram(AB_START // PAGE + 64), _ram(AB_START // PAGE + 64)
    wa = make_workload(name, a, seed=5)
    wa.boot(Recorder())
    wa.step(100, Recorder())
    b[:] = a
    wb = make_workload(name, b, seed=99)
    wb.set_state(wa.get_state())
    for _ in range(5):
        wa.step(37, Recorder())
        wb.step(37, Recorder())
    assert np.array_equal(a, b)


def test_random_writes_change_pages():
    pages = _ram(64)
    wl = make_workload("random", pages, seed=1)
    wl.step(32, Recorder())
    assert (pages.view(np.uint64)[:, 0] != 0).sum() > 0


def test_hotset_is_skewed():
    pages = _ram(1000)
    wl = make_workload("hotset", pages, seed=3)
    idx = wl.next_pages(10000)
    assert (idx < 100).mean() > 0.8


@pytest.mark.parametrize("spec,err", [("nope", "unknown workload"), ("ab,rate", "KEY=VALUE"),
                                      ("ab,rate=-1", "> 0"), ("ab,speed=3", "unknown workload option")])
def test_parse_errors(spec, err):
    with pytest.raises(ValueError, match=err):
        parse_workload(spec)


def test_parse_ok():
    assert parse_workload("random,rate=5000,seed=3") == ("random", {"rate": 5000.0, "seed": 3})


# -- stream (greedy repeated passes over a working set) ------------------------


@pytest.mark.parametrize("batch", [1, 5, 7, 64])
def test_stream_writes_working_set_in_repeated_ascending_passes(batch):
    pages = _ram(40)
    wl = make_workload("stream", pages)
    ws = wl.working_set
    assert ws == 30  # 75 % of RAM by default
    mmu = Recorder()
    total = 0
    for _ in range(23):
        total += wl.step(batch, mmu)
    gfns = np.concatenate(mmu.calls)
    # exactly the sequence 0, 1, ..., ws-1, 0, 1, ... and never outside the working set
    assert np.array_equal(gfns, np.arange(total) % ws)
    assert wl.passes == total // ws and wl.cursor == total % ws
    seq = pages.view(np.uint64)[:, 0]
    assert not seq[ws:].any()
    # each page holds the sequence number of its last write (1-based)
    last_write = np.array([max(i for i in range(total) if i % ws == p) + 1 if p < total else 0
                           for p in range(ws)], dtype=np.uint64)
    assert np.array_equal(seq[:ws], last_write)


def test_stream_state_migrates_and_rejects_a_bad_working_set():
    src = make_workload("stream", _ram(50))
    src.working_set = 10
    mmu = Recorder()
    src.step(7, mmu)
    src.step(6, mmu)  # wraps: one pass done, cursor 3
    state = src.get_state()
    dst = make_workload("stream", _ram(50))  # knows only the name, as a destination does
    dst.set_state(state)
    assert (dst.working_set, dst.cursor, dst.passes, dst.seq) == (10, 3, 1, 13)
    a, b = Recorder(), Recorder()
    src.step(9, a)
    dst.step(9, b)
    assert np.array_equal(a.calls[0], b.calls[0])
    with pytest.raises(ValueError):
        make_workload("stream", _ram(4)).set_state(state | {"working_set": 5})
