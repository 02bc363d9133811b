"""Unit tests of the migration stream codec (transport.StreamEncoder/StreamDecoder).

Streams are built by hand with ``struct`` from the format's definition
(``_H`` below), independently of the encoder, so encoder and decoder are each
checked against the spec rather than only against each other.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from transport import (
    NEED_DATA,
    Configuration,
    ConnectionClosed,
    DeviceState,
    EndOfStream,
    LocalProtocolError,
    ProtocolError,
    RamEOS,
    RamMemSize,
    RamPages,
    RamZeroPages,
    RemoteProtocolError,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    StreamHeader,
    VMDescription,
)
from transport.testing import decode_all, expand_pages, materialise

PS = 4096
ZERO, MEM_SIZE, PAGE, EOS, CONT = 0x02, 0x04, 0x08, 0x10, 0x20


class _H:
    """Hand-made stream pieces, straight from the format definition."""

    header = struct.pack(">II", 0x5145564D, 3)

    @staticmethod
    def conf(name: bytes = b"pc") -> bytes:
        return b"\x07" + struct.pack(">I", len(name)) + name

    @staticmethod
    def start(sid: int, idstr: bytes = b"ram", inst: int = 0, ver: int = 4, kind: int = 1) -> bytes:
        return struct.pack(">BIB", kind, sid, len(idstr)) + idstr + struct.pack(">II", inst, ver)

    @staticmethod
    def full(sid: int, idstr: bytes = b"migrator-vcpus", inst: int = 0, ver: int = 1) -> bytes:
        return _H.start(sid, idstr, inst, ver, kind=4)

    @staticmethod
    def part(sid: int) -> bytes:
        return struct.pack(">BI", 2, sid)

    @staticmethod
    def end(sid: int) -> bytes:
        return struct.pack(">BI", 3, sid)

    @staticmethod
    def footer(sid: int) -> bytes:
        return struct.pack(">BI", 0x7E, sid)

    @staticmethod
    def mem_size(blocks: list[tuple[bytes, int]], total: int | None = None) -> bytes:
        total = sum(n for _, n in blocks) if total is None else total
        out = struct.pack(">Q", total | MEM_SIZE)
        for name, n in blocks:
            out += bytes([len(name)]) + name + struct.pack(">Q", n)
        return out

    @staticmethod
    def rec(flags: int, offset: int, block: bytes | None = None) -> bytes:
        out = struct.pack(">Q", offset | flags)
        if block is not None:
            out += bytes([len(block)]) + block
        return out

    @staticmethod
    def page(offset: int, fill: int, block: bytes | None = None) -> bytes:
        flags = PAGE if block is not None else PAGE | CONT
        return _H.rec(flags, offset, block) + bytes([fill]) * PS

    @staticmethod
    def zero(offset: int, block: bytes | None = None, fill: int = 0) -> bytes:
        flags = ZERO if block is not None else ZERO | CONT
        return _H.rec(flags, offset, block) + bytes([fill])

    eos = struct.pack(">Q", EOS)
    eof = b"\x00"


RAM_BYTES = 16 * PS
PRELUDE = _H.header + _H.conf() + _H.start(1) + _H.mem_size([(b"ram", RAM_BYTES), (b"vga", 4 * PS)]) + _H.eos + _H.footer(1)


def _valid_stream() -> tuple[bytes, list]:
    """A small valid stream covering every record kind, and its expected events."""
    data = (
        PRELUDE
        + _H.part(1)
        + _H.page(0, 0x11, b"ram")
        + _H.page(2 * PS, 0x22)
        + _H.page(3 * PS, 0x33)
        + _H.zero(4 * PS)
        + _H.zero(5 * PS)
        + _H.page(PS, 0x44, b"vga")
        + _H.eos
        + _H.footer(1)
        + _H.end(1)
        + _H.page(15 * PS, 0x55, b"ram")
        + _H.eos
        + _H.footer(1)
        + _H.full(2)
        + struct.pack(">I", 3)
        + b"abc"
        + _H.footer(2)
        + _H.eof
    )
    expected = [
        StreamHeader(3),
        Configuration("pc"),
        SectionStart(1, "ram", 0, 4),
        RamMemSize((("ram", RAM_BYTES), ("vga", 4 * PS))),
        RamEOS(),
        SectionFooter(1),
        SectionPart(1),
        ("page", "ram", 0, bytes([0x11]) * PS),
        ("page", "ram", 2 * PS, bytes([0x22]) * PS),
        ("page", "ram", 3 * PS, bytes([0x33]) * PS),
        ("zero", "ram", 4 * PS),
        ("zero", "ram", 5 * PS),
        ("page", "vga", PS, bytes([0x44]) * PS),
        RamEOS(),
        SectionFooter(1),
        SectionEnd(1),
        ("page", "ram", 15 * PS, bytes([0x55]) * PS),
        RamEOS(),
        SectionFooter(1),
        SectionFull(2, "migrator-vcpus", 0, 1),
        DeviceState(b"abc"),
        SectionFooter(2),
        EndOfStream(),
        ConnectionClosed(),
    ]
    return data, expected


# -- decoding a valid stream three ways ---------------------------------------
def test_decode_whole_buffer():
    data, expected = _valid_stream()
    assert expand_pages(decode_all(data)) == expected


def test_decode_one_byte_at_a_time():
    data, expected = _valid_stream()
    dec = StreamDecoder()
    events = []
    need_data = 0
    for i in range(len(data)):
        dec.receive_data(data[i : i + 1])
        while (ev := dec.next_event()) is not NEED_DATA:
            events.append(materialise(ev))
            need_data -= 1
        need_data += 1
    dec.receive_data(b"")
    events.append(dec.next_event())
    assert expand_pages(events) == expected
    # Nearly every byte returned NEED_DATA: nothing was parsed early.
    assert need_data == len(data) - (len(expected) - 1)


def test_trailing_bytes_after_eof_are_untouched():
    data, expected = _valid_stream()
    dec = StreamDecoder()
    dec.receive_data(data + b"\x99junk")
    events = []
    while not isinstance(ev := dec.next_event(), EndOfStream):
        events.append(ev)
    assert dec.trailing_data == (b"\x99junk", False)
    assert dec.stream_offset == len(data)
    with pytest.raises(RemoteProtocolError, match="data after the end of the stream") as info:
        dec.next_event()
    assert info.value.offset == len(data)


def _vmdesc(devices, *, page_size=PS, machine="pc") -> bytes:
    top = {"configuration": {"vmsd_name": "configuration", "version": 1,
                             "fields": [{"name": "len", "type": "uint32", "size": 4},
                                        {"name": "name", "type": "buffer", "size": len(machine)}]},
           "page_size": page_size, "devices": devices}
    raw = json.dumps(top).encode()
    return b"\x06" + struct.pack(">I", len(raw)) + raw


_VCPUS_DESC = {"name": "migrator-vcpus", "instance_id": 0, "vmsd_name": "migrator-vcpus", "version": 1,
               "fields": [{"name": "length", "type": "uint32", "size": 4},
                          {"name": "state", "type": "buffer", "size": 3}]}


def test_vmdescription_after_eof():
    data, _ = _valid_stream()
    vmdesc = _vmdesc([_VCPUS_DESC])
    events = decode_all(data + vmdesc)
    assert events[-2:] == [VMDescription(vmdesc[5:]), ConnectionClosed()]
    with pytest.raises(RemoteProtocolError, match="data after the end") as info:
        decode_all(data + vmdesc + b"\x06")
    assert info.value.offset == len(data) + len(vmdesc)


@pytest.mark.parametrize(
    ("devices", "kw", "match"),
    [
        ([], {}, r"lists 0 devices \[\], the stream has 1 device sections \['migrator-vcpus'\]"),
        ([{**_VCPUS_DESC, "name": "timer"}], {}, "names 'timer' 0, the stream's section is 'migrator-vcpus' 0"),
        ([{**_VCPUS_DESC, "version": 2}], {}, "version 2, section has 1"),
        ([{**_VCPUS_DESC, "fields": _VCPUS_DESC["fields"][:1]}], {}, "describes 4 bytes, the section holds 7"),
        ([_VCPUS_DESC], {"page_size": 8192}, "page_size 8192, stream uses 4096"),
        ([_VCPUS_DESC], {"machine": "none"}, "configuration is 8 bytes, the stream's is 6"),
    ],
    ids=["no-devices", "wrong-name", "wrong-version", "wrong-size", "page-size", "configuration"],
)
def test_vmdescription_must_match_the_stream(devices, kw, match):
    """The description is checked against the sections the stream carried."""
    data, _ = _valid_stream()
    with pytest.raises(RemoteProtocolError, match=match) as info:
        decode_all(data + _vmdesc(devices, **kw))
    assert info.value.offset == len(data) + 5


def test_vmdescription_not_json():
    data, _ = _valid_stream()
    with pytest.raises(RemoteProtocolError, match="not valid JSON"):
        decode_all(data + b"\x06" + struct.pack(">I", 1) + b"{")


def test_receive_into_decoder_buffer():
    """The get_buffer/buffer_updated path (recv_into) gives the same events."""
    data, expected = _valid_stream()
    dec = StreamDecoder(buffer_bytes=3 * PS)  # small: forces compaction and growth
    events = []
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer(1000)
        n = min(len(buf), 5000, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        dec.buffer_updated(n)
        pos += n
        while (ev := dec.next_event()) is not NEED_DATA:
            events.append(materialise(ev))
    dec.receive_data(b"")
    events.append(dec.next_event())
    assert expand_pages(events) == expected
    with pytest.raises(LocalProtocolError):
        dec.get_buffer()
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"x")


def test_page_runs_are_vectorised_into_one_event():
    body = _H.page(0, 1, b"ram") + b"".join(_H.page(i * PS, i) for i in range(1, 12))
    body += _H.zero(12 * PS) + _H.zero(13 * PS) + _H.zero(14 * PS)
    events = decode_all(PRELUDE + _H.part(1) + body + _H.eos + _H.footer(1), close=False)
    pages = [e for e in events if isinstance(e, (RamPages, RamZeroPages))]
    # first record names the block (one page), then one run of 11, one zero run.
    assert [type(e) for e in pages] == [RamPages, RamPages, RamZeroPages]
    assert len(pages[1].offsets) == 11 and len(pages[2].offsets) == 3
    np.testing.assert_equal(pages[1].data[:, 0], np.arange(1, 12, dtype=np.uint8))
    np.testing.assert_equal(pages[2].offsets, np.array([12, 13, 14], dtype=np.uint64) * PS)


def test_page_view_is_valid_until_next_call():
    body = _H.page(0, 7, b"ram") + _H.page(PS, 8) + _H.page(2 * PS, 9)
    dec = StreamDecoder()
    dec.receive_data(PRELUDE + _H.part(1) + body)
    while not isinstance(ev := dec.next_event(), RamPages):
        pass
    assert ev.data.base is not None  # a view, not a copy
    assert ev.data.shape == (1, PS) and ev.data[0, 0] == 7


def test_continue_across_sections_is_accepted_like_qemu():
    """QEMU 7.2 starts a PART with PAGE|CONTINUE when the block did not change
    (ram_block_from_stream remembers the block for the whole migration)."""
    data = PRELUDE + _H.part(1) + _H.page(0, 1, b"vga") + _H.eos + _H.footer(1)
    data += _H.part(1) + _H.page(PS, 2) + _H.eos + _H.footer(1) + _H.eof
    pages = [e for e in expand_pages(decode_all(data)) if isinstance(e, tuple)]
    assert [(p[1], p[2], p[3][0]) for p in pages] == [("vga", 0, 1), ("vga", PS, 2)]


# -- malformed streams: RemoteProtocolError naming the offset ------------------
P1 = PRELUDE + _H.part(1)  # ready for RAM records
B = len(P1)


def _malformed():
    """(id, bytes, expected offset, message fragment)."""
    h = _H.header
    yield "bad-magic", b"QEVN" + h[4:], 0, "bad magic"
    yield "version-2", h[:4] + struct.pack(">I", 2), 4, "v2 format is obsolete"
    yield "version-4", h[:4] + struct.pack(">I", 4), 4, "unsupported stream version 4"
    yield "conf-too-long", h + b"\x07" + struct.pack(">I", 100000), 9, "machine name length"
    yield "conf-not-utf8", h + _H.conf(b"\xff\xfe"), 13, "not valid UTF-8"
    yield "unknown-section-type", h + b"\x42", 8, "unknown section type 0x42"
    yield "command-section", h + b"\x08", 8, "unsupported section type COMMAND"
    yield "subsection", h + _H.conf() + b"\x05", 8 + len(_H.conf()), "SUBSECTION"
    yield "unknown-idstr", h + _H.start(1, b"timer"), 8, "unknown savevm section or instance 'timer'"
    yield "ram-as-full", h + _H.start(1, kind=4), 8, "unknown savevm section"
    yield "ram-version-3", h + _H.start(1, ver=3), 8 + 6 + 3, "version 3, expected instance 0 version 4"
    yield "ram-instance-1", h + _H.start(1, inst=1), 8 + 6 + 3, "instance 1"
    yield "vcpus-version-2", h + _H.full(5, ver=2), 8 + 6 + 14, "version 2"
    yield "empty-idstr", h + _H.start(1, b""), 8 + 5, "empty section idstr"
    yield "part-unknown-id", h + _H.part(9), 8, "section id 9"
    yield "part-after-end", PRELUDE + _H.end(1) + _H.eos + _H.footer(1) + _H.part(1), len(PRELUDE) + 18, "was ended"
    yield "part-of-full", h + _H.full(3) + b"\0\0\0\0" + _H.footer(3) + _H.part(3), 8 + 28 + 4 + 5, "section id 3"
    yield "duplicate-section-id", PRELUDE + _H.full(1), len(PRELUDE) + 1, "already in use"
    yield "second-ram-start", PRELUDE + _H.start(7), len(PRELUDE), "second 'ram' section"
    yield "footer-id-mismatch", P1 + _H.eos + _H.footer(2), B + 9, "read 2, expected 1"
    yield "footer-missing", P1 + _H.eos + b"\x00", B + 8, "missing footer for section 1"
    yield "stray-footer", h + _H.footer(1), 8, "FOOTER"
    yield "device-too-long", h + _H.full(3) + struct.pack(">I", 1 << 30), 8 + 28, "device state length"
    yield "xbzrle", P1 + _H.rec(0x40, 0, b"ram"), B, "XBZRLE"
    yield "hook", P1 + _H.rec(0x80, 0), B, "HOOK"
    yield "compress", P1 + _H.rec(0x100, 0), B, "COMPRESS_PAGE"
    yield "multifd-flush", P1 + _H.rec(0x200, 0), B, "MULTIFD_FLUSH"
    yield "flag-0x001", P1 + _H.rec(0x001, 0), B, "FULL"
    yield "zero-and-page", P1 + _H.rec(ZERO | PAGE, 0, b"ram"), B, "unknown or unsupported RAM flags ZERO|PAGE"
    yield "mem-size-continue", P1 + _H.rec(MEM_SIZE | CONT, PS), B, "MEM_SIZE|CONTINUE"
    yield "eos-continue", P1 + _H.rec(EOS | CONT, 0), B, "EOS|CONTINUE"
    yield "eos-with-offset", P1 + _H.rec(EOS, PS), B, "EOS record carries an offset"
    yield "unaligned-offset", P1 + _H.rec(PAGE, 0x400, b"ram"), B, "not page aligned"
    yield "zero-fill-nonzero", P1 + _H.zero(0, b"ram", fill=1), B + 12, "fill byte is 0x01"
    yield "offset-past-block", P1 + _H.page(RAM_BYTES, 1, b"ram"), B, "illegal RAM offset 0x10000 in block 'ram'"
    yield "offset-past-small-block", P1 + _H.zero(4 * PS, b"vga"), B, "illegal RAM offset"
    yield "huge-offset", P1 + _H.rec(PAGE, 1 << 62, b"ram"), B, "illegal RAM offset"
    yield "unknown-block", P1 + _H.page(0, 1, b"rom"), B + 8, "can't find block 'rom'"
    yield "continue-first", P1 + _H.page(0, 1), B, "CONTINUE flag before any RAM block was named"
    yield "page-before-mem-size", h + _H.start(1) + _H.page(0, 1, b"ram"), 8 + 17, "page record before MEM_SIZE"
    yield "second-mem-size", P1 + _H.mem_size([(b"ram", PS)]), B, "second MEM_SIZE"
    s = h + _H.start(1)
    yield "mem-size-sum-short", s + _H.mem_size([(b"ram", 2 * PS)], total=PS), 8 + 17 + 8 + 4, "exceed the MEM_SIZE total"
    yield "mem-size-dup", s + _H.mem_size([(b"ram", PS), (b"ram", PS)]), 8 + 17 + 8 + 12, "twice"
    yield "mem-size-zero-len", s + _H.mem_size([(b"ram", 0)], total=PS), 8 + 17 + 8 + 4, "not a positive page multiple"
    yield "mem-size-unaligned", s + _H.mem_size([(b"a", 100), (b"b", PS - 100)]), 8 + 17 + 8 + 2, "positive page multiple"
    yield "mem-size-empty-name", s + _H.mem_size([(b"", PS)]), 8 + 17 + 8, "empty RAM block idstr"
    yield "truncated-header", h[:5], 0, "truncated"
    yield "truncated-empty", b"", 0, "truncated"
    yield "truncated-page", P1 + _H.page(0, 1, b"ram")[:100], B, "truncated: EOF inside a PAGE record"
    yield "truncated-in-run", P1 + _H.page(0, 1, b"ram") + _H.page(PS, 2) + _H.page(2 * PS, 3)[:-1], B + (8 + 4 + PS) + (8 + PS), "truncated"
    yield "truncated-mem-size", h + _H.start(1) + _H.mem_size([(b"ram", PS)])[:-3], 8 + 17, "MEM_SIZE"
    yield "eof-inside-section", P1 + _H.eof, B, "truncated: EOF inside a RAM record header"
    yield "missing-eof", PRELUDE, len(PRELUDE), "truncated: EOF inside a section"


@pytest.mark.parametrize(("data", "offset", "fragment"), [m[1:] for m in _malformed()], ids=[m[0] for m in _malformed()])
def test_malformed_stream_is_rejected_with_offset(data, offset, fragment):
    with pytest.raises(RemoteProtocolError) as info:
        decode_all(data, max_block_bytes={"ram": RAM_BYTES, "vga": 4 * PS})
    assert fragment in str(info.value)
    assert info.value.offset == offset
    assert f"at stream offset {offset}" in str(info.value)
    # Same error, same offset, when the bytes trickle in one at a time.
    with pytest.raises(RemoteProtocolError) as info2:
        decode_all(data, cuts=range(1, len(data)), max_block_bytes={"ram": RAM_BYTES, "vga": 4 * PS})
    assert info2.value.offset == offset


def test_bad_record_inside_a_vectorised_run_is_reported_exactly():
    good = _H.page(0, 1, b"ram") + b"".join(_H.page(i * PS, i) for i in range(1, 6))
    bad = _H.page(RAM_BYTES + PS, 9)  # PAGE|CONTINUE past the block
    data = P1 + good + bad + b"".join(_H.page(i * PS, i) for i in range(6, 9))
    dec = StreamDecoder()
    dec.receive_data(data)
    seen = []
    with pytest.raises(RemoteProtocolError, match="illegal RAM offset") as info:
        while (ev := dec.next_event()) is not NEED_DATA:
            if isinstance(ev, RamPages):
                seen.extend(int(o) for o in ev.offsets)
    assert seen == [i * PS for i in range(6)]  # everything before the bad record, nothing after
    assert info.value.offset == B + len(good)
    with pytest.raises(RemoteProtocolError, match="failed earlier"):
        dec.next_event()  # the decoder stays dead


def test_mem_size_checked_against_destination_blocks():
    base = _H.header + _H.start(1)
    with pytest.raises(RemoteProtocolError, match="unknown ramblock 'vga'"):
        decode_all(base + _H.mem_size([(b"ram", PS), (b"vga", PS)]), max_block_bytes={"ram": PS})
    with pytest.raises(RemoteProtocolError, match="exceeds local size"):
        decode_all(base + _H.mem_size([(b"ram", 2 * PS)]), max_block_bytes={"ram": PS})
    events = decode_all(base + _H.mem_size([(b"ram", PS)]), max_block_bytes={"ram": 8 * PS}, close=False)
    assert events[-1] == RamMemSize((("ram", PS),))


def test_data_after_peer_eof_is_local_misuse():
    dec = StreamDecoder()
    dec.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        dec.receive_data(_H.header)
    with pytest.raises(LocalProtocolError):
        StreamDecoder().buffer_updated(1 << 40)


# -- encoder -----------------------------------------------------------------
def _ram(npages: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, (npages, PS), dtype=np.uint8)


def test_encoder_bytes_match_the_format():
    pages = _ram(4)
    pages[1] = 0
    enc = StreamEncoder()
    out = enc.header() + enc.configuration("pc") + enc.section_start(1, "ram", 0, 4)
    out += enc.ram_mem_size([("ram", 4 * PS)]) + enc.eos() + enc.section_footer(1) + enc.section_part(1)
    res = enc.ram_pages("ram", pages, np.array([3, 1, 0]))
    assert (res.normal, res.zero) == (2, 1)
    out += b"".join(bytes(b) for b in res.buffers) + enc.eos() + enc.section_footer(1)
    out += enc.section_full(2, "migrator-vcpus", 0, 1) + enc.device_state(b"xy") + enc.section_footer(2) + enc.eof()
    expected = _H.header + _H.conf() + _H.start(1) + _H.mem_size([(b"ram", 4 * PS)]) + _H.eos + _H.footer(1)
    expected += _H.part(1) + _H.zero(PS, b"ram")  # zero records first; the first names the block
    expected += _H.rec(PAGE | CONT, 3 * PS) + pages[3].tobytes() + _H.rec(PAGE | CONT, 0) + pages[0].tobytes()
    expected += _H.eos + _H.footer(1) + _H.full(2) + struct.pack(">I", 2) + b"xy" + _H.footer(2) + _H.eof
    assert out == expected
    assert res.nbytes == len(_H.zero(PS, b"ram")) + 2 * (8 + PS)


def test_encoder_names_block_on_switch_and_in_each_section():
    ram, vga = _ram(4, 1), _ram(2, 2)
    enc = StreamEncoder()
    enc.header()
    enc.section_start(1, "ram", 0, 4)
    enc.ram_mem_size([("ram", 4 * PS), ("vga", 2 * PS)])
    enc.eos()
    enc.section_footer(1)
    enc.section_part(1)
    # buffers are only valid until the next ram_pages call: read them at once
    first = [bytes(enc.ram_pages(*args).buffers[0][:8]) for args in (("ram", ram, [0, 1]), ("ram", ram, [2]), ("vga", vga, [1]))]
    assert first == [_H.rec(PAGE, 0), _H.rec(PAGE | CONT, 2 * PS), _H.rec(PAGE, PS)]
    enc.eos()
    enc.section_footer(1)
    enc.section_part(1)
    again = enc.ram_pages("vga", vga, [0])
    assert bytes(again.buffers[0][:8]) == _H.rec(PAGE, 0)  # new section: named again


def test_zero_detection_prefilter_does_not_misclassify():
    """A page whose first word is zero but not the rest must go as PAGE.

    Broken variant guarded against: classifying on the first word alone.
    """
    pages = np.zeros((600, PS), dtype=np.uint8)  # > one chunk: both code paths
    pages[5, PS - 1] = 1  # first word zero, last byte not
    pages[300, 8] = 0xFF
    pages[10, 0] = 3  # first word non-zero
    enc = StreamEncoder()
    stream = enc.header() + enc.section_start(1, "ram", 0, 4) + enc.ram_mem_size([("ram", 600 * PS)])
    res = enc.ram_pages("ram", pages, np.arange(600))
    assert (res.normal, res.zero) == (3, 597)
    broken = np.flatnonzero(pages.view(np.uint64)[:, 0] != 0)  # the first-word-only rule
    assert broken.tolist() == [10]  # would lose pages 5 and 300
    stream += b"".join(bytes(b) for b in res.buffers) + enc.eos() + enc.section_footer(1) + enc.eof()
    dec = StreamDecoder()
    dec.receive_data(stream)
    dec.receive_data(b"")
    got = np.zeros_like(pages)
    zero_seen = 0
    while not isinstance(ev := dec.next_event(), EndOfStream):
        if isinstance(ev, RamPages):
            got[(ev.offsets // PS).astype(np.intp)] = ev.data
        elif isinstance(ev, RamZeroPages):
            zero_seen += len(ev.offsets)
    np.testing.assert_equal(got, pages)
    assert zero_seen == 597


def test_encoder_detect_zero_off_and_guest_ram_untouched():
    pages = _ram(300, 3)
    pages[::2] = 0
    before = pages.copy()
    enc = StreamEncoder()
    enc.header()
    enc.section_start(1, "ram", 0, 4)
    enc.ram_mem_size([("ram", 300 * PS)])
    res = enc.ram_pages("ram", pages, np.arange(299, -1, -1), detect_zero=False)
    assert (res.normal, res.zero) == (300, 0)
    np.testing.assert_equal(pages, before)
    first = bytes(res.buffers[0]) + bytes(res.buffers[1][: 1 + 8 + PS])
    assert first[:8] == _H.rec(PAGE, 299 * PS)[:8]
    assert res.nbytes == 300 * (8 + PS) + 4


def test_encoder_staging_is_reused():
    pages = _ram(8)
    enc = StreamEncoder()
    enc.header()
    enc.section_start(1, "ram", 0, 4)
    enc.ram_mem_size([("ram", 8 * PS)])
    a = enc.ram_pages("ram", pages, [0, 1, 2])
    a_recs = np.frombuffer(a.buffers[-1], np.uint8)
    b = enc.ram_pages("ram", pages, [3, 4])
    assert np.shares_memory(a_recs, np.frombuffer(b.buffers[-1], np.uint8))  # no new allocation


@pytest.mark.parametrize(
    "misuse",
    [
        lambda e: e.configuration("pc"),  # before the header
        lambda e: (e.header(), e.header()),
        lambda e: (e.header(), e.section_part(1)),
        lambda e: (e.header(), e.section_start(1, "timer", 0, 1)),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.section_footer(1)),  # footer before EOS
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS)]), e.eos(), e.section_footer(2)),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_pages("ram", _ram(1), [0])),  # before MEM_SIZE
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", 100)])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS), ("ram", PS)])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS)]), e.ram_pages("vga", _ram(1), [0])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS)]), e.ram_pages("ram", _ram(1), [1])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS)]), e.ram_pages("ram", _ram(1), [-1])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", 2 * PS)]), e.ram_pages("ram", _ram(1), [0])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", 2 * PS)]), e.ram_pages("ram", _ram(4)[::2], [0])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.ram_mem_size([("ram", PS)]), e.ram_pages("ram", _ram(1), [0.5])),
        lambda e: (e.header(), e.section_start(1, "ram", 0, 4), e.eof()),  # EOF inside a RAM payload
        lambda e: (e.header(), e.section_full(1, "migrator-vcpus", 0, 1), e.eos()),
        lambda e: (e.header(), e.section_full(1, "migrator-vcpus", 0, 1), e.device_state(b""), e.section_footer(1), e.section_full(1, "migrator-vcpus", 0, 1)),
        lambda e: (e.header(), e.eof(), e.eof()),
    ],
)
def test_encoder_misuse_raises_local_protocol_error(misuse):
    with pytest.raises(LocalProtocolError):
        misuse(StreamEncoder())


def test_errors_share_one_root():
    assert issubclass(RemoteProtocolError, ProtocolError) and issubclass(LocalProtocolError, ProtocolError)
