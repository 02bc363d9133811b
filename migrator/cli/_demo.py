"""``migrator demo``: a source and a destination process, driven over QMP.

This is the driver side, so it uses qemu.qmp's ``QMPClient`` (asyncio), as
a user's tooling would; the engine, server and channels stay on trio.  The
demo runs under its own ``asyncio.run`` and never inside a trio run.

Flow: start the destination (``-S``, so it stays paused after the
migration and its RAM can be compared) and the source; enable ``events``;
``migrate``; poll ``query-migrate`` every 50 ms (progress bar); on
completion dump both RAMs with ``pmemsave`` (the source is stopped after a
completed migration, the destination paused) and compare them; fetch
``x-query-migration-history``; ``cont`` the destination and check it runs;
``quit`` both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
from qemu.qmp import QMPClient

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def _checked(check: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse ``type=`` that checks the text with ``check`` (whose usage
    error argparse reports) and keeps the text: the demo hands it on to its
    two ``migrator run`` processes unchanged."""

    def convert(text: str) -> str:
        check(text)
        return text

    convert.__name__ = getattr(check, "__name__", "value")
    return convert


def add_demo_arguments(p: argparse.ArgumentParser, size: Callable[[str], Any], accel: Callable[[str], Any],
                       workload: Callable[[str], Any]) -> None:
    from ._cli import _smp
    p.add_argument("--memory", "-m", type=size, default="256M", help="guest RAM (default 256M)")
    p.add_argument("--workload", type=_checked(workload), default="ab,rate=20000",
                   help="guest workload NAME[,rate=PAGES_PER_S] (default ab,rate=20000: 80 MB/s of writes)")
    p.add_argument("--accel", type=_checked(accel), default="sim", help="accelerator for both sides (default sim)")
    p.add_argument("--smp", type=_smp, default=1, metavar="N", help="vCPUs on both sides (default 1)")
    p.add_argument("--transport", choices=("unix", "tcp", "file"), default="tcp",
                   help="migration channel (default tcp on loopback)")
    p.add_argument("--max-bandwidth", type=int, help="bytes/s (QEMU default 134217728)")
    p.add_argument("--downtime-limit", type=int, help="ms (QEMU default 300)")
    p.add_argument("--auto-converge", action="store_true", help="enable the auto-converge capability")
    p.add_argument("--predictive-switchover", action="store_true",
                   help="set x-predictive-switchover: switch over when the predicted downtime fits "
                        "downtime-limit (not QEMU's rule)")
    p.add_argument("--json", action="store_true", help="print one JSON object (query-migrate, history, ram_match)")
    p.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    p.add_argument("--report", metavar="DIR", help="write a convergence report of this migration to DIR")
    p.add_argument("--warmup", type=float, default=0.2,
                   help="seconds the guest runs before the migration starts (default 0.2)")
    p.add_argument("--timeout", type=float, default=120.0, help="cancel the migration after this many seconds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _execute(qmp: QMPClient, cmd: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """``qmp.execute``, whose return qemu.qmp types as ``object``: every
    command the demo sends returns a JSON object."""
    reply = await qmp.execute(cmd, arguments)
    if not isinstance(reply, dict):
        raise RuntimeError(f"{cmd}: expected a JSON object, got {reply!r}")
    return reply


async def _connect(path: str, proc: subprocess.Popen[bytes], timeout: float = 30.0,
                   log: IO[str] | None = None) -> QMPClient:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            why = ""
            if log is not None:
                log.seek(0)
                why = ": " + log.read().strip()[-500:]
            raise RuntimeError(f"migrator process exited with {proc.returncode} before its QMP socket appeared{why}")
        if os.path.exists(path):
            qmp = QMPClient(os.path.basename(path))
            try:
                await qmp.connect(path)
                return qmp
            except Exception:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for QMP socket {path}")
        await asyncio.sleep(0.02)


def _compare_dumps(a: str, b: str) -> tuple[bool, int]:
    ma = np.memmap(a, dtype=np.uint8, mode="r")
    mb = np.memmap(b, dtype=np.uint8, mode="r")
    if ma.size != mb.size:
        return False, -1
    step = 64 << 20
    bad_pages = 0
    for off in range(0, ma.size, step):
        x = ma[off:off + step].reshape(-1, 4096)
        y = mb[off:off + step].reshape(-1, 4096)
        bad_pages += int((x != y).any(axis=1).sum())
    return bad_pages == 0, bad_pages


class _Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._t0 = time.monotonic()

    def update(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        ram = info.get("ram")
        if not ram:
            return
        if self._bar is None:
            if time.monotonic() - self._t0 < 1.0:
                return  # only migrations longer than a second get a bar
            from rich.console import Console
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TransferSpeedColumn)

            self._bar = Progress(TextColumn("[bold]migrating[/] pass {task.fields[passes]}"), BarColumn(),
                                 DownloadColumn(), TransferSpeedColumn(),
                                 TextColumn("remaining {task.fields[remaining]}"), TimeElapsedColumn(),
                                 transient=True, console=Console(file=sys.stderr))
            self._bar.start()
            self._task = self._bar.add_task("mig", total=ram.get("total", 0), passes=0, remaining="")
        if self._task is None:  # pragma: no cover - set with the bar
            return
        total = ram.get("total", 0)
        done = max(0, total - ram.get("remaining", 0))
        self._bar.update(self._task, completed=done, passes=ram.get("dirty-sync-count", 0),
                         remaining=f"{ram.get('remaining', 0) / 2**20:.1f} MiB")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="migrator-demo-")
    src_qmp = os.path.join(tmp, "src.qmp")
    dst_qmp = os.path.join(tmp, "dst.qmp")
    if args.transport == "tcp":
        uri = f"tcp:127.0.0.1:{_free_port()}"
    elif args.transport == "unix":
        uri = f"unix:{os.path.join(tmp, 'migration.sock')}"
    else:
        uri = f"file:{os.path.join(tmp, 'migration.stream')}"
    mem = f"{args.memory}B"  # bytes (a bare number would mean MiB, as in QEMU)
    base = [sys.executable, "-m", "migrator", "run", "--accel", args.accel, "--memory", mem, "--smp", str(args.smp)]
    logs: dict[str, IO[str]] = {}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, extra: list[str]) -> None:
        logs[name] = open(os.path.join(tmp, f"{name}.log"), "w+")
        procs[name] = subprocess.Popen(base + extra, stdout=logs[name], stderr=subprocess.STDOUT)

    async def connect(name: str, path: str) -> QMPClient:
        return await _connect(path, procs[name], log=logs[name])  # the log: why a start-up failed

    file_mode = args.transport == "file"
    spawn("src", ["--workload", args.workload, "--qmp", f"unix:{src_qmp}", "--label", "source"])
    if not file_mode:
        spawn("dst", ["--qmp", f"unix:{dst_qmp}", "--incoming", uri, "-S", "--label", "destination"])
    src: QMPClient | None = None
    dst: QMPClient | None = None
    result: dict[str, Any] = {"uri": uri}
    progress = _Progress(enabled=not (args.quiet or args.json) and sys.stderr.isatty())
    try:
        src = await connect("src", src_qmp)
        # the explicit ownership hand-over (README "Who owns the guest"), on both sides
        handover = [] if file_mode else [{"capability": "x-handover", "state": True}]
        caps = [{"capability": "events", "state": True}] + handover
        if args.auto_converge:
            caps.append({"capability": "auto-converge", "state": True})
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        params: dict[str, Any] = {}
        if args.max_bandwidth is not None:
            params["max-bandwidth"] = args.max_bandwidth
        if args.downtime_limit is not None:
            params["downtime-limit"] = args.downtime_limit
        if getattr(args, "predictive_switchover", False):
            params["x-predictive-switchover"] = True
        if params:
            await src.execute("migrate-set-parameters", params)
        if not file_mode:
            dst = await connect("dst", dst_qmp)
            await dst.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "events", "state": True}] + handover})
        await asyncio.sleep(args.warmup)  # let the guest run (and dirty memory) first
        await src.execute("migrate", {"uri": uri})
        deadline = time.monotonic() + args.timeout
        while True:
            info = await _execute(src, "query-migrate")
            progress.update(info)
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if time.monotonic() > deadline and not result.get("timed-out"):
                # cancel, then report what happened (the history of a
                # migration that did not converge is worth reading)
                await src.execute("migrate_cancel")
                result["timed-out"] = True
            await asyncio.sleep(0.05)
        progress.close()
        result["query-migrate"] = info
        result["history"] = await _execute(src, "x-query-migration-history")
        if file_mode and info.get("status") == "completed":
            spawn("dst", ["--qmp", f"unix:{dst_qmp}", "--incoming", uri, "-S", "--label", "destination"])
            dst = await connect("dst", dst_qmp)
        if dst is not None:
            while (await _execute(dst, "query-migrate")).get("status") not in ("completed", "failed"):
                await asyncio.sleep(0.02)
            result["destination-query-migrate"] = await _execute(dst, "query-migrate")
        if info.get("status") == "completed" and dst is not None:
            # the source is stopped after completion; the destination was started with -S
            size = args.memory
            a, b = os.path.join(tmp, "src.ram"), os.path.join(tmp, "dst.ram")
            await src.execute("pmemsave", {"val": 0, "size": size, "filename": a})
            await dst.execute("pmemsave", {"val": 0, "size": size, "filename": b})
            match, bad = _compare_dumps(a, b)
            result["ram_match"] = match
            result["ram_mismatched_pages"] = bad
            os.unlink(a)
            os.unlink(b)
            await dst.execute("cont")
            await asyncio.sleep(0.1)
            result["destination-status"] = await _execute(dst, "query-status")
        else:
            result["ram_match"] = False
        if dst is not None:
            # the destination's own moments (first byte, stream received,
            # device state loaded, acknowledged, resumed -- by the `cont`
            # above, since it runs with -S), merged into the source's history
            dst_hist = await _execute(dst, "x-query-migration-history")
            if dst_hist.get("destination"):
                result["history"]["destination"] = dst_hist["destination"]
    finally:
        progress.close()
        for q in (src, dst):
            if q is not None:
                try:
                    await q.execute("quit")
                except Exception:
                    pass
                try:
                    await q.disconnect()
                except Exception:
                    pass
        for p in procs.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for f in logs.values():
            f.seek(0)
            result.setdefault("logs", {})[os.path.basename(f.name)] = f.read()[-4000:]
            f.close()
    return result


def _summary(res: dict[str, Any]) -> str:
    info = res.get("query-migrate", {})
    ram = info.get("ram", {})
    hist = res.get("history", {})
    lines = [
        f"status            {info.get('status')}",
        f"total time        {info.get('total-time')} ms (setup {info.get('setup-time')} ms)",
        f"downtime          {info.get('downtime')} ms",
        f"transferred       {ram.get('transferred', 0) / 2**20:.1f} MiB at {ram.get('mbps', 0):.0f} Mbps",
        f"pages             {ram.get('normal', 0)} normal, {ram.get('duplicate', 0)} zero",
        f"dirty syncs       {ram.get('dirty-sync-count')}",
        f"RAM match         {res.get('ram_match')}",
    ]
    dt = hist.get("downtime") or {}
    if dt:
        lines.append("downtime split    " + ", ".join(
            f"{k.replace('-ms', '')} {v:.1f}" for k, v in dt.items() if k != "total-ms") + " (ms)")
    if "destination-status" in res:
        lines.append(f"destination       {res['destination-status'].get('status')} after cont")
    pred = hist.get("downtime-prediction") or {}
    if pred.get("total-ms") is not None:
        lines.append(f"downtime predicted {pred['total-ms']:.1f} ms at the switchover (engine model)")
    if hist.get("iterations"):
        lines.append("")
        lines.append("dirty/s = exact dirty rate (pages this sync found / time since the previous one); "
                     "est MB/s = QEMU's bandwidth estimate")
        lines.append(f"{'pass':>4} {'t(ms)':>8} {'dirty':>8} {'dirty/s':>8} {'sent':>8} {'zero':>8} "
                     f"{'remaining':>12} {'est MB/s':>8} {'thr%':>4}")
        for r in hist["iterations"]:
            rate = r.get("exact-dirty-rate-pages-per-s", 0.0)
            mark = " switchover" if r.get("switchover") else (" final" if r.get("final") else "")
            lines.append(f"{r['iteration']:>4} {r['time-ms']:>8.1f} {r['dirty-pages']:>8} "
                         f"{rate:>8.0f} {r['normal-pages']:>8} "
                         f"{r['zero-pages']:>8} {r['remaining-bytes']:>12} "
                         f"{r['bandwidth-bytes-per-s'] / 1e6:>8.1f} {r['throttle-pct']:>4}{mark}")
    return "\n".join(lines)


def demo_main(args: argparse.Namespace) -> int:
    try:
        res = asyncio.run(run_demo(args))
    except Exception as exc:  # report cleanly, never a traceback for a failed demo
        print(f"migrator demo: {exc}", file=sys.stderr)
        return 1
    if res.get("timed-out"):
        print(f"migrator demo: migration did not finish in {args.timeout:g} s; cancelled", file=sys.stderr)
    if args.report:
        from ..engine._history import MigrationHistory
        from ..reports._report import write_report

        hist = MigrationHistory.from_json(res["history"])
        try:
            write_report([hist], Path(args.report))
        except OSError as exc:  # an unwritable --report DIR: clear error, no traceback
            print(f"migrator demo: --report {args.report}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    logs = res.pop("logs", {})
    if args.json:
        print(json.dumps(res))
    else:
        print(_summary(res))
        if args.report:
            print(f"report written to {args.report}/report.html")
    ok = res.get("query-migrate", {}).get("status") == "completed" and res.get("ram_match")
    if not ok and not args.json:
        for name, text in logs.items():
            print(f"--- {name} ---\n{text}", file=sys.stderr)
    return 0 if ok else 1
