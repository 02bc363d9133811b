"""``migrator demo``: the main job, end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import trio

pytestmark = pytest.mark.trio_timeout(120)


async def test_demo_json_and_report(tmp_path, trio_timeout):
    out = tmp_path / "report"
    proc = await trio.run_process(
        [sys.executable, "-m", "migrator", "demo", "--json", "--memory", "64M", "--report", str(out)],
        capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    res = json.loads(proc.stdout)
    assert res["ram_match"] is True
    info = res["query-migrate"]
    assert info["status"] == "completed"
    assert {"total-time", "setup-time", "downtime", "ram"} <= set(info)
    history = res["history"]
    assert len(history["iterations"]) == info["ram"]["dirty-sync-count"]
    assert res["destination-status"]["status"] == "running"  # after cont
    # the report of this migration
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).stat().st_size > 0
    pngs = list(out.glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    report = json.loads((out / "report.json").read_text())
    assert len(report["iterations"]) == len(history["iterations"])
    assert {k for k in history["iterations"][0]} <= set(report["iterations"][0])


async def test_demo_rejects_bad_arguments(tmp_path):
    proc = await trio.run_process([sys.executable, "-m", "migrator", "demo", "--memory", "lots"],
                                  capture_stdout=True, capture_stderr=True, check=False)
    assert proc.returncode == 2
    assert b"invalid size" in proc.stderr


async def test_run_rejects_bad_accel_and_uri(tmp_path):
    for args, needle in ((["--accel", "tcg"], b"unknown accelerator"),
                         (["--accel", "sim,pml=maybe"], b"on|off"),
                         (["--incoming", "ftp:x"], b"--incoming"),
                         (["--workload", "ab,rate=-3"], b"> 0")):
        proc = await trio.run_process(
            [sys.executable, "-m", "migrator", "run", "--qmp", f"unix:{tmp_path}/q.sock", *args],
            capture_stdout=True, capture_stderr=True, check=False, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, (args, proc.stderr)
        assert needle in proc.stderr, (args, proc.stderr)


async def test_run_startup_errors_are_one_clear_line(tmp_path):
    for args, needle in ((["--incoming", f"file:{tmp_path}/missing.stream"], b"missing.stream"),
                         (["--qmp", f"unix:{tmp_path}/no/such/dir/q.sock"], b"--qmp unix:")):
        cmd = [sys.executable, "-m", "migrator", "run", "--memory", "16M"]
        if "--qmp" not in args:
            cmd += ["--qmp", f"unix:{tmp_path}/q.sock"]
        proc = await trio.run_process(cmd + args, capture_stdout=True, capture_stderr=True, check=False,
                                      stdin=subprocess.DEVNULL)
        assert proc.returncode == 1, proc.stderr
        assert needle in proc.stderr and b"Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count(b"\n") == 1, proc.stderr
