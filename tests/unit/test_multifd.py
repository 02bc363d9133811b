"""multifd: QEMU 7.2's packet format, the channel workers and their ordering rules."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import trio

from memory import RAMBlock
from migrator.engine import _multifd as m
from migrator.engine._ram import RAMLoadState, RAMSaveState
from transport import RemoteProtocolError
from transport import _multifd as mf

PS = 4096


# -- wire format ------------------------------------------------------------------
def test_packet_and_init_sizes_are_qemu_72s():
    assert mf.INIT_BYTES == 64  # MultiFDInit_t
    assert mf.packet_header_bytes(PS) == 320 + 8 * 128  # MultiFDPacket_t + offset[page_count]
    raw = mf.encode_init(3)
    assert raw[:8] == bytes.fromhex("1122334400000001") and raw[24] == 3 and len(raw) == 64
    assert mf.parse_init(raw, channels=4) == 3


@pytest.mark.parametrize(("raw", "match"), [
    (b"\x11\x22\x33\x45" + mf.encode_init(0)[4:], "magic"),
    (mf.encode_init(0)[:4] + b"\0\0\0\2" + mf.encode_init(0)[8:], "version 2"),
    (mf.encode_init(0)[:8] + b"\1" * 16 + mf.encode_init(0)[24:], "received uuid"),
    (mf.encode_init(4), "channel id 4 is greater than number of channels 4"),
])
def test_init_is_checked(raw, match):
    with pytest.raises(RemoteProtocolError, match=match):
        mf.parse_init(raw, channels=4)


def _header(offsets, *, flags=mf.MULTIFD_FLAG_NOCOMP, block="ram", size=None) -> np.ndarray:
    out = np.zeros(mf.packet_header_bytes(PS), np.uint8)
    offs = np.asarray(offsets, np.uint64)
    mf.encode_packet_header(out, flags=flags, packet_num=7, block=block, offsets=offs,
                            next_packet_size=len(offs) * PS if size is None else size, page_size=PS)
    return out


def test_header_round_trip():
    hdr = mf.parse_packet_header(_header([0, PS, 9 * PS]), page_size=PS, blocks={"ram": 16 * PS},
                                 compression=mf.MULTIFD_FLAG_NOCOMP)
    assert (hdr.block, hdr.normal_pages, hdr.packet_num, hdr.sync) == ("ram", 3, 7, False)
    assert hdr.offsets.tolist() == [0, PS, 9 * PS]


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda h: h.__setitem__(slice(12, 16), [0, 0, 0, 129]), "with 129 pages and expected maximum pages are 128"),
    (lambda h: h.__setitem__(slice(16, 20), [0, 0, 0, 100]) or h.__setitem__(slice(12, 16), [0, 0, 0, 50]),
     "with 100 pages and expected maximum pages are 50"),
    (lambda h: h.__setitem__(64, ord("x")), "unknown ram block xam"),
    (lambda h: h.__setitem__(slice(8, 12), [0, 0, 0, mf.MULTIFD_FLAG_ZSTD]), "flags received 0x4 flags expected 0x0"),
    (lambda h: h.__setitem__(slice(320 + 8, 328 + 8), list((16 * PS).to_bytes(8, "big"))), "offset too long"),
    (lambda h: h.__setitem__(slice(320, 328), list((5).to_bytes(8, "big"))), "not page aligned"),
])
def test_header_is_checked(mutate, match):
    h = _header([0, PS])
    mutate(h)
    with pytest.raises(RemoteProtocolError, match=match):
        mf.parse_packet_header(h, page_size=PS, blocks={"ram": 16 * PS}, compression=mf.MULTIFD_FLAG_NOCOMP)


# -- channel workers over a socketpair ------------------------------------------------
def _guest(npages=256, seed=1):
    b = RAMBlock("ram", npages * PS)
    rng = np.random.default_rng(seed)
    b.pages[:] = rng.integers(0, 256, b.pages.shape, dtype=np.uint8)
    b.pages[::3, 100:] = 0  # compressible too
    return b


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_send_and_receive_channel_write_guest_ram(compression):
    src, dst = _guest(), RAMBlock("ram", 256 * PS)
    load = RAMLoadState([dst])
    a, b = socket.socketpair()
    tx = m._SendChannel(a, 0, compression=compression, level=1, page_size=PS)
    rx = m._RecvChannel(b, 0, compression=compression, page_size=PS)
    jobs = [np.arange(0, 128), np.array([5, 6, 7, 200, 201, 255]), np.arange(130, 200)]
    with ThreadPoolExecutor(1) as pool:
        for num, idx in enumerate(jobs):
            fut = pool.submit(tx.send_blocking, m._Job("ram", src.pages, idx), num)
            hdr = rx.recv_blocking(load)
            assert fut.result() >= mf.packet_header_bytes(PS)
            assert hdr.packet_num == num and hdr.normal_pages == idx.size
    sent = np.unique(np.concatenate(jobs))
    np.testing.assert_array_equal(dst.pages[sent], src.pages[sent])
    assert not dst.pages[np.setdiff1d(np.arange(256), sent)].any()
    assert load.written["ram"][sent].all() and load.written["ram"].sum() == sent.size
    a.close()
    assert rx.recv_blocking(load) is None  # clean EOF at a packet boundary
    b.close()


class _NoMarkLoad(RAMLoadState):
    """The broken receiver: pages written by a channel are not marked."""

    def mark_written(self, idstr, idx):
        pass


@pytest.mark.parametrize("broken", [False, True])
def test_zero_record_after_a_multifd_page_zeroes_it(broken):
    """Rule 4: a page sent through a channel, then (zero now) as a ZERO record on
    the main channel must end up zero; the broken receiver leaves stale data."""
    src, dst = _guest(), RAMBlock("ram", 256 * PS)
    load = (_NoMarkLoad if broken else RAMLoadState)([dst], fresh=True)
    load.mem_size((("ram", 256 * PS),))
    a, b = socket.socketpair()
    with a, b:
        m._SendChannel(a, 0, compression="none", level=1, page_size=PS).send_blocking(
            m._Job("ram", src.pages, np.array([10])), 0)
        m._RecvChannel(b, 0, compression="none", page_size=PS).recv_blocking(load)
    assert dst.pages[10].any()
    load.load_zero_pages("ram", np.array([10 * PS], np.uint64))
    assert dst.pages[10].any() == broken


async def test_receiver_holds_a_channel_at_sync_until_the_main_channel_eos():
    """Rule 3: after its SYNC a channel applies nothing of the next section
    until the main channel reached the EOS (MultifdReceiver.sync)."""
    src, dst = _guest(), RAMBlock("ram", 256 * PS)
    load = RAMLoadState([dst])
    a, b = socket.socketpair()
    tx = m._SendChannel(a, 0, compression="none", level=1, page_size=PS)
    rx = m.MultifdReceiver([b], load, compression="none", page_size=PS)
    tx.send_blocking(m._Job("", None, np.empty(0, np.intp), m._Barrier(1)), 0)  # SYNC
    tx.send_blocking(m._Job("ram", src.pages, np.array([3])), 1)  # the next section's page
    async with trio.open_nursery() as nursery:
        await nursery.start(rx.run)
        await trio.sleep(0.2)
        assert not dst.pages[3].any()  # held at the SYNC
        await rx.sync()
        with trio.fail_after(5):
            while not dst.pages[3].any():
                await trio.sleep(0.01)
        a.close()
    np.testing.assert_array_equal(dst.pages[3], src.pages[3])


async def test_sender_sync_reaches_every_channel_after_its_pages():
    pairs = [socket.socketpair() for _ in range(3)]
    src = _guest()
    sent = []
    for a, b in pairs:  # room for everything: nobody reads until the end
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    async with m.multifd_sender([p[0] for p in pairs], compression="none", level=1, page_size=PS,
                                on_sent=sent.append) as tx:
        await tx.queue("ram", src.pages, np.arange(0, 200))
        await tx.sync()
    hdr_bytes = mf.packet_header_bytes(PS)
    assert sum(sent) == 2 * hdr_bytes + 200 * PS + 3 * hdr_bytes
    load = RAMLoadState([RAMBlock("ram", 256 * PS)])
    syncs = 0
    for _, b in pairs:
        rx = m._RecvChannel(b, 0, compression="none", page_size=PS)
        hdrs = []
        while (h := rx.recv_blocking(load)) is not None:
            hdrs.append(h)
        assert hdrs[-1].sync and hdrs[-1].normal_pages == 0  # the SYNC comes after the channel's pages
        syncs += sum(h.sync for h in hdrs)
        b.close()
    assert syncs == 3


# -- rule 2: no page twice between two syncs -------------------------------------------
class _FakeMemory:
    """Just enough of MemorySystem for RAMSaveState: guest writes set the
    migration client's dirty bits directly."""

    def __init__(self, block: RAMBlock) -> None:
        self.block = block
        self.words = np.zeros((block.npages + 63) // 64, np.uint64)
        self.dirty_memory = self

    def xchg_words(self, client, start, n):
        out = self.words[start:start + n].copy()
        self.words[start:start + n] = 0
        return out

    def memory_global_dirty_log_sync(self, last_stage):
        pass

    def memory_global_after_dirty_log_sync(self):
        pass

    def memory_region_clear_dirty_bitmap(self, mr, start, size):
        pass

    def write(self, page: int, value: int) -> None:
        self.block.pages[page, :8] = value
        self.words[page // 64] |= np.uint64(1 << (page % 64))


@pytest.mark.parametrize("sync_inside_sections", [False, True])
def test_multifd_sections_never_carry_a_page_twice(sync_inside_sections):
    """Rule 2.  Channels deliver a section's packets in any order (here:
    reversed, the worst case).  With bitmap syncs only between sections (as
    the engine does), RAMSaveState hands out each page at most once per
    section and the destination is right; the broken variant syncs inside a
    section, a page goes out twice and its older copy lands last."""
    block = RAMBlock("ram", 128 * PS)
    ms = _FakeMemory(block)
    ram = RAMSaveState(ms, [(block, None)], clear_bitmap_shift=6)
    dest = np.zeros_like(block.pages)
    rng = np.random.default_rng(3)
    value = 1
    ram.bitmap_sync()
    for _section in range(12):
        in_flight = []
        for i in range(20):  # one section: batches while the guest writes
            if sync_inside_sections and i % 4 == 3:
                ram.bitmap_sync()
            batch = ram.next_batch(16)
            if batch is not None:
                _, idx = batch
                in_flight.append((idx, block.pages[idx].copy()))  # the channel's read
            for page in rng.integers(0, 128, 6):
                ms.write(int(page), value)
                value = value % 250 + 1
        for idx, data in reversed(in_flight):  # unordered channels
            dest[idx] = data
        ram.bitmap_sync()  # SYNC + EOS, then the next section
    ram.bitmap_sync(last_stage=True)
    while (batch := ram.next_batch(64)) is not None:
        dest[batch[1]] = block.pages[batch[1]]
    assert np.array_equal(dest, block.pages) != sync_inside_sections
