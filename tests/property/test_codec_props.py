"""Hypothesis properties of the migration stream codec.

* decode(encode(x)) == x for random streams: blocks, pages zero / non-zero
  (including pages whose first word is zero), several sections, device state;
* any split of the byte stream gives the same events (page runs compared
  page by page: grouping is not part of the contract);
* random garbage and random mutations of a valid stream only ever raise
  ``ProtocolError`` (never IndexError, ValueError, struct.error...), and no
  page event ever addresses memory outside the destination's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transport import (
    NEED_DATA,
    Configuration,
    ConnectionClosed,
    DeviceState,
    EndOfStream,
    ProtocolError,
    RamEOS,
    RamMemSize,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionPart,
    SectionStart,
    StreamDecoder,
    StreamEncoder,
    StreamHeader,
)
from transport.testing import decode_all, expand_pages

PS = 4096
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _page(kind: str, v: int) -> np.ndarray:
    """Page contents from a small description (cheap to generate and shrink)."""
    p = np.zeros(PS, dtype=np.uint8)
    if kind == "fill":
        p[:] = v | 1
    elif kind == "firstword0":  # defeats a first-word-only zero check
        p[8 + v * 13 % (PS - 8)] = v | 1
    elif kind == "random":
        p[:] = np.random.default_rng(v).integers(0, 256, PS, dtype=np.uint8)
    return p


@dataclass
class Call:
    block: int
    pages: list[tuple[int, str, int]]  # (page index, kind, value)


@dataclass
class Model:
    machine: str | None
    names: list[str]
    sizes: list[int]  # pages
    ram_sid: int
    dev_sid: int
    parts: list[list[Call]]  # the last part goes in the END section
    device: bytes | None
    detect_zero: bool


@st.composite
def models(draw: st.DrawFn) -> Model:
    names = draw(st.lists(st.text("abcxyz.:/0", min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
    sizes = [draw(st.integers(1, 6)) for _ in names]
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        calls = []
        for _ in range(draw(st.integers(0, 3))):
            b = draw(st.integers(0, len(names) - 1))
            idx = draw(st.lists(st.integers(0, sizes[b] - 1), unique=True, max_size=sizes[b]))
            kinds = st.sampled_from(["zero", "fill", "firstword0", "random"])
            calls.append(Call(b, [(i, draw(kinds), draw(st.integers(0, 255))) for i in idx]))
        parts.append(calls)
    ram_sid = draw(st.integers(0, 2**32 - 1))
    dev_sid = draw(st.integers(0, 2**32 - 1).filter(lambda s: s != ram_sid))
    return Model(
        machine=draw(st.none() | st.text(max_size=12)),
        names=names,
        sizes=sizes,
        ram_sid=ram_sid,
        dev_sid=dev_sid,
        parts=parts,
        device=draw(st.none() | st.binary(max_size=64)),
        detect_zero=draw(st.booleans()),
    )


def encode(m: Model) -> bytes:
    enc = StreamEncoder()
    guest = [np.zeros((n, PS), dtype=np.uint8) for n in m.sizes]
    out = [enc.header()]
    if m.machine is not None:
        out.append(enc.configuration(m.machine))
    out += [enc.section_start(m.ram_sid, "ram", 0, 4)]
    out += [enc.ram_mem_size(zip(m.names, [n * PS for n in m.sizes])), enc.eos(), enc.section_footer(m.ram_sid)]
    for i, calls in enumerate(m.parts):
        last = i == len(m.parts) - 1
        out.append(enc.section_end(m.ram_sid) if last else enc.section_part(m.ram_sid))
        for c in calls:
            for idx, kind, v in c.pages:  # the guest changes between calls
                guest[c.block][idx] = _page(kind, v)
            res = enc.ram_pages(m.names[c.block], guest[c.block], [p[0] for p in c.pages], detect_zero=m.detect_zero)
            out += [bytes(b) for b in res.buffers]  # valid until the next call: copy now
        out += [enc.eos(), enc.section_footer(m.ram_sid)]
    if m.device is not None:
        out += [enc.section_full(m.dev_sid, "migrator-vcpus", 0, 1), enc.device_state(m.device)]
        out.append(enc.section_footer(m.dev_sid))
    out.append(enc.eof())
    return b"".join(out)


def expected_events(m: Model) -> list:
    """The events the spec promises, written from the model (not the encoder).

    Documented order inside one ram_pages call: ZERO records first, then PAGE
    records, each in call order.
    """
    ev: list = [StreamHeader(3)]
    if m.machine is not None:
        ev.append(Configuration(m.machine))
    ev += [SectionStart(m.ram_sid, "ram", 0, 4), RamMemSize(tuple(zip(m.names, [n * PS for n in m.sizes])))]
    ev += [RamEOS(), SectionFooter(m.ram_sid)]
    for i, calls in enumerate(m.parts):
        ev.append(SectionEnd(m.ram_sid) if i == len(m.parts) - 1 else SectionPart(m.ram_sid))
        for c in calls:
            name = m.names[c.block]
            pages = [(idx, _page(kind, v)) for idx, kind, v in c.pages]
            is_zero = [m.detect_zero and not p.any() for _, p in pages]
            ev += [("zero", name, idx * PS) for (idx, _), z in zip(pages, is_zero) if z]
            ev += [("page", name, idx * PS, p.tobytes()) for (idx, p), z in zip(pages, is_zero) if not z]
        ev += [RamEOS(), SectionFooter(m.ram_sid)]
    if m.device is not None:
        ev += [SectionFull(m.dev_sid, "migrator-vcpus", 0, 1), DeviceState(m.device), SectionFooter(m.dev_sid)]
    return [*ev, EndOfStream(), ConnectionClosed()]


@SETTINGS
@given(models())
def test_decode_encode_roundtrip(m):
    assert expand_pages(decode_all(encode(m))) == expected_events(m)


@SETTINGS
@given(models(), st.data())
def test_any_split_gives_the_same_events(m, data):
    stream = encode(m)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=40))
    whole = expand_pages(decode_all(stream))
    assert expand_pages(decode_all(stream, cuts=cuts)) == whole


def _decode_safely(data: bytes, cuts: list[int], limits: dict[str, int] | None) -> None:
    """Decode; allow only ProtocolError; check every page event stays inside RAM."""
    dec = StreamDecoder(max_block_bytes=limits)
    declared: dict[str, int] = {}
    bounds = [0, *sorted(set(cuts)), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a] + [b""]  # b"": EOF
    try:
        for piece in pieces:
            dec.receive_data(piece)
            while (ev := dec.next_event()) is not NEED_DATA:
                if isinstance(ev, RamMemSize):
                    declared = dict(ev.blocks)
                elif isinstance(ev, (RamPages, RamZeroPages)):
                    limit = declared[ev.block]
                    if limits is not None:
                        assert limit <= limits[ev.block]
                    assert ev.offsets.dtype == np.uint64
                    assert (ev.offsets < limit).all() and not (ev.offsets % PS).any()
                    if isinstance(ev, RamPages):
                        assert ev.data.shape == (len(ev.offsets), PS)
                elif isinstance(ev, ConnectionClosed):
                    return
    except ProtocolError:
        return


@SETTINGS
@given(st.binary(max_size=2000), st.booleans(), st.lists(st.integers(1, 1999), max_size=5))
def test_garbage_only_raises_protocol_error(junk, with_header, cuts):
    prefix = StreamEncoder().header() if with_header else b""
    data = prefix + junk
    _decode_safely(data, [c for c in cuts if c < len(data)], None)
    _decode_safely(data, [], {"ram": 4 * PS})


@settings(SETTINGS, max_examples=400)
@given(models(), st.data())
def test_mutated_stream_only_raises_protocol_error(m, data):
    stream = bytearray(encode(m))
    n = len(stream)
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["header", "set", "flip", "delete", "insert", "truncate"]))
        at = data.draw(st.integers(0, max(0, len(stream) - 1)))
        if op == "header":
            # Aim at RAM record headers (uniform positions rarely hit them):
            # 8-byte words whose low byte looks like ZERO/PAGE(|CONTINUE).
            raw = np.frombuffer(bytes(stream), np.uint8)
            low = np.isin(raw[7:], [0x02, 0x08, 0x22, 0x28])
            high_zero = (raw[:-7] == 0) & (raw[1:-6] == 0) & (raw[2:-5] == 0) & (raw[3:-4] == 0)
            heads = np.flatnonzero(low & high_zero)
            if heads.size:
                base = int(heads[data.draw(st.integers(0, heads.size - 1))])
                stream[base + data.draw(st.integers(0, 7))] = data.draw(st.integers(0, 255))
        elif op == "set" and stream:
            stream[at] = data.draw(st.integers(0, 255))
        elif op == "flip" and stream:
            stream[at] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "delete":
            del stream[at : at + data.draw(st.integers(1, 16))]
        elif op == "insert":
            stream[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del stream[at:]
    cuts = [c for c in data.draw(st.lists(st.integers(1, max(1, n)), max_size=4)) if c < len(stream)]
    limits = dict(zip(m.names, [s * PS for s in m.sizes]))
    _decode_safely(bytes(stream), cuts, limits)
    _decode_safely(bytes(stream), [], None)
