"""Stock QEMU on both sides of our engine: QEMU -> migrator -> QEMU.

A ``-M none -m 64M -nodefaults`` QEMU sends RAM plus its ``timer`` and
``globalstate`` sections; our destination loads them (run state from
``globalstate``), keeps them, and as a source sends them on, so a second stock
QEMU loads the whole stream.  RAM is compared (``pmemsave``) at every hop.
QEMU 7.2 has no ``file:`` URI (8.2+), so its file streams go through
``exec:cat``.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import trio

from .harness import free_port, pmem, qemu_qmp, vm_process

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = [pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not on PATH "
                                 "(Debian: apt-get install qemu-system-x86)"),
              pytest.mark.trio_timeout(120)]
MiB = 1 << 20
MEM = 64 * MiB


class Qemu:
    def __init__(self, proc, sock) -> None:
        self.proc, self.sock = proc, sock

    async def qmp(self, name: str, args: dict | None = None):
        (ret,) = await qemu_qmp(self.sock, (name, args))
        return ret

    async def wait_migration(self) -> dict:
        with trio.fail_after(60):
            while True:
                info = await self.qmp("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    return info
                await trio.sleep(0.05)

    async def pmem(self, tmp_path, name: str) -> bytes:
        path = tmp_path / name
        await self.qmp("pmemsave", {"val": 0, "size": MEM, "filename": str(path)})
        return path.read_bytes()

    async def aclose(self) -> None:
        with trio.move_on_after(5):
            try:
                await self.qmp("quit")
            except Exception:
                pass
            await self.proc.wait()
        if self.proc.poll() is None:
            self.proc.kill()
            await self.proc.wait()


async def start_qemu(tmp_path, name: str, *args: str, nodefaults: bool = True) -> Qemu:
    """``-nodefaults`` unless told otherwise (then -M none gets a -netdev user: slirp)."""
    sock = tmp_path / f"{name}.qmp"
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own descriptor
        proc = await trio.lowlevel.open_process(
            [QEMU, "-M", "none", "-m", f"{MEM // MiB}M", *(["-nodefaults"] if nodefaults else []), "-display", "none",
             "-qmp", f"unix:{sock},server=on,wait=off", *args], stdout=log, stderr=subprocess.STDOUT)
    with trio.fail_after(20):
        while not sock.exists():
            assert proc.poll() is None, f"QEMU {name} exited early: {(tmp_path / f'{name}.log').read_text()}"
            await trio.sleep(0.05)
    return Qemu(proc, sock)


def guest_blob(tmp_path) -> str:
    """Random data with zero runs, loaded into the QEMU source's RAM at 1 MiB."""
    rng = np.random.default_rng(12)
    blob = rng.integers(0, 256, 4 * MiB, dtype=np.uint8)
    blob[PS * 10 : PS * 30] = 0
    path = tmp_path / "blob.bin"
    path.write_bytes(blob.tobytes())
    return f"loader,file={path},addr=0x100000,force-raw=on"


PS = 4096


async def _qemu_source(tmp_path, *args: str, nodefaults: bool = True) -> tuple[Qemu, bytes]:
    src = await start_qemu(tmp_path, "qsrc", "-device", guest_blob(tmp_path), *args, nodefaults=nodefaults)
    return src, await src.pmem(tmp_path, "qsrc.ram")


@pytest.mark.parametrize("kind", ["tcp", "file", "file-slirp"])
async def test_qemu_to_migrator_to_qemu(tmp_path, kind):
    """RAM equal at each hop; the middle carries QEMU's device sections on
    (with ``file-slirp``, QEMU's default -netdev user adds a slirp section)."""
    port1, port2 = free_port(), free_port()
    f1, f2 = tmp_path / "hop1.stream", tmp_path / "hop2.stream"
    slirp = kind == "file-slirp"
    kind = "file" if slirp else kind
    src, src_ram = await _qemu_source(tmp_path, nodefaults=not slirp)
    dst = None
    try:
        assert any(src_ram), "the QEMU source's RAM is empty: the test would prove little"
        if kind == "tcp":
            incoming = f"tcp:127.0.0.1:{port1}"
        else:
            await src.qmp("migrate", {"uri": f"exec:cat > {f1}"})
            assert (await src.wait_migration())["status"] == "completed"
            incoming = f"file:{f1}"
        async with vm_process(tmp_path, "mid", "--incoming", incoming, memory="64M") as mid:
            if kind == "tcp":
                await trio.sleep(0.3)
                await src.qmp("migrate", {"uri": incoming})
                assert (await src.wait_migration())["status"] == "completed"
            info = await mid.qmp.wait_migration()
            assert info["status"] == "completed", mid.log()
            assert (await mid.qmp.execute("query-status"))["status"] == "running"
            assert await pmem(mid, tmp_path, MEM, "mid.ram") == src_ram
            if kind == "tcp":
                dst = await start_qemu(tmp_path, "qdst", "-incoming", f"tcp:127.0.0.1:{port2}")
                await trio.sleep(0.3)
                await mid.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port2}"})
            else:
                await mid.qmp.execute("migrate", {"uri": f"file:{f2}"})
            out = await mid.qmp.wait_migration()
            assert out["status"] == "completed", mid.log()
            mid_ram = await pmem(mid, tmp_path, MEM, "mid2.ram")
        if kind == "file":
            dst = await start_qemu(tmp_path, "qdst", "-incoming", f"exec:cat {f2}", nodefaults=not slirp)
            assert (b"\x05slirp" in f2.read_bytes()) == slirp
        qinfo = await dst.wait_migration()
        assert qinfo["status"] == "completed", (tmp_path / "qdst.log").read_text()
        assert (await dst.qmp("query-status"))["status"] == "running"
        assert await dst.pmem(tmp_path, "qdst.ram") == mid_ram == src_ram
    finally:
        await src.aclose()
        if dst is not None:
            await dst.aclose()


@pytest.mark.parametrize("state", ["prelaunch", "paused"])
async def test_qemu_run_state_is_carried_through_globalstate(tmp_path, state):
    """A QEMU source in prelaunch (-S) or paused: we take its run state over
    (we do not start), and hand it on to the next QEMU, which does not start either."""
    f1, f2 = tmp_path / "hop1.stream", tmp_path / "hop2.stream"
    src, src_ram = await _qemu_source(tmp_path, *(["-S"] if state == "prelaunch" else []))
    try:
        if state == "paused":
            await src.qmp("stop")
        await src.qmp("migrate", {"uri": f"exec:cat > {f1}"})
        assert (await src.wait_migration())["status"] == "completed"
    finally:
        await src.aclose()
    async with vm_process(tmp_path, "mid", "--incoming", f"file:{f1}", memory="64M") as mid:
        assert (await mid.qmp.wait_migration())["status"] == "completed", mid.log()
        status = await mid.qmp.execute("query-status")
        assert (status["status"], status["running"]) == (state, False)
        assert await pmem(mid, tmp_path, MEM, "mid.ram") == src_ram
        await mid.qmp.execute("migrate", {"uri": f"file:{f2}"})
        assert (await mid.qmp.wait_migration())["status"] == "completed", mid.log()
    dst = await start_qemu(tmp_path, "qdst", "-incoming", f"exec:cat {f2}")
    try:
        assert (await dst.wait_migration())["status"] == "completed"
        status = await dst.qmp("query-status")
        assert (status["status"], status["running"]) == (state, False)
        assert await dst.pmem(tmp_path, "qdst.ram") == src_ram
    finally:
        await dst.aclose()


async def test_our_vm_with_qemu_devices_to_stock_qemu(tmp_path):
    """x-qemu-devices: a VM of ours (a live guest writing memory) sends timer +
    globalstate instead of migrator-vcpus; stock QEMU loads it and runs."""
    port = free_port()
    async with vm_process(tmp_path, "src", memory="64M", workload="random,rate=20000") as src:
        await src.qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "x-qemu-devices", "state": True}]})
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        dst = await start_qemu(tmp_path, "qdst", "-incoming", f"tcp:127.0.0.1:{port}")
        try:
            await trio.sleep(0.5)
            await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            assert (await src.qmp.wait_migration())["status"] == "completed", src.log()
            ours = await pmem(src, tmp_path, MEM, "ours.ram")
            assert (await dst.wait_migration())["status"] == "completed"
            assert (await dst.qmp("query-status"))["status"] == "running"
            assert await dst.pmem(tmp_path, "qdst.ram") == ours
            assert any(ours)
        finally:
            await dst.aclose()
