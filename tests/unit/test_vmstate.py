"""QEMU device sections and the VM description (transport._vmstate, encoder, decoder).

The byte layouts below are the ones a stock QEMU 7.2 ``-M none`` wrote
(captured by hand with ``migrate exec:cat > file``; the integration tests
capture them live when QEMU is installed).
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from transport import (
    EndOfStream,
    LocalProtocolError,
    RemoteProtocolError,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
    VMStateSection,
)
from transport import _vmstate as vms

PS = 4096
NPAGES = 8
#: QEMU 7.2's description of a -M none stream with a -netdev user (verbatim).
QEMU72_VMDESC = (
    b'{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", '
    b'"version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, {"name": '
    b'"unused", "type": "unused_buffer", "size": 8}, {"name": "cpu_clock_offset", "type": "int64", '
    b'"size": 8}]}, {"name": "slirp", "instance_id": 0, "size": 131, "fields": [{"name": "data", '
    b'"size": 131, "type": "buffer"}]}, {"name": "globalstate", "instance_id": 0, "vmsd_name": '
    b'"globalstate", "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, '
    b'{"name": "runstate", "type": "buffer", "size": 100}]}]}'
)
TIMER = bytes.fromhex("00000000b57c50d0" "0000000000000000" "0000000045e80ed4")
SLIRP = bytes(131)
GLOBALSTATE = bytes.fromhex("00000008") + b"running".ljust(100, b"\0")


def _stream(devices: list[tuple[str, int, bytes]], *, machine: str = "none", vcpus: bytes | None = None,
            describe: bool = True) -> tuple[bytes, StreamEncoder]:
    enc = StreamEncoder()
    pages = np.zeros((NPAGES, PS), dtype=np.uint8)
    pages[3] = 7
    out = [enc.header(), enc.configuration(machine), enc.section_start(2, "ram", 0, 4),
           enc.ram_mem_size([("ram", NPAGES * PS)]), enc.eos(), enc.section_footer(2), enc.section_end(2)]
    out += [bytes(b) for b in enc.ram_pages("ram", pages, np.arange(NPAGES)).buffers]
    out += [enc.eos(), enc.section_footer(2)]
    sid = 3
    for idstr, version, payload in devices:
        out += [enc.section_full(sid, idstr, 0, version), enc.vmstate(payload), enc.section_footer(sid)]
        sid += 1
    if vcpus is not None:
        out += [enc.section_full(sid, "migrator-vcpus", 0, 1), enc.device_state(vcpus), enc.section_footer(sid)]
    out.append(enc.eof())
    if describe:
        out.append(enc.vmdescription())
    return b"".join(out), enc


def _decode(data: bytes, chunk: int | None = None) -> tuple[list, StreamDecoder]:
    dec = StreamDecoder(max_block_bytes={"ram": NPAGES * PS})
    events = []
    step = chunk or len(data)
    for i in range(0, len(data), step):
        dec.receive_data(data[i:i + step])
        while (ev := dec.next_event()).__class__.__name__ != "_Sentinel":
            events.append(ev)
    dec.receive_data(b"")
    while (ev := dec.next_event()).__class__.__name__ not in ("_Sentinel", "ConnectionClosed"):
        events.append(ev)
    return events, dec


QEMU_DEVICES = [("timer", 2, TIMER), ("slirp", 4, SLIRP), ("globalstate", 1, GLOBALSTATE)]


def test_our_description_of_qemu_sections_is_byte_for_byte_qemus():
    """Writing QEMU's three -M none sections gives QEMU 7.2's JSON, plus the
    configuration entry QEMU >= 8.2 puts first."""
    data, _ = _stream(QEMU_DEVICES)
    raw = data[data.rindex(b"\x06\x00\x00") + 5:]
    desc = json.loads(raw)
    assert list(desc) == ["configuration", "page_size", "devices"]
    assert desc["configuration"] == {"vmsd_name": "configuration", "version": 1, "fields": [
        {"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": 4}]}
    del desc["configuration"]
    assert json.dumps(desc).encode() == QEMU72_VMDESC


@pytest.mark.parametrize("chunk", [None, 1, 7, 1000])
def test_decoder_reads_qemu_sections_and_checks_the_description(chunk):
    data, _ = _stream(QEMU_DEVICES)
    events, dec = _decode(data, chunk)
    secs = [e for e in events if isinstance(e, VMStateSection)]
    assert [(s.idstr, s.version_id, s.data) for s in secs] == [(i, v, p) for i, v, p in QEMU_DEVICES]
    assert isinstance(events[-1], VMDescription)
    assert [d["name"] for d in dec.vmdesc["devices"]] == ["timer", "slirp", "globalstate"]


def test_a_qemu_72_description_without_configuration_is_accepted():
    data, _ = _stream(QEMU_DEVICES, describe=False)
    data += b"\x06" + struct.pack(">I", len(QEMU72_VMDESC)) + QEMU72_VMDESC
    events, _ = _decode(data)
    assert events[-1] == VMDescription(QEMU72_VMDESC)


def test_the_description_is_checked_against_the_sections_written():
    """A description of other sections (here: QEMU's, for a stream without slirp) is refused."""
    data, _ = _stream([("timer", 2, TIMER), ("globalstate", 1, GLOBALSTATE)], describe=False)
    data += b"\x06" + struct.pack(">I", len(QEMU72_VMDESC)) + QEMU72_VMDESC
    with pytest.raises(RemoteProtocolError, match=r"lists 3 devices \['timer', 'slirp', 'globalstate'\]"):
        _decode(data)


def test_timer_icount_subsections_are_walked_and_described():
    sub = (b"\x05" + bytes([len(b"timer/icount")]) + b"timer/icount" + struct.pack(">I", 1) + bytes(16)
           + b"\x05" + bytes([len(b"timer/icount/shift")]) + b"timer/icount/shift" + struct.pack(">I", 2)
           + bytes(10))
    data, _ = _stream([("timer", 2, TIMER + sub), ("globalstate", 1, GLOBALSTATE)])
    events, dec = _decode(data, 5)
    assert next(e for e in events if isinstance(e, VMStateSection)).data == TIMER + sub
    timer = dec.vmdesc["devices"][0]
    assert [s["vmsd_name"] for s in timer["subsections"]] == ["timer/icount"]
    assert [s["vmsd_name"] for s in timer["subsections"][0]["subsections"]] == ["timer/icount/shift"]
    assert vms.described_size(timer) == len(TIMER + sub)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (TIMER + b"\x05\x05bogus" + bytes(4), "unknown subsection 'bogus' in section 'timer'"),
        (TIMER + b"\x05\x0ctimer/icount" + struct.pack(">I", 9) + bytes(16), "subsection 'timer/icount' version 9"),
    ],
    ids=["unknown-subsection", "subsection-version"],
)
def test_bad_subsections_are_named(payload, match):
    with pytest.raises(LocalProtocolError, match=match):
        _stream([("timer", 2, payload)])
    good, _ = _stream([("timer", 2, TIMER)], describe=False)
    bad = good.replace(TIMER, payload)
    with pytest.raises(RemoteProtocolError, match=match) as info:
        _decode(bad)
    assert info.value.offset == good.index(TIMER) + len(TIMER)


def test_slirp_with_sockets_is_refused_by_name():
    good, _ = _stream([("slirp", 4, SLIRP)], describe=False)
    bad = good.replace(b"\x05slirp" + struct.pack(">II", 0, 4) + b"\x00", b"\x05slirp" + struct.pack(">II", 0, 4) + b"\x2a")
    with pytest.raises(RemoteProtocolError, match="slirp state with guestfwd sockets"):
        _decode(bad)


def test_unknown_device_section_is_an_error_naming_it():
    good, _ = _stream([("timer", 2, TIMER)], describe=False)
    bad = good.replace(b"\x05timer", b"\x05tomer")
    with pytest.raises(RemoteProtocolError, match="unknown savevm section or instance 'tomer' 0"):
        _decode(bad)
    enc = StreamEncoder()
    enc.header(), enc.configuration("none")
    with pytest.raises(LocalProtocolError, match="no full section 'tomer'"):
        enc.section_full(3, "tomer", 0, 2)


def test_wrong_section_version_is_refused():
    good, _ = _stream([("timer", 2, TIMER)], describe=False)
    bad = good.replace(b"\x05timer" + struct.pack(">II", 0, 2), b"\x05timer" + struct.pack(">II", 0, 1))
    with pytest.raises(RemoteProtocolError, match="section 'timer': instance 0 version 1, expected instance 0 version 2"):
        _decode(bad)


def test_truncated_qemu_section():
    data, _ = _stream([("globalstate", 1, GLOBALSTATE)], describe=False)
    cut = data.index(GLOBALSTATE) + 50
    with pytest.raises(RemoteProtocolError, match="EOF inside section 'globalstate'"):
        _decode(data[:cut])


def test_encoder_refuses_a_payload_that_does_not_fit_its_layout():
    with pytest.raises(LocalProtocolError, match="does not fit its layout"):
        _stream([("globalstate", 1, GLOBALSTATE[:-1])])
    with pytest.raises(LocalProtocolError, match="does not fit its layout"):
        _stream([("globalstate", 1, GLOBALSTATE + b"\0")])


def test_description_of_our_vcpu_section_and_ram_only():
    data, _ = _stream([], vcpus=b"hello")
    events, dec = _decode(data)
    assert dec.vmdesc["devices"] == [{"name": "migrator-vcpus", "instance_id": 0, "vmsd_name": "migrator-vcpus",
                                      "version": 1, "fields": [{"name": "length", "type": "uint32", "size": 4},
                                                               {"name": "state", "type": "buffer", "size": 5}]}]
    data, _ = _stream([])
    events, dec = _decode(data)
    assert dec.vmdesc["devices"] == [] and isinstance(events[-2], EndOfStream)


def test_vmdescription_only_after_eof_and_once():
    enc = StreamEncoder()
    enc.header()
    with pytest.raises(LocalProtocolError, match="VM description is not allowed now"):
        enc.vmdescription()
    enc.eof()
    enc.vmdescription()
    with pytest.raises(LocalProtocolError, match="VM description is not allowed now"):
        enc.vmdescription()


@pytest.mark.parametrize("state", ["running", "paused", "prelaunch", "postmigrate"])
def test_globalstate_round_trip(state):
    assert vms.decode_globalstate(vms.encode_globalstate(state)) == state


def test_globalstate_validation():
    with pytest.raises(ValueError, match="unknown run state 'runnin'"):
        vms.decode_globalstate(struct.pack(">I", 7) + b"runnin".ljust(100, b"\0"))
    with pytest.raises(ValueError, match="exceeds its 100-byte buffer"):
        vms.decode_globalstate(struct.pack(">I", 101) + b"running".ljust(100, b"\0"))
    with pytest.raises(ValueError, match="not a QEMU run state"):
        vms.encode_globalstate("jogging")
    assert vms.encode_globalstate("running") == GLOBALSTATE
    assert vms.decode_timer(TIMER) == (0xB57C50D0, 0x45E80ED4)
    assert vms.encode_timer(0xB57C50D0, 0x45E80ED4) == TIMER
