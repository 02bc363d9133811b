"""A stock QEMU destination loads a live migration from our engine.

With the ``x-ram-only`` capability our source sends RAM only (no device
section) and names the machine ``none``; stock QEMU started as
``qemu-system-x86_64 -M none -m SIZE -incoming ...`` loads it, and its guest
memory (``pmemsave``) must equal ours.  QEMU 7.2 has no ``file:`` incoming
URI, so the file variant goes through ``exec:cat``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import trio

from .harness import free_port, pmem, qemu_qmp as _qmp, vm_process

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not on PATH "
                                 "(Debian: apt-get install qemu-system-x86)"),
              pytest.mark.trio_timeout(90)]
MiB = 1 << 20


async def _qemu_destination(tmp_path, incoming: str, mem_mib: int):
    sock = tmp_path / "qemu.qmp"
    proc = await trio.lowlevel.open_process(
        [QEMU, "-M", "none", "-m", f"{mem_mib}M", "-nodefaults", "-display", "none",
         "-qmp", f"unix:{sock},server=on,wait=off", "-incoming", incoming],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with trio.fail_after(20):
        while not sock.exists():
            assert proc.poll() is None, "QEMU exited early"
            await trio.sleep(0.05)
    return proc, sock


async def _wait_completed(sock) -> dict:
    with trio.fail_after(60):
        while True:
            (info,) = await _qmp(sock, ("query-migrate", None))
            if info.get("status") in ("completed", "failed"):
                return info
            await trio.sleep(0.05)


@pytest.mark.parametrize("kind", ["tcp", "file"])
async def test_stock_qemu_loads_our_ram_only_stream(tmp_path, kind, trio_timeout):
    mem = 32 * MiB
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}" if kind == "tcp" else f"file:{tmp_path / 'ram.stream'}"
    async with vm_process(tmp_path, "src", memory="32M", workload="random,rate=20000") as src:
        await src.qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "x-ram-only", "state": True}]})
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        qemu = None
        if kind == "tcp":
            qemu, sock = await _qemu_destination(tmp_path, uri, 32)
            await trio.sleep(0.3)  # QEMU listening
        await trio.sleep(0.2)  # the guest dirties memory while we migrate
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", src.log()
        ours = await pmem(src, tmp_path, mem, "ours.ram")
        if kind == "file":
            qemu, sock = await _qemu_destination(tmp_path, f"exec:cat {tmp_path / 'ram.stream'}", 32)
        try:
            qinfo = await _wait_completed(sock)
            assert qinfo["status"] == "completed"
            theirs = tmp_path / "theirs.ram"
            await _qmp(sock, ("pmemsave", {"val": 0, "size": mem, "filename": str(theirs)}))
            assert theirs.read_bytes() == ours
            assert any(ours), "the guest wrote nothing: the test would prove little"
        finally:
            with trio.move_on_after(5):
                try:
                    await _qmp(sock, ("quit", None))
                except Exception:
                    pass
                await qemu.wait()
            if qemu.poll() is None:
                qemu.kill()
                await qemu.wait()


async def test_our_full_stream_is_refused_by_qemu(tmp_path, trio_timeout):
    """Without x-ram-only our device section is in the stream: QEMU must refuse it
    (it does not know "migrator-vcpus"), so the capability is what makes interop work."""
    path = tmp_path / "full.stream"
    async with vm_process(tmp_path, "src", memory="32M", workload="idle") as src:
        await src.qmp.execute("migrate", {"uri": f"file:{path}"})
        assert (await src.qmp.wait_migration())["status"] == "completed"
    qemu, sock = await _qemu_destination(tmp_path, f"exec:cat {path}", 32)
    with trio.fail_after(30):
        while qemu.poll() is None:  # QEMU exits 1 when an exec: incoming load fails
            await trio.sleep(0.05)
    assert qemu.returncode != 0
