"""Channels (tcp/unix/file) and the rate limiter.

Real resources only: loopback port 0, unix sockets and files in ``tmp_path``,
one subprocess sender.  The rate limiter runs under trio's autojump
``MockClock``: virtual time, no timed assertions.
"""

from __future__ import annotations

import errno
import math
import socket
import sys
import textwrap

import numpy as np
import pytest
import trio

from transport import (
    BadURIError,
    ChannelError,
    DeviceState,
    EndOfStream,
    FileAddress,
    RamPages,
    RamZeroPages,
    RateLimiter,
    RemoteProtocolError,
    StreamDecoder,
    StreamEncoder,
    TcpAddress,
    UnixAddress,
    listen_channel,
    open_channel,
    parse_uri,
    serve_once,
)

PS = 4096
NPAGES = 2048  # 8 MiB guest: several socket buffers' worth


def _guest(seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 256, (NPAGES, PS), dtype=np.uint8)
    g[rng.choice(NPAGES, NPAGES // 4, replace=False)] = 0
    return g


async def _send_stream(uri: str, guest: np.ndarray, *, cut: int | None = None, ack: bool = False) -> bytes | None:
    """Encode ``guest`` (shuffled page order, batches of 300) and send it."""
    enc = StreamEncoder()
    order = np.random.default_rng(1).permutation(len(guest))
    chan = await open_channel(uri)
    async with chan:
        pieces: list = [enc.header(), enc.configuration("pc"), enc.section_start(1, "ram", 0, 4)]
        pieces += [enc.ram_mem_size([("ram", guest.nbytes)]), enc.eos(), enc.section_footer(1), enc.section_end(1)]
        await chan.send_all(pieces)
        sent = sum(len(p) for p in pieces)
        for s in range(0, len(order), 300):
            res = enc.ram_pages("ram", guest, order[s : s + 300])
            if cut is not None and sent + res.nbytes > cut:
                await chan.send_all([b"".join(bytes(b) for b in res.buffers)[: cut - sent]])
                return None  # close mid-record
            await chan.send_all(res.buffers)
            sent += res.nbytes
        await chan.send_all([enc.eos(), enc.section_footer(1), enc.section_full(2, "migrator-vcpus", 0, 1)])
        await chan.send_all([enc.device_state(b"cpu-state"), enc.section_footer(2), enc.eof()])
        if ack:
            await chan.send_eof()
            return await chan.receive_some(16)
    return None


async def _receive_stream(chan, *, ack: bool = False) -> tuple[np.ndarray, bytes]:
    dec = StreamDecoder(max_block_bytes={"ram": NPAGES * PS})
    dst = np.full((NPAGES, PS), 0xAA, dtype=np.uint8)
    device = b""
    async with chan:
        while True:
            ev = await chan.next_event(dec)
            if isinstance(ev, RamPages):
                dst[(ev.offsets // PS).astype(np.intp)] = ev.data
            elif isinstance(ev, RamZeroPages):
                dst[(ev.offsets // PS).astype(np.intp)] = 0
            elif isinstance(ev, DeviceState):
                device = ev.data
            elif isinstance(ev, EndOfStream):
                break
        if ack:
            await chan.send_all([b"ack:ok"])
    return dst, device


async def _roundtrip(uri: str) -> None:
    guest = _guest()
    result = {}
    async with trio.open_nursery() as nursery:
        listener = await listen_channel(uri)

        async def receiver() -> None:
            async with listener:
                chan = await listener.accept()
            result["dst"], result["device"] = await _receive_stream(chan, ack=True)

        nursery.start_soon(receiver)
        result["ack"] = await _send_stream(listener.uri, guest, ack=True)
    np.testing.assert_equal(result["dst"], guest)
    assert result["device"] == b"cpu-state"
    assert result["ack"] == b"ack:ok"


async def test_tcp_loopback_roundtrip():
    with trio.fail_after(30):
        await _roundtrip("tcp:127.0.0.1:0")


async def test_unix_roundtrip(tmp_path):
    with trio.fail_after(30):
        await _roundtrip(f"unix:{tmp_path}/mig.sock")
    assert not (tmp_path / "mig.sock").exists()  # the listener removed its socket


async def test_file_roundtrip(tmp_path):
    guest = _guest(3)
    uri = f"file:{tmp_path}/stream.bin"
    with trio.fail_after(30):
        await _send_stream(uri, guest)
        listener = await listen_channel(uri)
        async with listener:
            chan = await listener.accept()
        assert not chan.has_return_path
        dst, device = await _receive_stream(chan)
    np.testing.assert_equal(dst, guest)
    assert device == b"cpu-state"


async def test_file_offset(tmp_path):
    uri = f"file:{tmp_path}/s.bin,offset=4096"
    chan = await open_channel(uri)
    async with chan:
        await chan.send_all([StreamEncoder().header()])
    raw = (tmp_path / "s.bin").read_bytes()
    assert raw[:4096] == bytes(4096)  # a hole before the offset
    assert raw[4096:4100] == b"QEVM" and len(raw) == 4096 + 8


async def test_serve_once_reports_bound_uri():
    guest = _guest(5)
    with trio.fail_after(30):
        async with trio.open_nursery() as inner:
            send_done = trio.Event()

            async def serve(task_status=trio.TASK_STATUS_IGNORED) -> None:
                chan = await serve_once("tcp:127.0.0.1:0", task_status=task_status)
                dst, _ = await _receive_stream(chan)
                np.testing.assert_equal(dst, guest)
                send_done.set()

            uri = await inner.start(serve)
            assert parse_uri(uri).port != 0
            await _send_stream(uri, guest)
            await send_done.wait()


async def test_stream_between_two_processes(tmp_path):
    """A separate Python process encodes and sends; this one decodes."""
    sock = tmp_path / "p.sock"
    script = textwrap.dedent(
        f"""
        import numpy as np, trio
        from transport import StreamEncoder, open_channel
        async def main():
            g = np.random.default_rng(11).integers(0, 256, (256, {PS}), dtype=np.uint8)
            g[::5] = 0
            e = StreamEncoder()
            ch = await open_channel("unix:{sock}")
            async with ch:
                await ch.send_all([e.header(), e.section_start(9, "ram", 0, 4), e.ram_mem_size([("ram", g.nbytes)])])
                await ch.send_all(e.ram_pages("ram", g, np.arange(256)[::-1]).buffers)
                await ch.send_all([e.eos(), e.section_footer(9), e.eof()])
        trio.run(main)
        """
    )
    expected = np.random.default_rng(11).integers(0, 256, (256, PS), dtype=np.uint8)
    expected[::5] = 0
    with trio.fail_after(60):
        listener = await listen_channel(f"unix:{sock}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.run_process, [sys.executable, "-c", script])
            async with listener:
                chan = await listener.accept()
            dec = StreamDecoder()
            dst = np.full((256, PS), 0xAA, np.uint8)
            async with chan:
                while not isinstance(ev := await chan.next_event(dec), EndOfStream):
                    if isinstance(ev, RamPages):
                        dst[(ev.offsets // PS).astype(np.intp)] = ev.data
                    elif isinstance(ev, RamZeroPages):
                        dst[(ev.offsets // PS).astype(np.intp)] = 0
    np.testing.assert_equal(dst, expected)


async def test_peer_closing_mid_record_is_truncation():
    guest = _guest(9)
    with trio.fail_after(30):
        listener = await listen_channel("tcp:127.0.0.1:0")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: _send_stream(listener.uri, guest, cut=1_000_123))
            async with listener:
                chan = await listener.accept()
            with pytest.raises(RemoteProtocolError, match="truncated") as info:
                await _receive_stream(chan)
    assert info.value.offset <= 1_000_123


async def test_many_buffers_and_partial_sends_arrive_intact(tmp_path):
    """More iovecs than IOV_MAX, and a slow reader: partial sendmsg must be handled."""
    rng = np.random.default_rng(4)
    bufs = [rng.integers(0, 256, int(n), dtype=np.uint8) for n in rng.integers(1, 9000, 3000)]
    bufs += [rng.integers(0, 256, 3 << 20, dtype=np.uint8)]
    expected = b"".join(b.tobytes() for b in bufs)
    got = bytearray()
    with trio.fail_after(60):
        listener = await listen_channel(f"unix:{tmp_path}/b.sock")
        async with trio.open_nursery() as nursery:

            async def sender() -> None:
                chan = await open_channel(f"unix:{tmp_path}/b.sock")
                async with chan:
                    await chan.send_all(bufs)
                    assert chan.bytes_sent == len(expected)

            nursery.start_soon(sender)
            async with listener:
                chan = await listener.accept()
            async with chan:
                while chunk := await chan.receive_some(65536):
                    got += chunk
                    await trio.sleep(0)
    assert bytes(got) == expected


async def test_channel_errors_are_oserrors(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens
    with pytest.raises(ChannelError) as info:
        await open_channel(f"tcp:127.0.0.1:{port}")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ECONNREFUSED
    with pytest.raises(ChannelError) as info:
        await open_channel(f"unix:{tmp_path}/missing.sock")
    assert info.value.errno in (errno.ENOENT, errno.ECONNREFUSED)
    with pytest.raises(ChannelError) as info:
        await listen_channel(f"file:{tmp_path}/missing.bin")
    assert info.value.errno == errno.ENOENT
    chan = await open_channel(f"file:{tmp_path}/out.bin")
    await chan.aclose()
    with pytest.raises(ChannelError) as info:
        await chan.send_all([b"x"])
    assert info.value.errno == errno.EBADF
    with pytest.raises(ChannelError):
        await chan.receive_some(1)


@pytest.mark.parametrize(
    ("uri", "parsed"),
    [
        ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444)),
        ("tcp:localhost:0", TcpAddress("localhost", 0)),
        ("tcp::4444", TcpAddress("", 4444)),
        ("tcp:[::1]:4444", TcpAddress("::1", 4444)),
        ("unix:/tmp/x.sock", UnixAddress("/tmp/x.sock")),
        ("file:/tmp/x.bin", FileAddress("/tmp/x.bin")),
        ("file:/tmp/x.bin,offset=0x1000", FileAddress("/tmp/x.bin", 4096)),
    ],
)
def test_parse_uri(uri, parsed):
    assert parse_uri(uri) == parsed
    assert parse_uri(parsed.uri) == parsed


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("127.0.0.1:4444", "unknown transport"),
        ("nocolon", "expected"),
        ("tcp:127.0.0.1", "missing ':PORT'"),
        ("tcp:127.0.0.1:http", "port must be a number"),
        ("tcp:127.0.0.1:70000", "port must be a number"),
        ("tcp:::1:4444", "IPv6"),
        ("tcp:[::1]4444", "IPv6"),
        ("tcp:host:1,ipv4", "options"),
        ("unix:", "missing socket path"),
        ("file:", "missing file path"),
        ("file:/x,size=3", "unsupported file option"),
        ("file:/x,offset=-1", ">= 0"),
        ("file:/x,offset=abc", "integer"),
        ("exec:cat > x", "not supported"),
        ("rdma:1.2.3.4:5", "not supported"),
        ("bogus:x", "unknown transport"),
    ],
)
def test_parse_uri_rejects(uri, reason):
    with pytest.raises(BadURIError, match=reason) as info:
        parse_uri(uri)
    assert isinstance(info.value, ValueError) and info.value.uri == uri


async def test_bad_uri_fails_before_any_io():
    with pytest.raises(BadURIError):
        await open_channel("exec:cat")
    with pytest.raises(BadURIError):
        await listen_channel("tcp:nohost")
    with pytest.raises(BadURIError, match="host is required"):
        await open_channel("tcp::4444")


# -- rate limiter (virtual time) -------------------------------------------------
async def _pump(rl: RateLimiter, total: int, chunk: int) -> tuple[float, int, list[float]]:
    """The sender loop: wait for budget, then book a chunk; returns (time, sleeps, wake times)."""
    t0 = trio.current_time()
    sleeps, wakes, sent = 0, [], 0
    while sent < total:
        if await rl.wait_for_budget():
            sleeps += 1
            wakes.append(trio.current_time() - t0)
        rl.account(chunk)
        sent += chunk
    return trio.current_time() - t0, sleeps, wakes


async def test_rate_limit_holds_bandwidth_in_100ms_windows(autojump_clock):
    bw, chunk, total = 1_000_000, 30_000, 1_020_000
    rl = RateLimiter(bw)
    assert rl.budget_bytes == bw // 10
    elapsed, sleeps, wakes = await _pump(rl, total, chunk)
    # Never faster than the limit allows: each window books at most budget + one chunk
    # (QEMU stops only once the booked bytes exceed the budget).
    assert total <= (elapsed / 0.1 + 1) * (rl.budget_bytes + chunk)
    # ... and never slower than the limit itself.
    assert elapsed <= total / bw
    # Sleeps end exactly on window boundaries.
    assert all(math.isclose(w * 10, round(w * 10), abs_tol=1e-6) for w in wakes) and sleeps == len(wakes) > 0
    st = rl.statistics()
    assert st.total_bytes == total and st.throttled_windows == sleeps
    assert st.windows >= sleeps
    # bandwidth = bytes booked in the last completed window / its length
    per_window = (rl.budget_bytes // chunk + 1) * chunk
    assert st.bandwidth_bytes_per_s == pytest.approx(per_window / 0.1)


async def test_rate_limit_disable_and_set_rate(autojump_clock):
    rl = RateLimiter(500_000)
    slow, _, _ = await _pump(rl, 400_000, 20_000)
    rl.set_rate(5_000_000)
    fast, _, _ = await _pump(rl, 400_000, 20_000)
    assert fast < slow
    rl.disable()
    assert rl.max_bandwidth_bytes_per_s == 0 and not rl.over_budget()
    t, sleeps, _ = await _pump(rl, 50_000_000, 1_000_000)
    assert t == 0 and sleeps == 0  # switchover: no limit at all


async def test_rate_limit_windows_roll_with_time(autojump_clock):
    rl = RateLimiter(0)
    rl.account(50_000)
    assert rl.bytes_this_window == 50_000
    await trio.sleep(0.25)
    assert not await rl.wait_for_budget()
    assert rl.bytes_this_window == 0
    assert rl.bandwidth_bytes_per_s == pytest.approx(50_000 / 0.25)
    with pytest.raises(ValueError):
        rl.set_rate(-1)
