"""Throughput of the migration data path (issue 5, item 4).

Three measurements:

1. **Bulk migration against the raw socket.**  Per transport (tcp loopback,
   unix), a guest full of non-zero data (``--workload fill``) is migrated
   between two ``migrator run`` processes (the destination started with
   ``--incoming URI -S``, so it pre-faults its RAM and stays paused), with
   ``max-bandwidth`` at 1 TiB/s (QEMU semantics: 0 is not "unlimited") and the
   default 300 ms ``downtime-limit``.  Interleaved with it, in the same run,
   a RAW transfer of the same number of bytes between two other processes:
   blocking ``sendall(memoryview)`` -> ``recv_into`` a pre-allocated,
   pre-faulted buffer, with the same 4 MiB ``SO_SNDBUF``/``SO_RCVBUF`` the
   migration channel uses (the machine's limit; python-stack.md section 5).
   Migration bytes/s = ``ram.transferred`` / wall time from sending
   ``migrate`` to the source's ``MIGRATION completed`` event (which the
   source emits only after the destination acknowledged the whole stream);
   the source's own ``total-time`` is reported next to it.  Raw bytes/s is
   timed at the receiver from ``accept`` to the last byte.  GB = 1e9 bytes.
   ``ratio`` = migration / raw, per run; the medians of each are reported.
   **Downtime check** (issue 11): each bulk run is done once per switchover
   rule (``--switchover``: ``qemu`` = QEMU's pending < bandwidth x
   downtime-limit; ``predictive`` = ``x-predictive-switchover``, the
   predicted stop-and-copy time <= downtime-limit), and every run prints the
   engine's predicted downtime (its model, at the switchover), QEMU's
   expected downtime (pending / bandwidth at that sync) and the actual
   downtime, against the 1.1 x downtime-limit target.
2. **Zero pages.**  A zero-filled guest (``--workload idle``; its RAM is
   never touched): zero-page detection rate (pages/s over the wall time) and
   total time.
3. **Dirty-sync cost** for 1, 16 and 256 GiB simulated guests (bitmaps of
   32 KiB to 8 MiB), in-process: the memory system + SimKVM + KVM listener of
   ``migrator.engine._machine.Machine`` per mode (legacy GET, write-protect-all,
   manual protect), a fixed fraction of the pages dirtied through the
   simulated vCPU fault path, then timed: ``memory_global_dirty_log_sync``
   (GET for every slot; in write-protect-all mode plus the one
   ``KVM_WRITE_PROTECT_ALL_MEM``), the migration bitmap xchg + OR
   (``RAMSaveState.bitmap_sync`` minus the former) and, in manual mode, the
   ``KVM_CLEAR_DIRTY_LOG`` calls that the sender issues lazily per chunk
   (measured by draining the dirty pages with ``next_batch``; no page is
   read).  Every page is first mapped through the vCPU fault path (a booted
   guest has touched its RAM), so the MMU is fully populated: 256 GiB is
   feasible here (RAM is MAP_NORESERVE and never touched; the simulator's
   per-gfn arrays peak at ~3.5 GiB RSS for 256 GiB in the legacy and
   write-protect-all modes, 0.3 GiB in manual mode), each point in its own
   process, skipped if MemAvailable looks too small.

Reference (stock QEMU 7.2 on this class of machine): 1 GiB of non-zero
guest RAM over tcp loopback in 1.9 s (0.57 GB/s), 0.52 s when the
destination's RAM is pre-faulted.

The machine is shared (2 cores, other sessions benchmark too): numbers vary
by +-30-50 %; raw and migration runs are interleaved and medians reported.

Usage::

    python tools/bench_throughput.py [--json] [--memory 1G] [--runs 3]
        [--transports tcp,unix] [--skip bulk,multifd,idle,sync] [--sync-sizes 1G,16G,256G]
        [--switchover qemu,predictive] [--downtime-limit 300]
        [--multifd 1:none,2:none,4:none,1:zstd,2:zstd,4:zstd] [--no-qemu]
        [--profile DIR]   # py-spy flame data of both migrator processes

``--json`` prints one JSON object per line; otherwise a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from pathlib import Path

import numpy as np
from qemu.qmp import ConnectError
from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migrator.engine import parse_size  # noqa: E402  (after the path fix-up)

GB = 1e9
PS = 4096
RAW_SOCKBUF = 4 << 20  # transport.channel.SOCKET_BUFFER_BYTES
RAW_CHUNK = 4 << 20
MAX_BANDWIDTH = 1 << 40  # 1 TiB/s: "unlimited"
QEMU_REFERENCE = {
    "qemu_version": "7.2",
    "what": "1 GiB non-zero guest over tcp loopback",
    "total_s": 1.9,
    "bytes_per_s": 0.57e9,
    "prefaulted_destination_total_s": 0.52,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- helpers -------------------------------------------------------------------
def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def machine_busy(interval: float = 0.5) -> float:
    """Fraction of all CPUs busy over ``interval`` (other sessions' load)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals), vals[3] + vals[4]

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def qmp_connect(path: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> QEMUMonitorProtocol:
    """qemu.qmp's synchronous client, once the process has created its QMP socket.

    The driver only waits (it never competes for CPU): commands and events
    go through ``QEMUMonitorProtocol``; only the wait for the socket to
    appear is ours (the source fills its RAM before it listens).
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {path} appeared")
        if os.path.exists(path):
            qmp = QEMUMonitorProtocol(path, nickname=os.path.basename(path))
            try:
                qmp.connect()
            except (ConnectError, OSError):
                qmp.close()
            else:
                qmp.settimeout(timeout)
                return qmp
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {path}")
        time.sleep(0.02)


def wait_migration_event(qmp: QEMUMonitorProtocol,
                         statuses: tuple[str, ...] = ("completed", "failed", "cancelled")) -> tuple[str, float]:
    """Block until a MIGRATION event with one of ``statuses``; (status, perf_counter at arrival)."""
    while True:
        ev = qmp.pull_event(wait=True)
        if ev is not None and ev["event"] == "MIGRATION" and ev["data"]["status"] in statuses:
            return ev["data"]["status"], time.perf_counter()


# -- raw socket transfer ---------------------------------------------------------
def raw_receiver(kind: str, where: str, nbytes: int) -> None:
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    addr = where if kind == "unix" else ("127.0.0.1", int(where))
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RAW_SOCKBUF)
    ls.bind(addr)
    ls.listen(1)
    dst = np.empty(nbytes, np.uint8)
    dst[::PS] = 1  # pre-fault
    print("READY", flush=True)
    conn, _ = ls.accept()
    c0, t0 = self_cpu_s(), time.perf_counter()
    mv = memoryview(dst)
    got = 0
    while got < nbytes:
        n = conn.recv_into(mv[got:got + RAW_CHUNK])
        if not n:
            break
        got += n
    dt, cpu = time.perf_counter() - t0, self_cpu_s() - c0
    print(json.dumps({"bytes": got, "seconds": dt, "cpu_s": cpu}), flush=True)


def raw_sender(kind: str, where: str, nbytes: int) -> None:
    fam = socket.AF_UNIX if kind == "unix" else socket.AF_INET
    addr = where if kind == "unix" else ("127.0.0.1", int(where))
    data = np.empty(nbytes, np.uint8)
    block = np.random.default_rng(0).integers(1, 256, min(nbytes, 16 << 20), dtype=np.uint8)
    for off in range(0, nbytes, block.size):
        data[off:off + block.size] = block[: nbytes - off]
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, RAW_SOCKBUF)
    print("READY", flush=True)
    sys.stdin.readline()  # go
    s.connect(addr)
    c0 = self_cpu_s()
    s.sendall(memoryview(data))
    s.close()
    print(json.dumps({"cpu_s": self_cpu_s() - c0}), flush=True)


def run_raw(kind: str, tmp: str, nbytes: int) -> dict:
    where = os.path.join(tmp, "raw.sock") if kind == "unix" else str(free_port())
    with suppress(FileNotFoundError):
        os.unlink(os.path.join(tmp, "raw.sock"))
    me = [sys.executable, __file__]
    recv = subprocess.Popen(me + ["--_raw", "recv", kind, where, str(nbytes)], stdout=subprocess.PIPE, text=True)
    send = subprocess.Popen(me + ["--_raw", "send", kind, where, str(nbytes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout.readline().strip() == "READY"
        assert send.stdout.readline().strip() == "READY"
        send.stdin.write("go\n")
        send.stdin.flush()
        r = json.loads(recv.stdout.readline())
        s = json.loads(send.stdout.readline())
        recv.wait(timeout=60)
        send.wait(timeout=60)
    finally:
        for p in (recv, send):
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"bytes": r["bytes"], "seconds": r["seconds"], "bytes_per_s": r["bytes"] / r["seconds"],
            "cpu_s_send": s["cpu_s"], "cpu_s_recv": r["cpu_s"]}


# -- one migration -----------------------------------------------------------------
def quit_all(qmps: dict, procs: dict) -> None:
    """``quit`` every VM (ours or QEMU), then wait for (or kill) its process."""
    for q in qmps.values():
        with suppress(Exception):  # best effort: the VM may have died already
            q.cmd("quit")
        # quit closes the connection from the VM's side; when its EOF reached
        # qemu.qmp's reader before close() (a race, with stock QEMU 7.2 as with
        # ours), legacy close() re-raises that EOFError: the expected end here.
        with suppress(EOFError):
            q.close()
    for p in procs.values():
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_migration(kind: str, tmp: str, memory: int, workload: str, *, profile_dir: str | None = None,
                  tag: str = "", downtime_limit: int = 300, verify: bool = False,
                  switchover: str = "qemu", multifd: tuple[int, str] | None = None) -> dict:
    src_qmp, dst_qmp = os.path.join(tmp, "src.qmp"), os.path.join(tmp, "dst.qmp")
    uri = f"unix:{os.path.join(tmp, 'mig.sock')}" if kind == "unix" else f"tcp:127.0.0.1:{free_port()}"
    base = [sys.executable, "-m", "migrator", "run", "--accel", "sim", "--memory", f"{memory}B"]
    procs: dict[str, subprocess.Popen] = {}
    logs = {}
    qmps: dict[str, QEMUMonitorProtocol] = {}

    def spawn(name: str, extra: list[str]) -> None:
        cmd = base + extra
        if profile_dir:
            out = os.path.join(profile_dir, f"{tag}-{name}.txt")
            cmd = ["py-spy", "record", "--nonblocking", "--format", "raw", "--rate", "250", "-o", out, "--"] + cmd
        logs[name] = open(os.path.join(tmp, f"{name}.log"), "w+")
        procs[name] = subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, cwd=ROOT)

    def pid(name: str) -> int:
        p = procs[name]
        if not profile_dir:
            return p.pid
        out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else p.pid

    try:
        spawn("dst", ["--qmp", f"unix:{dst_qmp}", "--incoming", "defer" if multifd else uri, "-S",
                      "--label", "dst"])
        spawn("src", ["--workload", workload, "--qmp", f"unix:{src_qmp}", "--label", "src"])
        qmps["dst"] = qmp_connect(dst_qmp, procs["dst"])
        qmps["src"] = qmp_connect(src_qmp, procs["src"])
        src, dst = qmps["src"], qmps["dst"]
        if multifd:
            set_multifd([src, dst], *multifd)
            dst.cmd("migrate-incoming", **{"uri": uri})
        src.cmd("migrate-set-capabilities", **{"capabilities": [{"capability": "events", "state": True}]})
        src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": downtime_limit,
                                               "x-predictive-switchover": switchover == "predictive"})
        time.sleep(0.2)  # let both settle (the destination has pre-faulted by now: it answered QMP)
        cpu0 = {n: proc_cpu_s(pid(n)) for n in procs}
        t0 = time.perf_counter()
        src.cmd("migrate", **{"uri": uri})
        status, t1 = wait_migration_event(src)
        wall = t1 - t0
        cpu = {n: proc_cpu_s(pid(n)) - cpu0[n] for n in procs}
        info = src.cmd("query-migrate")
        dinfo = dst.cmd("query-migrate")
        hist = src.cmd("x-query-migration-history")
        ram = info.get("ram", {})
        out = {
            "status": status,
            "destination_status": dinfo.get("status"),
            "wall_s": wall,
            "transferred": ram.get("transferred"),
            "normal_pages": ram.get("normal"),
            "zero_pages": ram.get("duplicate"),
            "dirty_sync_count": ram.get("dirty-sync-count"),
            "total_time_ms": info.get("total-time"),
            "setup_time_ms": info.get("setup-time"),
            "downtime_ms": info.get("downtime"),
            "destination_total_time_ms": dinfo.get("total-time"),
            "downtime_breakdown": hist.get("downtime"),
            **downtime_check(hist, downtime_limit),
            "prediction": hist.get("downtime-prediction"),
            "switchover": switchover,
            "cpu_s_src": cpu["src"],
            "cpu_s_dst": cpu["dst"],
        }
        if verify and status == "completed":
            a, b = os.path.join(tmp, "src.ram"), os.path.join(tmp, "dst.ram")
            src.cmd("pmemsave", **{"val": 0, "size": memory, "filename": a})
            dst.cmd("pmemsave", **{"val": 0, "size": memory, "filename": b})
            ma, mb = np.memmap(a, np.uint8, mode="r"), np.memmap(b, np.uint8, mode="r")
            step = 64 << 20
            out["ram_match"] = all(np.array_equal(ma[o:o + step], mb[o:o + step]) for o in range(0, memory, step))
            del ma, mb
            os.unlink(a)
            os.unlink(b)
        return out
    finally:
        quit_all(qmps, procs)
        for name, f in logs.items():
            f.seek(0)
            text = f.read()
            f.close()
            if procs[name].returncode not in (0, None) or "Traceback" in text:
                print(f"--- {name} log ---\n{text[-3000:]}", file=sys.stderr)


def downtime_check(hist: dict, limit_ms: int) -> dict:
    """Predicted (engine model), QEMU-expected and actual downtime of one history."""
    rows = [r for r in hist.get("iterations", []) if r.get("switchover")]
    pred = hist.get("downtime-prediction") or {}
    actual = (hist.get("downtime") or {}).get("total-ms")
    return {
        "downtime_limit_ms": limit_ms,
        "predicted_downtime_ms": pred.get("total-ms"),
        "qemu_expected_downtime_ms": rows[-1].get("expected-downtime-ms") if rows else None,
        "actual_downtime_ms": actual,
        "downtime_within_1_1x": None if actual is None else actual <= 1.1 * limit_ms,
        "switchover_iteration": rows[-1]["iteration"] if rows else None,
        "last_stage_throughput_bytes_per_s": next(
            (r.get("throughput-bytes-per-s") for r in hist.get("iterations", []) if r.get("final")), None),
        "predicted_throughput_bytes_per_s": pred.get("throughput-bytes-per-s"),
    }


def bench_bulk(args, tmp: str) -> list[dict]:
    memory = args.memory
    per: dict[str, dict[str, list]] = {k: {"raw": [], "mig": []} for k in args.transports}
    checks: list[dict] = []
    for run in range(args.runs):
        for kind in args.transports:
            busy = machine_busy()
            raw = run_raw(kind, tmp, memory)
            mig = None
            for mode in args.switchover:  # side by side, same run
                m = run_migration(kind, tmp, memory, "fill", profile_dir=args.profile,
                                  tag=f"{kind}{run}{mode}", verify=args.verify, switchover=mode,
                                  downtime_limit=args.downtime_limit)
                checks.append({"bench": "downtime", "transport": kind, "run": run, "machine_busy_before": busy,
                               **{k: m[k] for k in ("switchover", "status", "downtime_limit_ms",
                                                    "predicted_downtime_ms", "qemu_expected_downtime_ms",
                                                    "actual_downtime_ms", "downtime_within_1_1x",
                                                    "switchover_iteration", "dirty_sync_count",
                                                    "total_time_ms", "last_stage_throughput_bytes_per_s",
                                                    "predicted_throughput_bytes_per_s", "downtime_breakdown")},
                               "prediction": m.get("prediction")})
                if args.verbose:
                    c = checks[-1]
                    print(f"# {kind} run {run} {mode}: downtime predicted {_f(c['predicted_downtime_ms'], 0)} ms, "
                          f"QEMU expected {_f(c['qemu_expected_downtime_ms'], 0)} ms, actual "
                          f"{_f(c['actual_downtime_ms'], 0)} ms", file=sys.stderr, flush=True)
                if mig is None:
                    mig = m
            mig["bytes_per_s"] = mig["transferred"] / mig["wall_s"] if mig["status"] == "completed" else None
            mig["machine_busy_before"] = busy
            per[kind]["raw"].append(raw)
            per[kind]["mig"].append(mig)
            if args.verbose:
                print(f"# {kind} run {run}: raw {raw['bytes_per_s'] / GB:.2f} GB/s, migration "
                      f"{(mig['bytes_per_s'] or 0) / GB:.2f} GB/s ({mig['status']}, wall {mig['wall_s']:.2f} s, "
                      f"total-time {mig['total_time_ms']} ms, downtime {mig['downtime_ms']} ms, CPU s src "
                      f"{mig['cpu_s_src']:.2f} dst {mig['cpu_s_dst']:.2f}, busy before {busy:.0%})",
                      file=sys.stderr, flush=True)
    results = []
    for kind in args.transports:
        raws, migs = per[kind]["raw"], per[kind]["mig"]
        ratios = [m["bytes_per_s"] / r["bytes_per_s"] if m["bytes_per_s"] else None for r, m in zip(raws, migs)]
        tt = [m["total_time_ms"] for m in migs if m["status"] == "completed"]
        mig_bps = median([m["bytes_per_s"] for m in migs])
        results.append({
            "bench": "bulk",
            "transport": kind,
            "memory_bytes": memory,
            "runs": len(migs),
            "completed": sum(m["status"] == "completed" for m in migs),
            "ram_match": [m.get("ram_match") for m in migs] if args.verify else None,
            "migration_bytes_per_s": mig_bps,
            "migration_bytes_per_s_total_time": median(
                [m["transferred"] / (m["total_time_ms"] / 1000) for m in migs if m["status"] == "completed"]),
            "raw_bytes_per_s": median([r["bytes_per_s"] for r in raws]),
            "ratio": median(ratios),
            "ratio_runs": ratios,
            "wall_s": median([m["wall_s"] for m in migs]),
            "total_time_ms": median(tt),
            "downtime_ms": median([m["downtime_ms"] for m in migs]),
            "setup_time_ms": median([m["setup_time_ms"] for m in migs]),
            "destination_total_time_ms": median([m["destination_total_time_ms"] for m in migs]),
            "transferred": median([m["transferred"] for m in migs]),
            "cpu_s_src": median([m["cpu_s_src"] for m in migs]),
            "cpu_s_dst": median([m["cpu_s_dst"] for m in migs]),
            "raw_cpu_s_send": median([r["cpu_s_send"] for r in raws]),
            "raw_cpu_s_recv": median([r["cpu_s_recv"] for r in raws]),
            "machine_busy_before": median([m["machine_busy_before"] for m in migs]),
            "qemu_reference": QEMU_REFERENCE,
            "speedup_vs_qemu_total": (QEMU_REFERENCE["total_s"] * 1000 / median(tt)) if tt else None,
            "runs_detail": [{"raw_bytes_per_s": r["bytes_per_s"], **m} for r, m in zip(raws, migs)],
        })
    return results + checks


# -- multifd rows and a stock QEMU row (issue 12) -----------------------------------
def set_multifd(qmps, channels: int, compression: str) -> None:
    for q in qmps:
        q.cmd("migrate-set-capabilities", **{"capabilities": [{"capability": "multifd", "state": True}]})
        q.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression})


def run_qemu_migration(kind: str, tmp: str, memory: int, multifd: tuple[int, str] | None = None) -> dict:
    """Stock QEMU -M none -> stock QEMU, the guest RAM filled with the same kind
    of non-zero data as ``--workload fill`` (a -device loader blob)."""
    qemu = shutil.which("qemu-system-x86_64")
    blob = os.path.join(tmp, "fill.bin")
    if not os.path.exists(blob) or os.path.getsize(blob) != memory:
        pages = np.arange(memory // PS, dtype=np.uint64)
        data = np.empty((memory // PS, PS // 8), dtype=np.uint64)
        data[:] = (pages[:, None] * np.uint64(0x9E3779B97F4A7C15)) | np.uint64(1)
        data.tofile(blob)
        del data
    uri = f"unix:{os.path.join(tmp, 'qmig.sock')}" if kind == "unix" else f"tcp:127.0.0.1:{free_port()}"
    base = [qemu, "-M", "none", "-m", f"{memory >> 20}M", "-nodefaults", "-display", "none"]
    procs, qmps = {}, {}
    try:
        for name, extra in (("dst", ["-incoming", "defer" if multifd else uri]),
                            ("src", ["-device", f"loader,file={blob},addr=0,force-raw=on"])):
            path = os.path.join(tmp, f"q{name}.qmp")
            procs[name] = subprocess.Popen(base + extra + ["-qmp", f"unix:{path},server=on,wait=off"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            qmps[name] = qmp_connect(path, procs[name])
        src, dst = qmps["src"], qmps["dst"]
        if multifd:
            set_multifd([src, dst], *multifd)
            dst.cmd("migrate-incoming", **{"uri": uri})
        src.cmd("migrate-set-capabilities", **{"capabilities": [{"capability": "events", "state": True}]})
        src.cmd("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        time.sleep(0.3)
        cpu0 = {n: proc_cpu_s(p.pid) for n, p in procs.items()}
        t0 = time.perf_counter()
        src.cmd("migrate", **{"uri": uri})
        status, t1 = wait_migration_event(src)
        cpu = {n: proc_cpu_s(p.pid) - cpu0[n] for n, p in procs.items()}
        info = src.cmd("query-migrate")
        ram = info.get("ram", {})
        return {"status": status, "wall_s": t1 - t0, "transferred": ram.get("transferred"),
                "normal_pages": ram.get("normal"), "total_time_ms": info.get("total-time"),
                "downtime_ms": info.get("downtime"), "cpu_s_src": cpu["src"], "cpu_s_dst": cpu["dst"]}
    finally:
        quit_all(qmps, procs)


def bench_multifd(args, tmp: str) -> list[dict]:
    """multifd configurations beside the raw single-stream socket (and stock
    QEMU, single stream and multifd, when installed), interleaved per run."""
    configs = [(int(c), comp) for c, comp in (x.split(":") for x in args.multifd.split(",") if x)]
    have_qemu = shutil.which("qemu-system-x86_64") is not None and not args.no_qemu
    rows: dict[tuple, list[dict]] = {}
    raws: dict[str, list[dict]] = {k: [] for k in args.transports}
    for run in range(args.runs):
        for kind in args.transports:
            raws[kind].append(run_raw(kind, tmp, args.memory))
            for cfg in [None, *configs]:
                m = run_migration(kind, tmp, args.memory, "fill", multifd=cfg, verify=args.verify,
                                  tag=f"mfd-{kind}{run}")
                rows.setdefault(("migrator", kind, cfg), []).append(m)
            if have_qemu:
                for cfg in [None, *configs[:1]]:
                    rows.setdefault(("qemu", kind, cfg), []).append(
                        run_qemu_migration(kind, tmp, args.memory, multifd=cfg))
            if args.verbose:
                print(f"# multifd {kind} run {run} done", file=sys.stderr, flush=True)
    out = []
    for (who, kind, cfg), ms in rows.items():
        raw_bps = [r["bytes_per_s"] for r in raws[kind]]
        ok = [m for m in ms if m["status"] == "completed"]
        bps = [m["transferred"] / m["wall_s"] if m["status"] == "completed" else None for m in ms]
        out.append({
            "bench": "multifd",
            "engine": who,
            "transport": kind,
            "channels": cfg[0] if cfg else 0,
            "compression": cfg[1] if cfg else "-",
            "memory_bytes": args.memory,
            "runs": len(ms),
            "completed": len(ok),
            "ram_match": [m.get("ram_match") for m in ms] if args.verify and who == "migrator" else None,
            # guest RAM moved per second of wall time (compression changes the bytes, not the RAM)
            "ram_bytes_per_s": median([args.memory / m["wall_s"] for m in ok]),
            "wire_bytes_per_s": median(bps),
            "raw_bytes_per_s": median(raw_bps),
            "ratio": median([args.memory / m["wall_s"] / r if m["status"] == "completed" else None
                             for m, r in zip(ms, raw_bps)]),
            "wall_s": median([m["wall_s"] for m in ok]),
            "total_time_ms": median([m["total_time_ms"] for m in ok]),
            "downtime_ms": median([m["downtime_ms"] for m in ok]),
            "transferred": median([m["transferred"] for m in ok]),
            "cpu_s_src": median([m["cpu_s_src"] for m in ok]),
            "cpu_s_dst": median([m["cpu_s_dst"] for m in ok]),
        })
    return out


def print_multifd_table(results: list[dict]) -> None:
    rows = [r for r in results if r["bench"] == "multifd"]
    if not rows:
        return
    r0 = rows[0]
    print(f"multifd: {r0['memory_bytes'] >> 20} MiB non-zero guest, medians of {r0['runs']} interleaved runs; "
          "ratio = guest RAM per wall second / raw single-stream socket, same run (GB = 1e9 B)")
    print(f"{'engine':<9} {'transport':<9} {'channels':>8} {'comp':<5} {'RAM GB/s':>9} {'wire':>10} "
          f"{'raw':>10} {'ratio':>6} {'wall s':>7} {'total ms':>8} {'downtime':>8} {'CPU s src/dst':>13}")
    for r in rows:
        print(f"{r['engine']:<9} {r['transport']:<9} {r['channels'] or 'main':>8} {r['compression']:<5} "
              f"{_f(r['ram_bytes_per_s'] and r['ram_bytes_per_s'] / GB, 2):>9} {_gbs(r['wire_bytes_per_s']):>10} "
              f"{_gbs(r['raw_bytes_per_s']):>10} {_f(r['ratio'], 2):>6} {_f(r['wall_s'], 2):>7} "
              f"{_f(r['total_time_ms'], 0):>8} {_f(r['downtime_ms'], 0):>8} "
              f"{_f(r['cpu_s_src'], 2):>6}/{_f(r['cpu_s_dst'], 2):<6}"
              + (f" ram_match {r['ram_match']}" if r.get("ram_match") else ""))
    print()


def bench_idle(args, tmp: str) -> list[dict]:
    runs = [run_migration(kind, tmp, args.memory, "idle", profile_dir=args.profile, tag=f"idle-{kind}{i}")
            for kind in args.transports[:1] for i in range(max(1, min(args.runs, 3)))]
    ok = [m for m in runs if m["status"] == "completed"]
    rate = median([m["zero_pages"] / m["wall_s"] for m in ok])
    return [{
        "bench": "zero_pages",
        "transport": args.transports[0],
        "memory_bytes": args.memory,
        "runs": len(runs),
        "completed": len(ok),
        "zero_pages": median([m["zero_pages"] for m in ok]),
        "zero_pages_per_s": rate,
        "zero_bytes_per_s": rate * PS if rate else None,
        "wall_s": median([m["wall_s"] for m in ok]),
        "total_time_ms": median([m["total_time_ms"] for m in ok]),
        "downtime_ms": median([m["downtime_ms"] for m in ok]),
        "setup_time_ms": median([m["setup_time_ms"] for m in ok]),
        "transferred": median([m["transferred"] for m in ok]),
        "cpu_s_src": median([m["cpu_s_src"] for m in ok]),
        "cpu_s_dst": median([m["cpu_s_dst"] for m in ok]),
    }]


# -- dirty-sync cost ---------------------------------------------------------------
SYNC_MODES = {
    "legacy": {"write_protect_all": False, "manual_protect": False},
    "write-protect-all": {"write_protect_all": True, "manual_protect": False},
    "manual": {"write_protect_all": False, "manual_protect": True},
}


def bench_sync_one(size: int, mode: str, fraction: float, rounds: int) -> dict:
    import gc

    from memory import GLOBAL_DIRTY_MIGRATION
    from migrator.engine._machine import AccelConfig, Machine
    from migrator.engine._ram import RAMSaveState

    m = Machine(memory_bytes=size, accel=AccelConfig(kind="sim", **SYNC_MODES[mode]), workload="idle")
    ms, kvm, lst = m.ms, m.kvm, m.kvm_listener
    npages = size // PS
    ndirty = max(1, int(npages * fraction))
    rng = np.random.default_rng(1)
    gfns = np.sort(rng.choice(npages, ndirty, replace=False)).astype(np.int64)
    # map every page once (a booted guest has touched its RAM): without it the
    # first writes build the page tables, which is not what a sync costs
    t_map0 = time.perf_counter()
    for s in range(0, npages, 1 << 20):
        kvm.vcpu_write(np.arange(s, min(s + (1 << 20), npages), dtype=np.int64))
    t_map = time.perf_counter() - t_map0
    ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
    ram = RAMSaveState(ms, m.ram_blocks())
    ram.bitmap_sync()  # dirty-sync-count 1 (bmap is all ones anyway)
    _drain(ram)

    inner = ms.memory_global_dirty_log_sync
    timing = {}

    def timed_sync(last_stage: bool = False) -> None:
        t0 = time.perf_counter_ns()
        inner(last_stage)
        timing["sync_ns"] = time.perf_counter_ns() - t0

    ms.memory_global_dirty_log_sync = timed_sync
    syncs, xchgs, clears, news = [], [], [], []
    gc.disable()
    try:
        for _ in range(rounds):
            kvm.vcpu_write(gfns)  # the guest dirties the fraction (fault path, logged)
            res = ram.bitmap_sync()
            syncs.append(timing["sync_ns"] / 1e6)
            xchgs.append((res.sync_ns - timing["sync_ns"]) / 1e6)
            news.append(res.new_dirty_pages)
            c0 = lst.statistics().clear_time_ns
            _drain(ram)
            clears.append((lst.statistics().clear_time_ns - c0) / 1e6)
    finally:
        gc.enable()
        ms.memory_global_dirty_log_sync = inner
        ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)
    return {
        "bench": "dirty_sync",
        "mode": mode,
        "memory_bytes": size,
        "bitmap_bytes": npages // 8,
        "dirty_fraction": fraction,
        "dirty_pages": ndirty,
        "new_dirty_pages_seen": int(statistics.median(news)),
        "rounds": rounds,
        "global_sync_ms": statistics.median(syncs),
        "bitmap_xchg_ms": statistics.median(xchgs),
        "total_sync_ms": statistics.median([a + b for a, b in zip(syncs, xchgs)]),
        "lazy_clear_ms": statistics.median(clears),
        "setup_map_all_s": t_map,
        "listener_mode": str(getattr(lst, "mode", "")),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _drain(ram) -> None:
    while ram.next_batch(1 << 16) is not None:
        pass


def bench_sync(args) -> list[dict]:
    out = []
    for size in args.sync_sizes:
        need = size // PS * 56  # measured: ~3.5 GiB peak RSS for 256 GiB (~52 B/gfn)
        avail = _mem_available()
        if need > avail / 2:
            out.append({"bench": "dirty_sync", "memory_bytes": size, "skipped":
                        f"needs ~{need >> 20} MiB of simulator arrays, {avail >> 20} MiB available"})
            continue
        for mode in args.sync_modes:
            # one process per point: the simulator's arrays are freed by exiting
            proc = subprocess.run([sys.executable, __file__, "--_sync", str(size), mode, str(args.dirty_fraction),
                                   str(args.sync_rounds)], capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                out.append({"bench": "dirty_sync", "memory_bytes": size, "mode": mode,
                            "error": proc.stderr.strip().splitlines()[-1:] or ["?"]})
            else:
                out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if args.verbose:
                print(f"# sync {size >> 30} GiB {mode}: {out[-1]}", file=sys.stderr, flush=True)
    return out


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# -- output ------------------------------------------------------------------------
def print_table(results: list[dict]) -> None:
    bulk = [r for r in results if r["bench"] == "bulk"]
    if bulk:
        r0 = bulk[0]
        print(f"Bulk migration of {r0['memory_bytes'] >> 20} MiB non-zero guest RAM, medians of {r0['runs']} "
              f"interleaved runs (GB = 1e9 B)")
        print(f"{'transport':<9} {'migration':>10} {'raw socket':>10} {'ratio':>6} {'wall s':>7} {'total ms':>8} "
              f"{'setup ms':>8} {'downtime':>8} {'CPU s src/dst':>13} {'vs QEMU':>8}")
        for r in bulk:
            print(f"{r['transport']:<9} {_gbs(r['migration_bytes_per_s']):>10} {_gbs(r['raw_bytes_per_s']):>10} "
                  f"{_f(r['ratio'], 2):>6} {_f(r['wall_s'], 2):>7} {_f(r['total_time_ms'], 0):>8} "
                  f"{_f(r['setup_time_ms'], 0):>8} {_f(r['downtime_ms'], 0):>8} "
                  f"{_f(r['cpu_s_src'], 2):>6}/{_f(r['cpu_s_dst'], 2):<6} {_f(r['speedup_vs_qemu_total'], 2):>7}x")
            print(f"{'':<9} ratio per run: {', '.join(_f(x, 2) for x in r['ratio_runs'])}; "
                  f"raw CPU s send/recv {_f(r['raw_cpu_s_send'], 2)}/{_f(r['raw_cpu_s_recv'], 2)}; "
                  f"completed {r['completed']}/{r['runs']}"
                  + (f"; ram_match {r['ram_match']}" if r.get("ram_match") else ""))
        q = QEMU_REFERENCE
        print(f"machine busy before the runs (other sessions): {_f(r0['machine_busy_before'] * 100, 0)} % of 2 cores")
        print(f"QEMU {q['qemu_version']} reference: {q['total_s']} s = {q['bytes_per_s'] / GB:.2f} GB/s "
              f"({q['prefaulted_destination_total_s']} s with a pre-faulted destination); 'vs QEMU' = "
              f"{q['total_s']} s / our total-time")
        print()
    for r in results:
        if r["bench"] == "zero_pages":
            print(f"Zero-filled guest ({r['memory_bytes'] >> 20} MiB, {r['transport']}): "
                  f"{_f(r['zero_pages_per_s'] and r['zero_pages_per_s'] / 1e6, 2)} M zero pages/s "
                  f"({_gbs(r['zero_bytes_per_s'])} of guest RAM), wall {_f(r['wall_s'], 2)} s, total-time "
                  f"{_f(r['total_time_ms'], 0)} ms, downtime {_f(r['downtime_ms'], 0)} ms, "
                  f"{_f(r['transferred'], 0)} bytes sent, CPU s src/dst {_f(r['cpu_s_src'], 2)}/"
                  f"{_f(r['cpu_s_dst'], 2)}")
            print()
    checks = [r for r in results if r["bench"] == "downtime"]
    if checks:
        limit = checks[0]["downtime_limit_ms"]
        print(f"Downtime per run (1 GiB non-zero guest, unlimited bandwidth, downtime-limit {limit} ms, target "
              f"<= 1.1 x = {1.1 * limit:.0f} ms); predicted = engine model at the switchover, QEMU expected = "
              "pending / bandwidth at that sync; throughput GB/s predicted / last stage")
        print(f"{'transport':<9} {'run':>3} {'switchover':<10} {'predicted':>9} {'QEMU exp':>8} {'actual':>7} "
              f"{'act/pred':>8} {'<=1.1x':>6} {'syncs':>5} {'total ms':>8} {'thr pred/last':>13} {'busy':>5}")
        for c in checks:
            ratio = (c["actual_downtime_ms"] / c["predicted_downtime_ms"]
                     if c["actual_downtime_ms"] and c["predicted_downtime_ms"] else None)
            ok = {True: "yes", False: "NO", None: "-"}[c["downtime_within_1_1x"]]
            print(f"{c['transport']:<9} {c['run']:>3} {c['switchover']:<10} {_f(c['predicted_downtime_ms'], 0):>9} "
                  f"{_f(c['qemu_expected_downtime_ms'], 0):>8} {_f(c['actual_downtime_ms'], 0):>7} "
                  f"{_f(ratio, 2):>8} {ok:>6} {c['dirty_sync_count'] or '-':>5} {_f(c['total_time_ms'], 0):>8} "
                  f"{_f(_div(c['predicted_throughput_bytes_per_s'], GB), 2):>6}/"
                  f"{_f(_div(c['last_stage_throughput_bytes_per_s'], GB), 2):<6} "
                  f"{c['machine_busy_before'] * 100:>4.0f}%")
        for mode in dict.fromkeys(c["switchover"] for c in checks):
            mine = [c for c in checks if c["switchover"] == mode]
            print(f"  {mode}: {sum(bool(c['downtime_within_1_1x']) for c in mine)}/{len(mine)} runs within 1.1 x "
                  f"downtime-limit; worst {max((c['actual_downtime_ms'] or 0) for c in mine):.0f} ms")
        print()
    sync = [r for r in results if r["bench"] == "dirty_sync"]
    if sync:
        print("Dirty sync (in-process SimKVM; ms, medians): global sync = memory_global_dirty_log_sync, "
              "xchg = migration bitmap xchg+OR, clear = lazy KVM_CLEAR_DIRTY_LOG while sending")
        print(f"{'guest':>6} {'bitmap':>8} {'mode':<18} {'dirty':>9} {'sync':>8} {'xchg':>8} {'total':>8} "
              f"{'clear':>8} {'peak RSS':>9}")
        for r in sync:
            if "skipped" in r or "error" in r:
                print(f"{r['memory_bytes'] >> 30:>5}G {'':>8} {r.get('mode', ''):<18} "
                      f"{r.get('skipped') or r.get('error')}")
                continue
            print(f"{r['memory_bytes'] >> 30:>5}G {r['bitmap_bytes'] >> 10:>6}Ki {r['mode']:<18} "
                  f"{r['dirty_pages']:>9} {r['global_sync_ms']:>8.2f} {r['bitmap_xchg_ms']:>8.2f} "
                  f"{r['total_sync_ms']:>8.2f} {r['lazy_clear_ms']:>8.2f} {r['max_rss_bytes'] >> 20:>6} MiB")


def _f(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _div(x, d: float):
    return None if x is None else x / d


def _gbs(x) -> str:
    return "-" if x is None else f"{x / GB:.2f} GB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--memory", default="1G", help="guest RAM for the migrations (default 1G)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved raw/migration runs per transport")
    ap.add_argument("--transports", default="tcp,unix")
    ap.add_argument("--skip", default="", help="comma list of bulk,idle,sync to leave out")
    ap.add_argument("--sync-sizes", default="1G,16G,256G")
    ap.add_argument("--sync-modes", default="legacy,write-protect-all,manual")
    ap.add_argument("--dirty-fraction", type=float, default=0.01, help="fraction of pages dirtied per sync round")
    ap.add_argument("--sync-rounds", type=int, default=5)
    ap.add_argument("--switchover", default="qemu,predictive",
                    help="switchover rules to run side by side per bulk run: qemu (QEMU's threshold), "
                         "predictive (x-predictive-switchover)")
    ap.add_argument("--downtime-limit", type=int, default=300, help="ms (default 300, QEMU's)")
    ap.add_argument("--verify", action="store_true", help="compare source and destination RAM after each bulk run")
    ap.add_argument("--profile", metavar="DIR", help="record both migrator processes with py-spy into DIR")
    ap.add_argument("--verbose", "-v", action="store_true", help="per-run lines on stderr")
    ap.add_argument("--multifd", default="1:none,2:none,4:none,1:zstd,2:zstd,4:zstd",
                    help="multifd rows CHANNELS:COMPRESSION,... (skip with --skip multifd)")
    ap.add_argument("--no-qemu", action="store_true", help="leave out the stock QEMU rows of the multifd bench")
    ap.add_argument("--_raw", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_sync", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._raw:
        role, kind, where, n = args._raw
        (raw_receiver if role == "recv" else raw_sender)(kind, where, int(n))
        return
    if args._sync:
        size, mode, frac, rounds = args._sync
        print(json.dumps(bench_sync_one(int(size), mode, float(frac), int(rounds))))
        return
    args.memory = parse_size(args.memory, default_suffix="M")  # -m: a bare number is MiB
    args.transports = [t for t in args.transports.split(",") if t]
    args.switchover = [m for m in args.switchover.split(",") if m]
    if not args.switchover or set(args.switchover) - {"qemu", "predictive"}:
        sys.exit("--switchover takes a comma list of qemu, predictive")
    args.sync_sizes = [parse_size(s, default_suffix="M") for s in args.sync_sizes.split(",") if s]
    args.sync_modes = [m for m in args.sync_modes.split(",") if m]
    skip = set(args.skip.split(","))
    if args.profile:
        if not shutil.which("py-spy"):
            sys.exit("--profile needs py-spy (pip install py-spy)")
        os.makedirs(args.profile, exist_ok=True)
    results: list[dict] = []
    tmp = tempfile.mkdtemp(prefix="bench-throughput-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        if "bulk" not in skip:
            for r in bench_bulk(args, tmp):
                results.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
        if "multifd" not in skip:
            for r in bench_multifd(args, tmp):
                results.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
        if "idle" not in skip:
            for r in bench_idle(args, tmp):
                results.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
        if "sync" not in skip:
            for r in bench_sync(args):
                results.append(r)
                if args.json:
                    print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.json:
        print_table(results)
        print_multifd_table(results)


if __name__ == "__main__":
    main()
