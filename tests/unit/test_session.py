"""The stream sessions (transport._session): the return-path decision, section
order on both ends, EOF and the return-path messages, sans-IO."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from transport import (MACHINE_NAME, NEED_DATA, RAM_SECTION_IDSTR, RAM_SECTION_VERSION, VCPU_SECTION_IDSTR,
                       VCPU_SECTION_VERSION, ConnectionClosed, DestinationSession, DeviceState, EndOfStream,
                       GoAhead, Loaded, LocalProtocolError, NoGo, PeerClosed, RamEOS, RamMemSize, RamPages,
                       RamZeroPages, RemoteProtocolError, ReturnPath, Shut, SourceSession, StreamEncoder,
                       StreamKind, VMDescription, VMStateSection, decide_return_path, encode_go, encode_loaded,
                       encode_nogo, encode_shut)
from transport._vmstate import KNOWN_SECTIONS

NATIVE, RAM_ONLY, QEMU_DEVICES = StreamKind.NATIVE, StreamKind.RAM_ONLY, StreamKind.QEMU_DEVICES
CHANNELS = {"tcp": "tcp:127.0.0.1:4444", "unix": "unix:/tmp/mig.sock", "file": "file:/tmp/mig.stream"}
PAGES = np.zeros((4, 4096), dtype=np.uint8)
PAGES[1, :3] = (1, 2, 3)

#: The table of the session module's essay, written out case by case: a
#: return path needs a socket and a stream only our destination loads.
EXPECTED = {
    (NATIVE, "tcp", False): ReturnPath.SHUT,
    (NATIVE, "tcp", True): ReturnPath.HANDOVER,
    (NATIVE, "unix", False): ReturnPath.SHUT,
    (NATIVE, "unix", True): ReturnPath.HANDOVER,
    (NATIVE, "file", False): ReturnPath.NONE,
    (NATIVE, "file", True): ReturnPath.NONE,
    **{(kind, ch, h): ReturnPath.NONE
       for kind in (RAM_ONLY, QEMU_DEVICES) for ch in CHANNELS for h in (False, True)},
}
CASES = sorted(EXPECTED, key=lambda k: (k[0].value, k[1], k[2]))


def _id(case) -> str:
    kind, ch, handover = case
    return f"{kind.value}-{ch}-{'handover' if handover else 'plain'}"


def qemu_payload(idstr: str) -> bytes:
    """A valid payload of a QEMU device section (the shape _qemu_devices writes)."""
    from migrator.engine._qemu_devices import QemuDeviceState

    return dict(QemuDeviceState().sections(ran_ns=0, runstate="running"))[idstr]


def source_stream(session: SourceSession, *, parts: int = 1) -> bytes:
    """A whole stream through ``session``: START, ``parts`` PARTs, END, devices, EOF."""
    out = bytearray(session.open() + session.ram_start([("ram", PAGES.nbytes)]) + session.ram_close())
    for _ in range(parts):
        out += session.ram_part()
        for buf in session.ram_pages("ram", PAGES, np.arange(2)).buffers:
            out += bytes(buf)
        out += session.ram_close()
    out += session.ram_end()
    for buf in session.ram_pages("ram", PAGES, np.arange(2, 4)).buffers:
        out += bytes(buf)
    out += session.ram_close()
    if session.kind is NATIVE:
        out += session.device_state(b'{"running": true}\nvcpus')
    elif session.kind is QEMU_DEVICES:
        for idstr in ("timer", "globalstate"):
            out += session.qemu_device(idstr, qemu_payload(idstr))
    out += session.eof()
    return bytes(out)


def drain(dest: DestinationSession, data: bytes, *, step: int | None = None) -> list:
    """Feed ``data`` (whole, or ``step`` bytes at a time) and collect events until NEED_DATA."""
    events = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        dest.receive_data(chunk)
        while (event := dest.next_event()) is not NEED_DATA:
            events.append(event)
    return events


# -- the decision ------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_return_path_decision_table(case):
    kind, ch, handover = case
    assert decide_return_path(kind, CHANNELS[ch], handover=handover) is EXPECTED[case]
    assert SourceSession(kind, CHANNELS[ch], handover=handover).return_path is EXPECTED[case]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_destination_reaches_the_same_decision_from_the_stream(case):
    """The destination cannot be told the kind: it learns it from the sections
    and must end with the source's decision, or one side waits for a message
    the other never sends."""
    kind, ch, handover = case
    stream = source_stream(SourceSession(kind, CHANNELS[ch], handover=handover))
    dest = DestinationSession(CHANNELS[ch], handover=handover)
    events = drain(dest, stream)
    assert isinstance(events[-1], VMDescription) and isinstance(events[-2], EndOfStream)
    assert dest.kind is kind and dest.return_path is EXPECTED[case]


def test_one_byte_at_a_time_gives_the_same_payload_events():
    stream = source_stream(SourceSession(NATIVE, CHANNELS["tcp"]), parts=2)
    whole = drain(DestinationSession(CHANNELS["tcp"]), stream)
    kinds = [type(e) for e in whole]
    assert kinds.count(RamEOS) == 4 and kinds.count(DeviceState) == 1 and RamMemSize in kinds
    bytewise = drain(DestinationSession(CHANNELS["tcp"]), stream, step=1)

    def pages(events):  # page events may be grouped differently: compare the pages
        out = []
        for e in events:
            if isinstance(e, RamPages | RamZeroPages):
                out += [(type(e).__name__, int(o)) for o in e.offsets]
            else:
                out.append(e)
        return out

    assert pages(bytewise) == pages(whole)


# -- the source refuses what the grammar forbids -----------------------------------
def test_source_refuses_sections_out_of_order():
    s = SourceSession(NATIVE, CHANNELS["tcp"])
    with pytest.raises(LocalProtocolError):
        s.ram_start([("ram", PAGES.nbytes)])  # before the header
    s.open()
    with pytest.raises(LocalProtocolError):
        s.ram_part()  # before START
    s.ram_start([("ram", PAGES.nbytes)])
    with pytest.raises(LocalProtocolError):
        s.ram_part()  # START is still open
    s.ram_close()
    with pytest.raises(LocalProtocolError):
        s.device_state(b"x")  # before the END section
    with pytest.raises(LocalProtocolError):
        s.eof()  # before the END section
    s.ram_end()
    s.ram_close()
    with pytest.raises(LocalProtocolError):
        s.ram_part()  # after END
    with pytest.raises(LocalProtocolError):
        s.qemu_device("timer", qemu_payload("timer"))  # not in a native stream
    with pytest.raises(LocalProtocolError):
        s.eof()  # a native stream needs its device section
    s.device_state(b"x")
    with pytest.raises(LocalProtocolError):
        s.device_state(b"x")  # once
    s.eof()


def test_source_refuses_a_second_eof_and_keeps_its_count():
    s = SourceSession(RAM_ONLY, CHANNELS["file"])
    stream = source_stream(s)
    assert s.bytes_out == len(stream)
    with pytest.raises(LocalProtocolError):
        s.eof()
    assert s.bytes_out == len(stream)


def test_ram_only_stream_carries_no_device_section():
    s = SourceSession(RAM_ONLY, CHANNELS["tcp"])
    s.open()
    s.ram_start([("ram", PAGES.nbytes)])
    s.ram_close()
    s.ram_end()
    s.ram_close()
    with pytest.raises(LocalProtocolError):
        s.device_state(b"x")
    with pytest.raises(LocalProtocolError):
        s.qemu_device("timer", qemu_payload("timer"))
    s.eof()
    with pytest.raises(LocalProtocolError):
        s.receive_data(encode_shut(0))  # no return path: nothing to read


# -- the destination refuses what the grammar forbids ---------------------------
def _raw_stream(*, device_before_end: bool = False, skip_end: bool = False, twice: bool = False,
                machine: str = MACHINE_NAME) -> bytes:
    """A stream written with the bare encoder, which allows these orders."""
    enc = StreamEncoder()
    out = enc.header() + enc.configuration(machine)
    out += enc.section_start(1, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION) + enc.ram_mem_size([("ram", 16384)])
    out += enc.eos() + enc.section_footer(1)

    def device(sid: int) -> bytes:
        return (enc.section_full(sid, VCPU_SECTION_IDSTR, 0, VCPU_SECTION_VERSION) + enc.device_state(b"x")
                + enc.section_footer(sid))

    if device_before_end:
        out += device(2)
    if not skip_end:
        out += enc.section_end(1) + enc.eos() + enc.section_footer(1)
    if not device_before_end and not skip_end:
        out += device(2)
    if twice:
        out += device(3)
    return out + enc.eof()


@pytest.mark.parametrize("stream, match", [
    (_raw_stream(device_before_end=True), "before the final RAM section"),
    (_raw_stream(skip_end=True), "stream ended before the final RAM section"),
    (_raw_stream(twice=True), "appears twice"),
    (_raw_stream(machine="pc"), "Machine type received is 'pc' and local is 'none'"),
], ids=["device-before-end", "eof-before-end", "device-twice", "machine"])
def test_destination_refuses_a_section_out_of_order(stream, match):
    dest = DestinationSession(CHANNELS["tcp"])
    with pytest.raises(RemoteProtocolError, match=match) as info:
        drain(dest, stream)
    assert 0 <= info.value.offset < len(stream)


def test_destination_refuses_a_second_eof():
    stream = source_stream(SourceSession(NATIVE, CHANNELS["tcp"]))
    dest = DestinationSession(CHANNELS["tcp"])
    drain(dest, stream)
    with pytest.raises(RemoteProtocolError, match="data after the end of the stream"):
        drain(dest, b"\x00")  # a second QEMU_VM_EOF


def test_closed_after_eof_without_description():
    enc_stream = _raw_stream()
    dest = DestinationSession(CHANNELS["tcp"])
    assert isinstance(drain(dest, enc_stream)[-1], EndOfStream)
    dest.receive_data(b"")
    assert isinstance(dest.next_event(), ConnectionClosed)
    dest.end_stream()
    assert isinstance(dest.next_event(), PeerClosed)


# -- SHUT, LOADED, GO, NOGO ---------------------------------------------------------
def test_destination_refuses_shut0_before_eof_but_tells_a_failure():
    stream = source_stream(SourceSession(NATIVE, CHANNELS["tcp"]))
    dest = DestinationSession(CHANNELS["tcp"])
    drain(dest, stream[:len(stream) // 2])
    with pytest.raises(LocalProtocolError, match="SHUT"):
        dest.shut(0)
    assert dest.shut(1) == encode_shut(1)  # a failure may be told at any time on a socket
    assert DestinationSession(CHANNELS["file"]).shut(1) == b""  # nobody reads a file's return path


def test_source_refuses_shut0_before_its_eof():
    s = SourceSession(NATIVE, CHANNELS["tcp"])
    s.open()
    s.receive_data(encode_shut(1))
    assert s.next_event() == Shut(1)  # a failed destination may say so early
    s.receive_data(encode_shut(0))
    with pytest.raises(RemoteProtocolError, match="before the end of the stream"):
        s.next_event()


def test_handover_exchange_both_ends():
    src = SourceSession(NATIVE, CHANNELS["unix"], handover=True)
    dest = DestinationSession(CHANNELS["unix"], handover=True)
    drain(dest, source_stream(src))
    dest.end_stream()
    loaded = dest.loaded()
    assert loaded == encode_loaded(src.bytes_out) and dest.stream_bytes == src.bytes_out
    with pytest.raises(LocalProtocolError):
        src.go()  # not before LOADED
    src.receive_data(loaded)
    assert src.next_event() == Loaded(src.bytes_out)
    go = src.go()
    assert go == encode_go(src.bytes_out) and src.nogo() == b""  # after GO: never NOGO
    dest.receive_data(go[:5])
    assert dest.next_event() is NEED_DATA
    dest.receive_data(go[5:])
    assert dest.next_event() == GoAhead(src.bytes_out)
    src.receive_data(dest.shut(0))
    assert src.next_event() == Shut(0)


def test_counts_must_match_and_nogo_only_when_someone_waits():
    src = SourceSession(NATIVE, CHANNELS["tcp"], handover=True)
    stream = source_stream(src)
    src.receive_data(encode_loaded(len(stream) - 1))
    with pytest.raises(RemoteProtocolError, match="destination loaded"):
        src.next_event()
    dest = DestinationSession(CHANNELS["tcp"], handover=True)
    drain(dest, stream)
    dest.end_stream()
    dest.receive_data(encode_go(len(stream)))
    with pytest.raises(RemoteProtocolError, match="before this destination reported LOADED"):
        dest.next_event()
    dest = DestinationSession(CHANNELS["tcp"], handover=True)
    drain(dest, stream)
    dest.end_stream()
    dest.loaded()
    dest.receive_data(encode_go(len(stream) + 1))
    with pytest.raises(RemoteProtocolError, match="go-ahead for"):
        dest.next_event()
    waiting = SourceSession(NATIVE, CHANNELS["tcp"], handover=True)
    assert waiting.nogo() == b""  # before EOF no destination waits for our word
    source_stream(waiting)
    assert waiting.nogo() == encode_nogo()
    assert SourceSession(NATIVE, CHANNELS["tcp"]).nogo() == b""  # without x-handover, never


def test_no_handover_message_without_x_handover():
    for kind, ch, handover in itertools.product((NATIVE, RAM_ONLY), ("tcp", "file"), (False, True)):
        dest = DestinationSession(CHANNELS[ch], handover=handover)
        drain(dest, source_stream(SourceSession(kind, CHANNELS[ch], handover=handover)))
        dest.end_stream()
        if dest.return_path is ReturnPath.HANDOVER:
            assert dest.loaded() == encode_loaded(dest.stream_bytes)
        else:
            with pytest.raises(LocalProtocolError):
                dest.loaded()
        expect_shut = dest.return_path is not ReturnPath.NONE
        assert dest.shut(0) == (encode_shut(0) if expect_shut else b"")


def test_qemu_device_sections_come_out_as_vmstate_events():
    dest = DestinationSession(CHANNELS["tcp"])
    events = drain(dest, source_stream(SourceSession(QEMU_DEVICES, CHANNELS["tcp"])))
    assert [e.idstr for e in events if isinstance(e, VMStateSection)] == ["timer", "globalstate"]
    assert set(KNOWN_SECTIONS) >= {"timer", "globalstate"}
    assert not any(isinstance(e, NoGo) for e in events)


def test_a_loaded_to_a_source_without_handover_is_reported_and_never_answered():
    """A destination with x-handover, a source without: the source must learn
    that the peer waits (the engine then fails and keeps the guest), never GO."""
    src = SourceSession(NATIVE, CHANNELS["tcp"])
    stream = source_stream(src)
    src.receive_data(encode_loaded(len(stream) + 99))  # even with a wrong count: the mismatch is not the news
    assert src.next_event() == Loaded(len(stream) + 99)
    with pytest.raises(LocalProtocolError):
        src.go()
    assert src.nogo() == b""
