"""Acceptance regressions found by driving ``migrator run`` like QEMU."""

from __future__ import annotations

import pytest

from .harness import QMPTestError, free_port, vm_process


async def test_migrate_incoming_can_be_retried_after_a_failed_start(tmp_path):
    # QEMU latches "already started" only once listening succeeded.
    async with vm_process(tmp_path, "dst", "--incoming", "defer") as dst:
        with pytest.raises(QMPTestError) as exc:
            await dst.qmp.execute("migrate-incoming", {"uri": f"file:{tmp_path}/missing/img"})
        assert "No such file" in exc.value.desc
        with pytest.raises(QMPTestError):
            await dst.qmp.execute("migrate-incoming", {"uri": "bogus"})
        port = free_port()
        await dst.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        assert (await dst.qmp.execute("query-migrate"))["status"] == "setup"
        with pytest.raises(QMPTestError) as exc:
            await dst.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{free_port()}"})
        assert exc.value.desc == "The incoming migration has already been started"


async def test_refused_destination_fails_and_source_keeps_running(tmp_path):
    async with vm_process(tmp_path, "src") as src:
        await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{free_port()}"})
        info = await src.qmp.wait_migration()
        assert info["status"] == "failed" and "error-desc" in info and "ram" not in info
        setups = [e for e in src.qmp.events if e["event"] == "MIGRATION"]
        assert [e["data"]["status"] for e in setups] == ["setup", "failed"]
        assert (await src.qmp.execute("query-status"))["status"] == "running"


def test_demo_shows_why_a_child_failed_to_start():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "migrator", "demo", "--memory", "1K", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "positive multiple of 4096" in proc.stderr  # the child's own reason, not just its exit code


async def test_paused_source_gives_a_paused_destination(tmp_path, trio_timeout):
    """QEMU carries the source's run state (globalstate): a guest that was
    paused when it left must not start running on the destination."""
    uri = f"file:{tmp_path / 'paused.stream'}"
    async with vm_process(tmp_path, "src", memory="16M", workload="ab,rate=5000") as src:
        await src.qmp.execute("stop")
        await src.qmp.execute("migrate", {"uri": uri})
        assert (await src.qmp.wait_migration())["status"] == "completed"
    async with vm_process(tmp_path, "dst", "--incoming", uri, memory="16M") as dst:  # no -S
        assert (await dst.qmp.wait_migration())["status"] == "completed"
        st = await dst.qmp.execute("query-status")
        assert st["running"] is False and st["status"] == "paused", st
        await dst.qmp.execute("cont")
        assert (await dst.qmp.execute("query-status"))["running"] is True
