"""Test harness: real ``migrator run`` processes and a small trio QMP client.

The client speaks the wire protocol directly (JSON stream in, CRLF lines
out) so the tests also check our server's framing; one test additionally
drives both processes with qemu.qmp's QMPClient.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from contextlib import asynccontextmanager

import trio


class QMPTestError(Exception):
    def __init__(self, error: dict) -> None:
        super().__init__(f"{error.get('class')}: {error.get('desc')}")
        self.error_class = error.get("class")
        self.desc = error.get("desc")


class TrioQMP:
    """Minimal QMP client for tests (greeting, negotiation, ids, events)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.greeting: dict | None = None
        self.events: list[dict] = []
        self._buf = b""
        self._ids = itertools.count()
        self._event_arrived = trio.Event()

    async def _read_message(self) -> dict:
        while b"\n" not in self._buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("QMP connection closed")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def _read_reply(self, want_id) -> dict:
        while True:
            msg = await self._read_message()
            if "event" in msg:
                self.events.append(msg)
                self._event_arrived.set()
                self._event_arrived = trio.Event()
                continue
            if msg.get("id") == want_id:
                return msg

    async def negotiate(self) -> None:
        self.greeting = await self._read_message()
        await self.execute("qmp_capabilities")

    async def execute(self, cmd: str, args: dict | None = None):
        msg_id = f"t{next(self._ids)}"
        msg = {"execute": cmd, "id": msg_id}
        if args is not None:
            msg["arguments"] = args
        await self.stream.send_all(json.dumps(msg).encode())
        reply = await self._read_reply(msg_id)
        if "error" in reply:
            raise QMPTestError(reply["error"])
        return reply["return"]

    async def pump_events(self) -> None:
        """Read pending events (via a cheap command round trip)."""
        await self.execute("query-status")

    def event_names(self, name: str | None = None) -> list:
        if name is None:
            return [e["event"] for e in self.events]
        return [e.get("data") for e in self.events if e["event"] == name]

    async def wait_migration(self, statuses=("completed", "failed", "cancelled"), timeout: float = 60.0) -> dict:
        with trio.fail_after(timeout):
            while True:
                info = await self.execute("query-migrate")
                if info.get("status") in statuses:
                    return info
                await trio.sleep(0.02)

    async def aclose(self) -> None:
        await self.stream.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VMProcess:
    def __init__(self, proc: trio.Process, qmp_path: str, log_path: str) -> None:
        self.proc = proc
        self.qmp_path = qmp_path
        self.log_path = log_path
        self.qmp: TrioQMP | None = None

    def log(self) -> str:
        try:
            with open(self.log_path) as f:
                return f.read()
        except OSError:
            return ""


@asynccontextmanager
async def vm_process(tmp_path, name: str, *args: str, memory: str = "64M", accel: str = "sim",
                     workload: str = "idle", events: bool = True):
    """Start ``migrator run`` and yield a negotiated VMProcess; quit/kill at exit."""
    qmp_path = str(tmp_path / f"{name}.qmp")
    log_path = str(tmp_path / f"{name}.log")
    cmd = [sys.executable, "-m", "migrator", "run", "--accel", accel, "--memory", memory,
           "--workload", workload, "--qmp", f"unix:{qmp_path}", "--label", name, *args]
    log = open(log_path, "w")
    proc = await trio.lowlevel.open_process(cmd, stdout=log, stderr=subprocess.STDOUT)
    vm = VMProcess(proc, qmp_path, log_path)
    try:
        with trio.fail_after(30):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{vm.log()}")
                if os.path.exists(qmp_path):
                    try:
                        stream = await trio.open_unix_socket(qmp_path)
                        break
                    except OSError:
                        pass
                await trio.sleep(0.02)
        vm.qmp = TrioQMP(stream)
        await vm.qmp.negotiate()
        if events:
            await vm.qmp.execute("migrate-set-capabilities",
                                 {"capabilities": [{"capability": "events", "state": True}]})
        yield vm
    finally:
        with trio.CancelScope(shield=True):
            if vm.qmp is not None and proc.poll() is None:
                with trio.move_on_after(5):
                    try:
                        await vm.qmp.execute("quit")
                    except Exception:
                        pass
                    await proc.wait()
            if proc.poll() is None:
                proc.kill()
                await proc.wait()
            if vm.qmp is not None:
                await vm.qmp.aclose()
            log.close()


async def qemu_qmp(path, *commands: tuple[str, dict | None], timeout: float = 30.0) -> list:
    """Run QMP commands over a fresh qemu.qmp QMPClient connection (asyncio in a
    worker thread, never inside trio); for stock QEMU and for our servers.
    The worker thread cannot be cancelled from trio, so the exchange has its
    own ``timeout`` (a QEMU whose main loop is stuck, e.g. in an incoming
    migration, never answers)."""
    import asyncio

    async def scenario() -> list:
        from qemu.qmp import QMPClient

        client = QMPClient("migrator-test")
        await client.connect(str(path))
        try:
            return [await client.execute(name, args) for name, args in commands]
        finally:
            await client.disconnect()

    return await trio.to_thread.run_sync(asyncio.run, asyncio.wait_for(scenario(), timeout))


async def pmem(vm: VMProcess, tmp_path, size: int, name: str) -> bytes:
    path = str(tmp_path / name)
    await vm.qmp.execute("pmemsave", {"val": 0, "size": size, "filename": path})
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


async def wait_until(pred, timeout: float = 20.0, poll: float = 0.005) -> None:
    """Poll ``pred()`` until it is true (``trio.TooSlowError`` after ``timeout`` s)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(poll)


async def wait_serial(path, text: bytes = b"B", timeout: float = 60.0) -> None:
    """Wait until the guest's serial log (a ``--serial file:`` path) contains ``text``."""
    await wait_until(lambda: text in (path.read_bytes() if path.exists() else b""), timeout, 0.05)


async def migrate_live_then_converge(src: VMProcess, uri: str, *, trickle: int = 3_000_000,
                                     live_bytes: int = 2 << 20, timeout: float = 90.0) -> dict:
    """QEMU's migration-test flow: migrate at a trickle with a 1 ms downtime
    limit until ``live_bytes`` were sent (pages already sent keep being
    re-dirtied by the guest), then lift the limits and wait for the end;
    returns the source's final ``query-migrate``."""
    await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": trickle, "downtime-limit": 1})
    await src.qmp.execute("migrate", {"uri": uri})
    with trio.fail_after(30):
        while (await src.qmp.execute("query-migrate")).get("ram", {}).get("transferred", 0) < live_bytes:
            await trio.sleep(0.02)
    await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1_000_000_000, "downtime-limit": 30000})
    return await src.qmp.wait_migration(timeout=timeout)
