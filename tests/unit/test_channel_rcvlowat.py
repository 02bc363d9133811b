"""The TCP receiver's low-water mark (``SO_RCVLOWAT``) never holds data back.

With the mark set, epoll reports the socket readable only once the mark's
worth of bytes is queued.  The tail of a stream (or anything sent before a
pause) can be smaller than that for good: the peer then waits for our answer
while we wait for more bytes.  ``SocketChannel`` falls back to a 1-byte mark
after a short wait; the broken variant (no fallback) is shown to hang.
"""

from __future__ import annotations

import socket

import pytest
import trio

import transport.channel as channel_mod
from transport import StreamDecoder, listen_channel, open_channel

SMALL = 1000  # bytes: far below the mark


async def _exchange(uri: str, payload: bytes) -> bytes:
    """Send ``payload`` and keep the connection open until the peer answers."""
    chan = await open_channel(uri)
    async with chan:
        await chan.send_all([payload])
        return await chan.receive_some(16)


async def _serve(listener, nbytes: int, got: list) -> None:
    chan = await listener.accept()
    async with chan:
        dec = StreamDecoder()
        total = 0
        while total < nbytes:
            total += await chan.receive_into(dec)
        got.append((total, chan._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)))
        await chan.send_all([b"ok"])


async def test_tcp_accept_sets_the_mark_unix_does_not(tmp_path):
    for uri in ("tcp:127.0.0.1:0", f"unix:{tmp_path / 's.sock'}"):
        listener = await listen_channel(uri)
        got: list = []
        async with trio.open_nursery() as n:
            n.start_soon(_serve, listener, SMALL, got)
            assert await _exchange(listener.uri, b"x" * SMALL) == b"ok"
        mark = got[0][1]
        if uri.startswith("tcp"):
            assert mark == channel_mod.TCP_RCVLOWAT_BYTES
        else:
            assert mark == 1


@pytest.mark.parametrize("nbytes", [SMALL, channel_mod.TCP_RCVLOWAT_BYTES + SMALL])
async def test_a_tail_below_the_mark_is_received(nbytes):
    payload = bytes(range(256)) * (nbytes // 256) + b"t" * (nbytes % 256)
    listener = await listen_channel("tcp:127.0.0.1:0")
    got: list = []
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(_serve, listener, nbytes, got)
            assert await _exchange(listener.uri, payload) == b"ok"
    assert got[0][0] == nbytes


async def test_without_the_fallback_the_tail_hangs(monkeypatch):
    """The guarded-against variant: wait for the mark forever."""
    monkeypatch.setattr(channel_mod, "RCVLOWAT_WAIT_S", float("inf"))
    listener = await listen_channel("tcp:127.0.0.1:0")
    got: list = []
    with trio.move_on_after(1.0) as scope:
        async with trio.open_nursery() as n:
            n.start_soon(_serve, listener, SMALL, got)
            await _exchange(listener.uri, b"x" * SMALL)
    assert scope.cancelled_caught and not got
