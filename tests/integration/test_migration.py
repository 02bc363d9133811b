"""End-to-end: real ``migrator run`` processes, real sockets, QMP.

Every test starts its own source and destination processes on loopback or
unix sockets and drives them like a user drives QEMU.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import trio

from memory.kvm.sim.workloads import AB_START, check_guests_ram

from .harness import QMPTestError, free_port, pmem, vm_process

MiB = 1 << 20
pytestmark = pytest.mark.trio_timeout(120)


def _uri(kind: str, tmp_path) -> str:
    if kind == "tcp":
        return f"tcp:127.0.0.1:{free_port()}"
    return f"unix:{tmp_path / 'mig.sock'}"


def _statuses(vm) -> list:
    return [d["status"] for d in vm.qmp.event_names("MIGRATION")]


@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_live_migration_while_guest_writes(tmp_path, kind, trio_timeout):
    uri = _uri(kind, tmp_path)
    mem = 64 * MiB
    # tcp: QEMU's test flow, "-incoming defer" then migrate-incoming once the
    # events capability is on, so the destination's "setup" event is seen too.
    incoming = "defer" if kind == "tcp" else uri
    async with vm_process(tmp_path, "dst", "--incoming", incoming, "-S", memory="64M") as dst, \
            vm_process(tmp_path, "src", memory="64M", workload="ab,rate=50000") as src:
        if incoming == "defer":
            await dst.qmp.execute("migrate-incoming", {"uri": uri})
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        await trio.sleep(0.2)  # the guest runs and dirties memory
        assert (await src.qmp.execute("query-status"))["status"] == "running"
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", (info, src.log())
        assert info["ram"]["dirty-sync-count"] >= 2
        assert info["ram"]["transferred"] >= info["ram"]["normal-bytes"]
        assert "downtime" in info and "remaining" not in info["ram"]
        dinfo = await dst.qmp.wait_migration()
        assert dinfo["status"] == "completed", dst.log()
        # the source stops at switchover; the destination (-S) stays paused
        assert (await src.qmp.execute("query-status"))["status"] == "postmigrate"
        assert (await dst.qmp.execute("query-status"))["running"] is False
        a = await pmem(src, tmp_path, mem, "src.ram")
        b = await pmem(dst, tmp_path, mem, "dst.ram")
        assert a == b
        assert check_guests_ram(np.frombuffer(b, np.uint8), AB_START) == 0
        await src.qmp.pump_events()
        await dst.qmp.pump_events()
        assert _statuses(src) == ["setup", "active", "device", "completed"]
        # with "-incoming URI" the destination entered setup before any client
        assert _statuses(dst) == (["setup"] if incoming == "defer" else []) + ["active", "completed"]
        passes = [d["pass"] for d in src.qmp.event_names("MIGRATION_PASS")]
        assert passes == list(range(1, len(passes) + 1)) and len(passes) == info["ram"]["dirty-sync-count"]
        assert "STOP" in src.qmp.event_names()
        # the destination runs the guest after cont, from where it stopped
        await dst.qmp.execute("cont")
        await trio.sleep(0.3)
        assert (await dst.qmp.execute("query-status"))["status"] == "running"
        c = await pmem(dst, tmp_path, mem, "dst2.ram")
        assert c != b, "the migrated guest does not run on the destination"
        history = await src.qmp.execute("x-query-migration-history")
        assert history["status"] == "completed"
        assert [r["iteration"] for r in history["iterations"]] == passes
        assert history["iterations"][-1]["final"] is True
        assert history["downtime"]["total-ms"] > 0


async def test_cancel_midway_then_migrate_again(tmp_path, trio_timeout):
    uri = _uri("tcp", tmp_path)
    mem = 64 * MiB
    async with vm_process(tmp_path, "src", memory="64M", workload="ab,rate=5000") as src:
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
        async with vm_process(tmp_path, "dst1", "--incoming", uri, "-S", memory="64M") as dst1:
            await src.qmp.execute("migrate", {"uri": uri})
            with trio.fail_after(20):
                while (await src.qmp.execute("query-migrate")).get("ram", {}).get("transferred", 0) < 4 * MiB:
                    await trio.sleep(0.05)
            await src.qmp.execute("migrate_cancel")
            info = await src.qmp.wait_migration()
            assert info["status"] == "cancelled"
            dinfo = await dst1.qmp.wait_migration(statuses=("failed", "completed"))
            assert dinfo["status"] == "failed"  # a partial stream is never loaded
            assert (await dst1.qmp.execute("query-status"))["running"] is False
        await src.qmp.pump_events()
        assert _statuses(src) == ["setup", "active", "cancelling", "cancelled"]
        st = await src.qmp.execute("query-status")
        assert st == {"running": True, "singlestep": False, "status": "running"}
        # memory intact: the guest's own pattern holds, and it keeps running
        await src.qmp.execute("stop")
        a = await pmem(src, tmp_path, mem, "a.ram")
        assert check_guests_ram(np.frombuffer(a, np.uint8), AB_START) == 0
        await src.qmp.execute("cont")
        await trio.sleep(0.1)
        b = await pmem(src, tmp_path, mem, "b.ram")
        assert a != b
        # a second migration succeeds
        uri2 = _uri("unix", tmp_path)
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 34})
        async with vm_process(tmp_path, "dst2", "--incoming", uri2, "-S", memory="64M") as dst2:
            await src.qmp.execute("migrate", {"uri": uri2})
            info = await src.qmp.wait_migration()
            assert info["status"] == "completed", src.log()
            await dst2.qmp.wait_migration()
            assert await pmem(src, tmp_path, mem, "s.ram") == await pmem(dst2, tmp_path, mem, "d.ram")


async def test_destination_killed_midway(tmp_path, trio_timeout):
    uri = _uri("tcp", tmp_path)
    async with vm_process(tmp_path, "src", memory="64M", workload="ab,rate=5000") as src:
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 8 * MiB})
        async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", memory="64M") as dst:
            await src.qmp.execute("migrate", {"uri": uri})
            with trio.fail_after(20):
                while (await src.qmp.execute("query-migrate")).get("status") != "active":
                    await trio.sleep(0.02)
            await trio.sleep(0.3)
            dst.proc.kill()
            info = await src.qmp.wait_migration()
        assert info["status"] == "failed"
        assert info.get("error-desc")
        st = await src.qmp.execute("query-status")
        assert st["running"] is True and st["status"] == "running"
        await src.qmp.pump_events()
        assert _statuses(src)[-1] == "failed"


async def _converges(tmp_path, name, auto_converge: bool, seconds: float):
    uri = _uri("unix", tmp_path)
    async with vm_process(tmp_path, f"src-{name}", memory="32M", workload="random,rate=40000") as src, \
            vm_process(tmp_path, f"dst-{name}", "--incoming", uri, "-S", memory="32M") as _dst:
        # 40000 pages/s = 164 MB/s of dirtying against 16 MiB/s of bandwidth
        await src.qmp.execute("migrate-set-parameters", {
            "max-bandwidth": 16 * MiB, "downtime-limit": 100,
            "cpu-throttle-initial": 60, "cpu-throttle-increment": 20})
        if auto_converge:
            await src.qmp.execute("migrate-set-capabilities",
                                  {"capabilities": [{"capability": "auto-converge", "state": True}]})
        await src.qmp.execute("migrate", {"uri": uri})
        with trio.move_on_after(seconds):
            info = await src.qmp.wait_migration(timeout=seconds + 5)
            return info, await src.qmp.execute("x-query-migration-history")
        info = await src.qmp.execute("query-migrate")
        await src.qmp.execute("migrate_cancel")
        await src.qmp.wait_migration()
        return info, None


async def test_dirty_rate_above_bandwidth_needs_auto_converge(tmp_path, trio_timeout):
    info, _ = await _converges(tmp_path, "plain", False, 6.0)
    assert info["status"] == "active", info  # still going after 6 s: not converging
    assert info["ram"]["dirty-sync-count"] >= 3
    assert "cpu-throttle-percentage" not in info
    info, history = await _converges(tmp_path, "ac", True, 70.0)
    assert info["status"] == "completed", info
    throttles = [r["throttle-pct"] for r in history["iterations"]]
    assert max(throttles) >= 60


async def test_file_save_and_restore(tmp_path, trio_timeout):
    uri = f"file:{tmp_path / 'vm.stream'}"
    mem = 32 * MiB
    async with vm_process(tmp_path, "src", memory="32M", workload="ab,rate=50000") as src:
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", src.log()
        a = await pmem(src, tmp_path, mem, "a.ram")
    async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", memory="32M") as dst:
        dinfo = await dst.qmp.wait_migration()
        assert dinfo["status"] == "completed", dst.log()
        assert await pmem(dst, tmp_path, mem, "b.ram") == a
        await dst.qmp.execute("cont")
        assert (await dst.qmp.execute("query-status"))["running"] is True


async def test_garbage_stream_fails_destination_without_running(tmp_path, trio_timeout):
    port = free_port()
    async with vm_process(tmp_path, "dst", "--incoming", f"tcp:127.0.0.1:{port}", memory="16M") as dst:
        with trio.fail_after(10):
            while True:
                try:
                    s = await trio.open_tcp_stream("127.0.0.1", port)
                    break
                except OSError:
                    await trio.sleep(0.02)
        await s.send_all(b"QEVM\x00\x00\x00\x03" + b"\x09garbage" * 10)
        await s.aclose()
        info = await dst.qmp.wait_migration(statuses=("failed", "completed"))
        assert info["status"] == "failed"
        assert "error-desc" in info
        assert (await dst.qmp.execute("query-status"))["running"] is False


async def test_qmp_errors(tmp_path, trio_timeout):
    async with vm_process(tmp_path, "src", memory="16M") as src:
        q = src.qmp
        with pytest.raises(QMPTestError) as e:
            await q.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        with pytest.raises(QMPTestError) as e:
            await q.execute("migrate", {"uri": "bogus:thing"})
        assert e.value.error_class == "GenericError"
        with pytest.raises(QMPTestError) as e:
            await q.execute("migrate", {})
        assert e.value.error_class == "GenericError"
        with pytest.raises(QMPTestError) as e:
            await q.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:1"})
        assert e.value.error_class == "GenericError"
        with pytest.raises(QMPTestError):
            await q.execute("migrate-set-parameters", {"downtime-limit": 2000001})
        assert (await q.execute("query-migrate-parameters"))["downtime-limit"] == 300
        assert await q.execute("query-migrate") == {}
        # the connection is still usable after errors
        assert (await q.execute("query-status"))["running"] is True


async def test_calc_dirty_rate_is_exact(tmp_path, trio_timeout):
    async with vm_process(tmp_path, "src", memory="64M", workload="ab,rate=2000") as src:
        await src.qmp.execute("calc-dirty-rate", {"calc-time": 1})
        with trio.fail_after(10):
            while (res := await src.qmp.execute("query-dirty-rate"))["status"] != "measured":
                await trio.sleep(0.05)
        # ab at 2000 pages/s touches ~2000 distinct pages per second = ~7.8 MiB/s
        assert 4 <= res["dirty-rate"] <= 12, res


def _qemu_qmp_scenario(src_path: str, dst_path: str, uri: str) -> dict:
    from qemu.qmp import QMPClient

    async def main():
        src, dst = QMPClient("src"), QMPClient("dst")
        await src.connect(src_path)
        await dst.connect(dst_path)
        try:
            with src.listener(("MIGRATION",)) as listener:
                await src.execute("migrate", {"uri": uri})
                seen = []
                while True:
                    ev = await asyncio.wait_for(listener.get(), 60)
                    assert "timestamp" in ev and set(ev["timestamp"]) == {"seconds", "microseconds"}
                    seen.append(ev["data"]["status"])
                    if ev["data"]["status"] in ("completed", "failed", "cancelled"):
                        break
            while (await dst.execute("query-migrate"))["status"] != "completed":
                await asyncio.sleep(0.02)
            return {"events": seen, "src": await src.execute("query-status"),
                    "dst": await dst.execute("query-status"), "greeting": src.greeting._raw}
        finally:
            await src.disconnect()
            await dst.disconnect()

    return asyncio.run(main())


async def test_driven_by_qemu_qmp_client(tmp_path, trio_timeout):
    uri = _uri("unix", tmp_path)
    async with vm_process(tmp_path, "dst", "--incoming", uri, memory="32M") as dst, \
            vm_process(tmp_path, "src", memory="32M", workload="hotset,rate=20000") as src:
        res = await trio.to_thread.run_sync(_qemu_qmp_scenario, src.qmp_path, dst.qmp_path, uri)
    assert res["events"] == ["setup", "active", "device", "completed"]
    assert res["src"]["status"] == "postmigrate"
    assert res["dst"]["status"] == "running"  # no -S: the destination resumes by itself
    assert {"major", "minor", "micro"} <= set(res["greeting"]["QMP"]["version"]["qemu"])
