"""multifd (QEMU 7.2's wire format) with stock QEMU on either side, and ours to ours.

Every hop compares RAM (pmemsave).  Both ends of a multifd migration need
the capability and the same multifd-channels / multifd-compression; the
destination is started with ``-incoming defer`` so they can be set before
``migrate-incoming`` (as QEMU requires).
"""

from __future__ import annotations

import shutil

import pytest
import trio

from .harness import free_port, pmem, vm_process
from .test_qemu_roundtrip import MEM, guest_blob, start_qemu

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not on PATH "
                                "(Debian: apt-get install qemu-system-x86)")
pytestmark = pytest.mark.trio_timeout(120)
CONFIGS = [(2, "none"), (2, "zstd"), (4, "none"), (4, "zstd")]
IDS = [f"{n}ch-{c}" for n, c in CONFIGS]


def _settings(channels: int, compression: str) -> list[tuple[str, dict]]:
    return [("migrate-set-capabilities", {"capabilities": [{"capability": "multifd", "state": True}]}),
            ("migrate-set-parameters", {"multifd-channels": channels, "multifd-compression": compression})]


async def _prepare_ours(src, dst, uri: str, channels: int, compression: str, max_bandwidth: int) -> None:
    """multifd on both of our VMs, the destination listening, the source's bandwidth set."""
    for cmd, args in _settings(channels, compression):
        await src.qmp.execute(cmd, args)
        await dst.qmp.execute(cmd, args)
    await dst.qmp.execute("migrate-incoming", {"uri": uri})
    await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": max_bandwidth})
    await trio.sleep(0.3)


@needs_qemu
@pytest.mark.parametrize(("channels", "compression"), CONFIGS, ids=IDS)
async def test_qemu_to_migrator_to_qemu_multifd(tmp_path, channels, compression):
    """Stock QEMU source -> our destination -> stock QEMU destination, all multifd."""
    port1, port2 = free_port(), free_port()
    src = await start_qemu(tmp_path, "qsrc", "-device", guest_blob(tmp_path))
    dst = await start_qemu(tmp_path, "qdst", "-incoming", "defer")
    try:
        src_ram = await src.pmem(tmp_path, "qsrc.ram")
        async with vm_process(tmp_path, "mid", "--incoming", "defer", memory="64M") as mid:
            for cmd, args in _settings(channels, compression):
                await src.qmp(cmd, args)
                await mid.qmp.execute(cmd, args)
                await dst.qmp(cmd, args)
            await mid.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port1}"})
            await trio.sleep(0.2)
            await src.qmp("migrate", {"uri": f"tcp:127.0.0.1:{port1}"})
            qinfo = await src.wait_migration()
            assert qinfo["status"] == "completed" and qinfo["ram"]["multifd-bytes"] > 0, qinfo
            assert (await mid.qmp.wait_migration())["status"] == "completed", mid.log()
            assert await pmem(mid, tmp_path, MEM, "mid.ram") == src_ram
            # on to the second stock QEMU (our VM now carries QEMU's device state)
            await dst.qmp("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port2}"})
            await trio.sleep(0.2)
            await mid.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port2}"})
            out = await mid.qmp.wait_migration()
            assert out["status"] == "completed", mid.log()
            assert out["ram"]["multifd-bytes"] > 0
            mid_ram = await pmem(mid, tmp_path, MEM, "mid2.ram")
        assert (await dst.wait_migration())["status"] == "completed", (tmp_path / "qdst.log").read_text()
        assert (await dst.qmp("query-status"))["status"] == "running"
        assert await dst.pmem(tmp_path, "qdst.ram") == mid_ram == src_ram
    finally:
        await src.aclose()
        await dst.aclose()


@needs_qemu
@pytest.mark.parametrize(("channels", "compression"), [(2, "none"), (4, "zstd")], ids=["2ch-none", "4ch-zstd"])
async def test_live_guest_to_stock_qemu_multifd(tmp_path, channels, compression):
    """Our source with a guest writing memory throughout -> stock QEMU (x-qemu-devices)."""
    port = free_port()
    dst = await start_qemu(tmp_path, "qdst", "-incoming", "defer")
    try:
        async with vm_process(tmp_path, "src", memory="64M", workload="random,rate=20000") as src:
            for cmd, args in _settings(channels, compression):
                await src.qmp.execute(cmd, args)
                await dst.qmp(cmd, args)
            await src.qmp.execute("migrate-set-capabilities",
                                  {"capabilities": [{"capability": "x-qemu-devices", "state": True}]})
            await dst.qmp("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            await trio.sleep(0.3)
            await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await src.qmp.wait_migration()
            assert info["status"] == "completed", src.log()
            assert info["ram"]["dirty-sync-count"] >= 2
            ours = await pmem(src, tmp_path, MEM, "ours.ram")
        assert (await dst.wait_migration())["status"] == "completed", (tmp_path / "qdst.log").read_text()
        assert await dst.pmem(tmp_path, "qdst.ram") == ours
        assert any(ours)
    finally:
        await dst.aclose()


@pytest.mark.parametrize(("channels", "compression", "transport"),
                         [(1, "none", "tcp"), (2, "zstd", "unix"), (4, "none", "unix")],
                         ids=["1ch-none-tcp", "2ch-zstd-unix", "4ch-none-unix"])
async def test_ours_to_ours_multifd(tmp_path, channels, compression, transport):
    """A live guest over multifd between two migrator processes; the destination
    stays paused (-S) so its RAM can be compared with the stopped source's."""
    uri = f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    async with vm_process(tmp_path, "dst", "--incoming", "defer", "-S", memory="64M") as dst, \
            vm_process(tmp_path, "src", memory="64M", workload="random,rate=30000") as src:
        await _prepare_ours(src, dst, uri, channels, compression, 200 << 20)
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", src.log()
        assert info["ram"]["multifd-bytes"] > 0 and info["ram"]["dirty-sync-count"] >= 2
        assert (await dst.qmp.wait_migration())["status"] == "completed", dst.log()
        assert await pmem(src, tmp_path, MEM, "a.ram") == await pmem(dst, tmp_path, MEM, "b.ram")


async def test_multifd_refuses_file_uris(tmp_path):
    async with vm_process(tmp_path, "src", memory="16M") as src:
        for cmd, args in _settings(2, "none"):
            await src.qmp.execute(cmd, args)
        await src.qmp.execute("migrate", {"uri": f"file:{tmp_path / 'x.stream'}"})
        info = await src.qmp.wait_migration()
        assert info["status"] == "failed"
        assert "multifd needs a tcp: or unix: migration URI" in info["error-desc"]
        assert (await src.qmp.execute("query-status"))["status"] == "running"


@pytest.mark.parametrize("multifd", [False, True], ids=["single", "multifd"])
async def test_zero_page_detection_none_sends_zero_pages_as_data(tmp_path, multifd):
    uri = f"unix:{tmp_path / 'mig.sock'}"
    async with vm_process(tmp_path, "dst", "--incoming", "defer", "-S", memory="16M") as dst, \
            vm_process(tmp_path, "src", memory="16M") as src:
        if multifd:
            for cmd, args in _settings(2, "none"):
                await src.qmp.execute(cmd, args)
                await dst.qmp.execute(cmd, args)
        await src.qmp.execute("migrate-set-parameters", {"zero-page-detection": "none"})
        await dst.qmp.execute("migrate-incoming", {"uri": uri})
        await trio.sleep(0.2)
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", src.log()
        assert info["ram"]["duplicate"] == 0 and info["ram"]["normal"] == 16 * 256
        assert info["ram"]["transferred"] > 16 << 20
        assert await pmem(src, tmp_path, 16 << 20, "a.ram") == await pmem(dst, tmp_path, 16 << 20, "b.ram")


@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
async def test_multifd_failure_leaves_the_source_running(tmp_path, how):
    """migrate_cancel, or the destination dying, in the middle of a multifd
    migration: the source ends cancelled/failed and keeps running; a
    destination never loads a partial stream."""
    uri = f"tcp:127.0.0.1:{free_port()}"
    async with vm_process(tmp_path, "src", memory="64M", workload="random,rate=5000") as src:
        async with vm_process(tmp_path, "dst", "--incoming", "defer", "-S", memory="64M") as dst:
            await _prepare_ours(src, dst, uri, 2, "none", 8 << 20)
            await src.qmp.execute("migrate", {"uri": uri})
            with trio.fail_after(30):
                while (await src.qmp.execute("query-migrate")).get("ram", {}).get("multifd-bytes", 0) < 2 << 20:
                    await trio.sleep(0.05)
            if how == "cancel":
                await src.qmp.execute("migrate_cancel")
                dinfo = await dst.qmp.wait_migration(statuses=("failed", "completed"))
                assert dinfo["status"] == "failed"
                assert (await dst.qmp.execute("query-status"))["running"] is False
            else:
                dst.proc.kill()
            info = await src.qmp.wait_migration()
        assert info["status"] == ("cancelled" if how == "cancel" else "failed"), src.log()
        st = await src.qmp.execute("query-status")
        assert st["running"] is True and st["status"] == "running"
