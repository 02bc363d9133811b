"""The trio QMP server, driven by real clients over real sockets.

The server runs in the test's nursery on a unix socket in ``tmp_path`` (or
loopback TCP, port 0).  qemu.qmp is asyncio, so each client scenario runs as
one self-contained ``asyncio.run`` in a worker thread; qmp-shell runs as a
subprocess with ``HOME`` pointed at ``tmp_path`` (it writes a history file).
A small raw trio client checks what the libraries smooth over: framing,
pipelining and the negotiation gate for events.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import sysconfig

import pytest
import trio
from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from migrator.qmp._commands import CommandTable, command
from migrator.qmp._params import MigrationOptions
from migrator.qmp._server import QMPServer
from migrator.errors import QMPError

pytestmark = pytest.mark.trio_timeout(60)


class FakeVM:
    """The commands a VM process would register, reduced to what the tests need."""

    def __init__(self) -> None:
        self.server: QMPServer | None = None
        self.running = True

    @command("query-status")
    def query_status(self) -> dict:
        return {"running": self.running, "status": "running" if self.running else "paused"}

    @command("stop")
    def stop(self) -> None:
        self.running = False
        assert self.server is not None
        self.server.emit_event("STOP")

    @command("x-emit", args={"name": str, "*data": dict, "*count": int, "*pad": int, "*pause": bool})
    async def x_emit(
        self, name: str, data: dict | None = None, count: int = 1, pad: int = 0, pause: bool = False
    ) -> None:
        assert self.server is not None
        if pad:
            data = {**(data or {}), "pad": "x" * pad}
        for _ in range(count):
            self.server.emit_event(name, data)
            if pause:  # let the writers and readers run, as a real engine would
                await trio.sleep(0.0005)
        await trio.lowlevel.checkpoint()

    @command("x-fail")
    def x_fail(self) -> None:
        raise QMPError("DeviceNotFound", "Device 'nic0' not found")

    @command("x-crash")
    def x_crash(self) -> None:
        raise RuntimeError("handler bug")

    @command("x-unencodable")
    def x_unencodable(self) -> dict:
        return {"value": object()}


def make_server(**kwargs) -> tuple[QMPServer, FakeVM]:
    vm = FakeVM()
    options = MigrationOptions()
    server = QMPServer(CommandTable.from_objects(vm, options), name="test", **kwargs)
    vm.server = server
    return server, vm


async def start_unix(nursery, tmp_path, **kwargs) -> tuple[QMPServer, FakeVM, str]:
    server, vm = make_server(**kwargs)
    path = str(tmp_path / "qmp.sock")
    await nursery.start(server.serve_unix, path)
    return server, vm, path


async def in_thread(fn, *args):
    return await trio.to_thread.run_sync(fn, *args)


# ---------------------------------------------------------------------------
# qemu.qmp QMPClient (asyncio, in a worker thread)


async def _qmpclient_scenario(address) -> dict:
    out: dict = {}
    async with asyncio.timeout(20):
        qmp = QMPClient("test-client")
        await qmp.connect(address)
        try:
            out["greeting"] = qmp.greeting._raw
            out["status"] = await qmp.execute("query-status")
            out["version"] = await qmp.execute("query-version")
            out["commands"] = await qmp.execute("query-commands")
            for name in ("no-such-command", "x-fail", "x-crash", "x-unencodable"):
                try:
                    await qmp.execute(name)
                except ExecuteError as err:
                    out[name] = (err.error_class, str(err))
            try:
                await qmp.execute("migrate-set-parameters", {"downtime-limit": 2_000_001})
            except ExecuteError as err:
                out["range"] = (err.error_class, str(err))
            await qmp.execute("migrate-set-parameters", {"downtime-limit": 1, "max-bandwidth": 3_000_000})
            out["params"] = await qmp.execute("query-migrate-parameters")
            with qmp.listener(("STOP", "MIGRATION")) as listener:
                await qmp.execute("stop")
                out["stop_event"] = dict(await listener.get())
                await qmp.execute("x-emit", {"name": "MIGRATION", "data": {"status": "active"}})
                out["migration_event"] = dict(await listener.get())
            out["status_after"] = await qmp.execute("query-status")
        finally:
            await qmp.disconnect()
    return out


async def test_qemu_qmp_client_full_session(nursery, tmp_path):
    server, vm, path = await start_unix(nursery, tmp_path)
    out = await trio.to_thread.run_sync(asyncio.run, _qmpclient_scenario(path))

    assert out["greeting"] == {
        "QMP": {
            "version": {"qemu": {"major": 10, "minor": 2, "micro": 0}, "package": "migrator-0.1"},
            "capabilities": [],
        }
    }
    assert out["version"] == out["greeting"]["QMP"]["version"]
    assert out["status"] == {"running": True, "status": "running"}
    names = {c["name"] for c in out["commands"]}
    assert {
        "qmp_capabilities",
        "query-commands",
        "query-version",
        "quit",
        "query-status",
        "migrate-set-parameters",
        "query-migrate-capabilities",
    } <= names
    assert out["no-such-command"] == ("CommandNotFound", "The command no-such-command has not been found")
    assert out["x-fail"] == ("DeviceNotFound", "Device 'nic0' not found")
    assert out["x-crash"] == ("GenericError", "handler bug")
    assert out["x-unencodable"][0] == "GenericError"
    assert out["range"] == (
        "GenericError",
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
    )
    assert out["params"]["downtime-limit"] == 1 and out["params"]["max-bandwidth"] == 3_000_000
    stop = out["stop_event"]
    assert stop["event"] == "STOP" and "data" not in stop
    ts = stop["timestamp"]
    assert (
        set(ts) == {"seconds", "microseconds"}
        and ts["seconds"] > 1_600_000_000
        and 0 <= ts["microseconds"] < 10**6
    )
    assert out["migration_event"]["data"] == {"status": "active"}
    assert out["status_after"] == {"running": False, "status": "paused"}
    assert not vm.running
    with trio.fail_after(5):
        while server.statistics().connected_clients:  # the server saw the disconnect
            await trio.sleep(0.01)


async def test_qemu_qmp_client_over_tcp(nursery):
    server, _ = make_server()
    listeners = await nursery.start(server.serve_tcp, "127.0.0.1", 0)
    host, port = listeners[0].socket.getsockname()[:2]

    async def scenario():
        qmp = QMPClient()
        async with asyncio.timeout(20):
            await qmp.connect((host, port))
            try:
                return await qmp.execute("query-version")
            finally:
                await qmp.disconnect()

    version = await trio.to_thread.run_sync(asyncio.run, scenario())
    assert version["qemu"] == {"major": 10, "minor": 2, "micro": 0}


# ---------------------------------------------------------------------------
# qemu.qmp's legacy synchronous client


def _legacy_scenario(path: str) -> dict:
    # The legacy shim runs its own loop and never closes it; own the loop so
    # nothing leaks into trio's reusable worker thread (ResourceWarning).
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    out: dict = {}
    try:
        qmp = QEMUMonitorProtocol(path)
        qmp.settimeout(20.0)
        try:
            out["greeting"] = qmp.connect()
            out["raw_no_id"] = qmp.cmd_obj({"execute": "query-status"})
            out["raw_with_id"] = qmp.cmd_obj({"execute": "query-status", "id": "legacy-1"})
            out["raw_error"] = qmp.cmd_obj({"execute": "x-fail"})
            out["raw_bad_args"] = qmp.cmd_obj({"execute": "query-status", "arguments": {"verbose": True}})
            out["cmd"] = qmp.cmd("query-version")
            qmp.cmd("x-emit", name="LEGACY_EVENT", data={"k": "v"})
            out["event"] = qmp.pull_event(wait=10.0)
            try:
                qmp.cmd("x-fail")
            except ExecuteError as err:
                out["cmd_error"] = (err.error_class, str(err))
        finally:
            qmp.close()
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return out


async def test_legacy_client(nursery, tmp_path):
    _, _, path = await start_unix(nursery, tmp_path)
    out = await in_thread(_legacy_scenario, path)
    assert out["greeting"]["QMP"]["version"]["qemu"]["major"] == 10
    assert out["raw_no_id"] == {"return": {"running": True, "status": "running"}}  # no id sent, none back
    assert out["raw_with_id"] == {"return": {"running": True, "status": "running"}, "id": "legacy-1"}
    assert out["raw_error"] == {"error": {"class": "DeviceNotFound", "desc": "Device 'nic0' not found"}}
    assert out["raw_bad_args"] == {
        "error": {"class": "GenericError", "desc": "Parameter 'verbose' is unexpected"}
    }
    assert out["cmd"]["package"] == "migrator-0.1"
    assert out["event"]["event"] == "LEGACY_EVENT" and out["event"]["data"] == {"k": "v"}
    assert set(out["event"]["timestamp"]) == {"seconds", "microseconds"}
    assert out["cmd_error"] == ("DeviceNotFound", "Device 'nic0' not found")


# ---------------------------------------------------------------------------
# qmp-shell


def _qmp_shell_command() -> list[str]:
    script = os.path.join(sysconfig.get_path("scripts"), "qmp-shell")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "import sys; from qemu.qmp.qmp_shell import main; sys.exit(main())"]


async def test_qmp_shell(nursery, tmp_path):
    _, vm, path = await start_unix(nursery, tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    lines = [
        "query-status",
        "migrate-set-parameters downtime-limit=5",
        "query-migrate-parameters",
        "bogus-cmd a=1",
        "stop",
        "",  # an empty line makes qmp-shell print pending events
    ]
    stdin = "\n".join(lines).encode() + b"\n"
    with trio.fail_after(30):
        proc = await trio.run_process(
            [*_qmp_shell_command(), path], stdin=stdin, capture_stdout=True, capture_stderr=True, env=env
        )
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()
    assert "Connected to QEMU 10.2.0" in out
    replies = [
        json.loads(line[line.index("{") :])
        for line in out.splitlines()
        if '{"return"' in line or '{"error"' in line
    ]
    assert replies[0] == {"return": {"running": True, "status": "running"}}
    assert replies[1] == {"return": {}}
    assert replies[2]["return"]["downtime-limit"] == 5
    assert replies[3] == {
        "error": {"class": "CommandNotFound", "desc": "The command bogus-cmd has not been found"}
    }
    assert replies[4] == {"return": {}}
    assert "'event': 'STOP'" in out  # the empty line made qmp-shell print pending events (as Python reprs)
    assert not vm.running
    assert (home / ".qmp-shell_history").exists()


# ---------------------------------------------------------------------------
# a raw trio client: framing and the event gate


class RawClient:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buf = b""

    async def read_message(self) -> dict:
        while b"\n" not in self._buf:
            data = await self.stream.receive_some(1 << 20)
            if not data:
                raise EOFError
            self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        assert line.endswith(b"\r"), line  # QEMU's monitor writes \r\n
        return json.loads(line)

    async def send_raw(self, data: bytes, *, byte_at_a_time: bool = False) -> None:
        if byte_at_a_time:
            for i in range(len(data)):
                await self.stream.send_all(data[i : i + 1])
        else:
            await self.stream.send_all(data)


async def raw_client(path: str) -> RawClient:
    return RawClient(await trio.open_unix_socket(path))


async def test_raw_framing_pipelining_and_gate(nursery, tmp_path):
    server, _, path = await start_unix(nursery, tmp_path)
    a = await raw_client(path)
    b = await raw_client(path)
    async with a.stream, b.stream:
        greeting = await a.read_message()
        assert greeting["QMP"]["capabilities"] == []
        await b.read_message()

        # Pipelined, unterminated, split byte by byte: the server must parse a stream.
        await a.send_raw(
            b'{"execute":"query-version","id":0}'
            b'{"execute":"qmp_capabilities"}'
            b'{"execute": "no such"}'
            b'{"execute":"query-status","id":[1,{"x":null}]}',
            byte_at_a_time=True,
        )
        assert await a.read_message() == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": 0,
        }
        assert await a.read_message() == {"return": {}}
        assert (await a.read_message())["error"]["class"] == "CommandNotFound"
        assert await a.read_message() == {
            "return": {"running": True, "status": "running"},
            "id": [1, {"x": None}],
        }

        # Malformed JSON: an error reply, and the session stays usable.
        await a.send_raw(b'{"execute": } {"execute":"query-status"}\n')
        err = await a.read_message()
        assert err["error"]["class"] == "GenericError" and err["error"]["desc"].startswith(
            "JSON parse error, "
        )
        assert "id" not in err
        assert (await a.read_message())["return"]["status"] == "running"

        # b has not negotiated: it must not see the event, a must.
        await a.send_raw(b'{"execute":"x-emit","arguments":{"name":"TEST","data":{"n":1}},"id":"e"}')
        # As in QEMU, an event raised by a command precedes that command's reply.
        event, reply = await a.read_message(), await a.read_message()
        assert event["event"] == "TEST" and event["data"] == {"n": 1}
        assert reply == {"return": {}, "id": "e"}
        assert server.statistics().connected_clients == 2
        assert server.statistics().negotiated_clients == 1

        await b.send_raw(b'{"execute":"qmp_capabilities","id":"neg"}')
        assert await b.read_message() == {"return": {}, "id": "neg"}  # the reply, not the earlier event
        await b.send_raw(b'{"execute":"query-status","id":"after"}')
        assert (await b.read_message())["id"] == "after"

        # Now both get broadcasts.
        await a.send_raw(b'{"execute":"x-emit","arguments":{"name":"BOTH"}}')
        got_b = await b.read_message()
        assert got_b["event"] == "BOTH" and "data" not in got_b


async def test_slow_client_is_disconnected_instead_of_blocking(nursery, tmp_path):
    server, _, path = await start_unix(nursery, tmp_path, max_queued_events=8)
    fast = await raw_client(path)
    slow = await raw_client(path)
    async with fast.stream, slow.stream:
        for c in (fast, slow):
            await c.read_message()
            await c.send_raw(b'{"execute":"qmp_capabilities"}')
            assert await c.read_message() == {"return": {}}
        received: list[dict] = []
        done = trio.Event()

        async def read_fast():
            while True:
                msg = await fast.read_message()
                received.append(msg)
                if msg.get("id") == 1:
                    done.set()

        async with trio.open_nursery() as readers:
            readers.start_soon(read_fast)
            # 200 events of 16 KiB: far more than the slow client's socket
            # buffers plus its 8-deep queue.  The slow client never reads.
            await fast.send_raw(
                b'{"execute":"x-emit","arguments":{"name":"BULK","count":200,"pad":16384,"pause":true},"id":1}'
            )
            with trio.fail_after(30):
                await done.wait()  # the emitting command was never blocked
                while server.statistics().connected_clients != 1:
                    await trio.sleep(0.01)
            readers.cancel_scope.cancel()
        assert [m["event"] for m in received if "event" in m] == ["BULK"] * 200
        slow_got = 0
        with trio.fail_after(10):
            with pytest.raises(EOFError):
                while True:
                    assert (await slow.read_message())["event"] == "BULK"
                    slow_got += 1
        assert slow_got < 200
        assert server.statistics().negotiated_clients == 1  # fast is still served
        await fast.send_raw(b'{"execute":"query-status","id":2}')
        assert (await fast.read_message())["id"] == 2


async def test_quit_reply_and_shutdown_event_are_written_before_the_owner_reacts(tmp_path):
    path = str(tmp_path / "qmp.sock")
    server, _ = make_server()
    async with trio.open_nursery() as process:  # the owner exits the moment quit is requested
        await process.start(server.serve_unix, path)

        async def owner():
            await server.quit_requested.wait()
            process.cancel_scope.cancel()

        process.start_soon(owner)
        c = await raw_client(path)
        async with c.stream:
            await c.read_message()
            await c.send_raw(b'{"execute":"qmp_capabilities"}{"execute":"quit","id":"q"}')
            assert await c.read_message() == {"return": {}}
            assert await c.read_message() == {"return": {}, "id": "q"}
            shutdown = await c.read_message()
            assert shutdown["event"] == "SHUTDOWN"
            assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
            with pytest.raises((EOFError, trio.BrokenResourceError)):
                await c.read_message()  # then the process went away
    assert server.quit_requested.is_set()


async def test_half_closed_client_gets_its_replies(nursery, tmp_path):
    # A script piping requests in (printf ... | socat) shuts down its write
    # side at once; everything it sent is still executed and answered.
    server, _, path = await start_unix(nursery, tmp_path)
    c = await raw_client(path)
    async with c.stream:
        await c.send_raw(b'{"execute":"qmp_capabilities"}{"execute":"query-status","id":1}{"execute":"quit"}')
        await c.stream.send_eof()
        assert "QMP" in await c.read_message()
        assert await c.read_message() == {"return": {}}
        assert (await c.read_message())["id"] == 1
        assert await c.read_message() == {"return": {}}
        assert (await c.read_message())["event"] == "SHUTDOWN"
        with pytest.raises(EOFError):
            await c.read_message()
    assert server.quit_requested.is_set()


async def test_client_reset_mid_request_leaves_server_serving(nursery, tmp_path):
    server, _, path = await start_unix(nursery, tmp_path)
    c = await raw_client(path)
    await c.read_message()
    await c.send_raw(b'{"execute":"qmp_capab')
    await c.stream.aclose()
    with trio.fail_after(5):
        while server.statistics().connected_clients:
            await trio.sleep(0.01)
    c = await raw_client(path)
    async with c.stream:
        assert "QMP" in await c.read_message()


async def test_unix_socket_is_replaced_and_removed(tmp_path):
    path = tmp_path / "qmp.sock"
    async with trio.open_nursery() as nursery:
        server, _ = make_server()
        await nursery.start(server.serve_unix, path)
        nursery.cancel_scope.cancel()
    assert not path.exists()  # removed on exit
    # A stale socket file (a previous process died) is replaced, as QEMU does.
    import socket as _socket

    stale = _socket.socket(_socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    async with trio.open_nursery() as nursery:
        server, _ = make_server()
        await nursery.start(server.serve_unix, path)
        c = await raw_client(str(path))
        async with c.stream:
            assert "QMP" in await c.read_message()
        nursery.cancel_scope.cancel()


def test_builtin_names_cannot_be_shadowed():
    class Clash:
        @command("query-version")
        def mine(self):
            return {}

    with pytest.raises(ValueError, match="registered twice"):
        QMPServer(CommandTable.from_objects(Clash()))
