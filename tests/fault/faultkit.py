"""Fault injection between two ``migrator run`` processes.

:class:`FaultProxy` sits between the source and the destination (tcp) and
forwards both directions; a :class:`Fault` fires once, in one direction, at
a byte offset given by a stream region (found by a tap decoder reading the
forward direction, so "mid-page" or "device section" mean the same bytes
whatever the guest wrote) plus a delta.  Actions: ``cut`` (close both
sockets), ``reset`` (RST both), ``delay`` (hold the direction for a while),
``stall`` (hold it forever), and process faults at that moment: ``kill-src``,
``kill-dst`` (SIGKILL), ``stop-src``, ``stop-dst`` (SIGSTOP, SIGCONT later).

:func:`run_case` runs one case end to end and returns a :class:`CaseResult`:
the number of running copies sampled every 20 ms on both sides during the
whole case (never more than 1), each side's final migration status and run
state, the source's RAM checked with the ab guest's rule, and a retry from
whichever side owns the guest to a fresh destination, with both RAMs equal.
The tests run a representative subset; ``tools/fault_matrix.py`` runs the
full matrix.  Used by tests and the tool; needs only public names.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import numpy as np
import trio

from memory.kvm.sim.workloads import check_guests_ram
from tests.integration.harness import TrioQMP, free_port, pmem, vm_process
from transport import (NEED_DATA, DeviceState, EndOfStream, RamPages, SectionEnd, SectionFull, VMDescription,
                       SectionStart, StreamDecoder)

#: regions of the forward direction (source -> destination) and where they start
FWD_REGIONS = ("header", "ram-start", "page", "mid-page", "mid-ram", "final-ram", "device", "eof", "after-eof")
#: offsets of the return direction (destination -> source): before the first
#: acknowledgement byte, inside it, after the first message (x-handover's LOADED)
REV_OFFSETS = {"ack": 0, "mid-ack": 2, "after-loaded": 12}
ACTIONS = ("cut", "reset", "delay", "stall", "kill-src", "kill-dst", "stop-src", "stop-dst")

RETURN_PATH_TIMEOUT_MS = 1500
MID_RAM_BYTES = 8 << 20  # "mid-ram": this far into the first RAM pass
LATE_S = 2.5  # a "late" delay: longer than the return-path timeout
SHORT_S = 0.4  # a delay well within it
STALL_CANCEL_S = 6.0  # a stalled forward stream: the operator cancels after this


@dataclass(frozen=True)
class Fault:
    direction: str  # "fwd" | "rev"
    region: str  # one of FWD_REGIONS, or a key of REV_OFFSETS
    action: str
    delta: int = 0
    seconds: float = 0.0  # delay / stop duration

    @property
    def name(self) -> str:
        extra = f"{self.seconds:g}s" if self.action in ("delay", "stop-src", "stop-dst") else ""
        where = f"{self.region}{'+%d' % self.delta if self.delta else ''}"
        return f"{self.direction}:{where}:{self.action}{(':' + extra) if extra else ''}"


class _Tap:
    """Finds region offsets in the forward direction with our own decoder."""

    def __init__(self) -> None:
        self.dec = StreamDecoder()
        self.regions: dict[str, int] = {"header": 0}
        self.done = False

    def feed(self, data: bytes) -> int:
        """Feed bytes; returns how far (stream offset) everything is parsed."""
        if self.done:
            return -1
        self.dec.receive_data(data)
        while True:
            start = self.dec.stream_offset
            try:
                ev = self.dec.next_event()
            except Exception:
                self.done = True  # not our business: the destination judges the stream
                return -1
            if ev is NEED_DATA:
                return self.dec.stream_offset
            r = self.regions
            if isinstance(ev, SectionStart):
                r.setdefault("ram-start", start)
            elif isinstance(ev, RamPages):
                if "page" not in r:
                    r["page"] = start
                    r["mid-ram"] = start + MID_RAM_BYTES
                    r["mid-page"] = start + 8 + 2048 if self.dec.stream_offset >= start + 8 + 2048 else start
            elif isinstance(ev, SectionEnd):
                r.setdefault("final-ram", start)
            elif isinstance(ev, SectionFull):
                r.setdefault("device", start)
            elif isinstance(ev, DeviceState):
                pass
            elif isinstance(ev, EndOfStream):
                # "after-eof" is the first byte after the whole stream: EOF and
                # the VM description QEMU reads after it (where GO follows)
                r["eof"] = start
                r["after-eof"] = start + 1
            elif isinstance(ev, VMDescription):
                r["after-eof"] = self.dec.stream_offset
                self.done = True
                return -1


class FaultProxy:
    """A tcp proxy that applies one :class:`Fault`."""

    def __init__(self, target_port: int, fault: Fault | None, on_process_fault=None) -> None:
        self.target_port = target_port
        self.fault = fault
        self.on_process_fault = on_process_fault  # async callable(action, seconds)
        self.port = 0
        self.fired = False
        self.fired_at = None
        self.bytes = {"fwd": 0, "rev": 0}
        self.tap = _Tap()
        self._socks: list = []
        self._closed = False

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        async with listeners[0]:
            src = await listeners[0].accept()
        dst = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        self._socks = [src, dst]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._pump, src, dst, "fwd")
                nursery.start_soon(self._pump, dst, src, "rev")
        finally:
            with trio.CancelScope(shield=True):
                for s in (src, dst):
                    await s.aclose()

    def _target(self, direction: str) -> int | None:
        f = self.fault
        if f is None or self.fired or f.direction != direction:
            return None
        if direction == "rev":
            return REV_OFFSETS[f.region] + f.delta
        start = self.tap.regions.get(f.region)
        return None if start is None else start + f.delta

    async def _fire(self, direction: str) -> bool:
        """Apply the fault; False when this direction must stop forwarding."""
        f = self.fault
        self.fired = True
        self.fired_at = self.bytes[direction]
        if f.action in ("cut", "reset"):
            for s in self._socks:
                if f.action == "reset":
                    s.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.socket.close()
            self._closed = True
            self._nursery.cancel_scope.cancel()
            return False
        if f.action == "delay":
            await trio.sleep(f.seconds)
            return True
        if f.action == "stall":
            await trio.sleep_forever()
        await self.on_process_fault(f.action, f.seconds)
        return True

    async def _pump(self, a, b, direction: str) -> None:
        """Forward ``a`` -> ``b``.  Forward bytes only once the tap parsed them,
        so a region's start is known before any of its bytes leave."""
        pending = bytearray()
        parsed = 0  # forward direction: stream offset the tap has parsed up to
        eof = False
        while True:
            pos = self.bytes[direction]
            target = self._target(direction)
            if target is not None and pos >= target and (direction == "fwd" or pending or eof):
                if not await self._fire(direction):
                    return
                continue
            limit = len(pending)
            if direction == "fwd" and not (self.tap.done or eof):
                limit = min(limit, parsed - pos)
            if target is not None:
                limit = min(limit, target - pos)
            if limit > 0:
                try:
                    await b.send_all(bytes(pending[:limit]))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    await self._shutdown()
                    return
                del pending[:limit]
                self.bytes[direction] += limit
                continue
            if eof:
                try:
                    await b.send_eof()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass
                return
            try:
                data = await a.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                eof = True
                continue
            pending += data
            if direction == "fwd" and not self.tap.done:
                end = self.tap.feed(data)
                parsed = end if end >= 0 else 1 << 62

    async def _shutdown(self) -> None:
        for s in self._socks:
            try:
                await s.aclose()
            except Exception:
                pass


# -- cases ---------------------------------------------------------------------------
@dataclass
class CaseResult:
    case: str
    direction: str
    region: str
    action: str
    handover: bool
    src_state: str = ""
    dst_state: str = ""
    max_running: int = 0
    final_running: int = 0
    src_ram_ok: bool | None = None
    retry_ok: bool = False
    fired: bool = False
    owner: str = ""
    notes: list = field(default_factory=list)

    def row(self) -> str:
        return (f"{self.case:<38} {'h' if self.handover else '-'} {self.src_state:<24} {self.dst_state:<26} "
                f"{self.max_running:>3} {str(self.src_ram_ok):<5} {'ok' if self.retry_ok else 'FAIL'}")

    @property
    def ok(self) -> bool:
        return self.max_running <= 1 and self.retry_ok and self.src_ram_ok is not False


async def _state(qmp: TrioQMP | None) -> tuple[str, str, bool] | None:
    if qmp is None:
        return None
    try:
        with trio.fail_after(5):
            st = await qmp.execute("query-status")
            mig = await qmp.execute("query-migrate")
    except (EOFError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return None
    return mig.get("status", "none"), st["status"], st["running"]


async def _connect(path: str) -> TrioQMP | None:
    try:
        q = TrioQMP(await trio.open_unix_socket(path))
    except OSError:
        return None
    try:
        await q.negotiate()
        return q
    except (OSError, EOFError, trio.BrokenResourceError):
        await q.aclose()
        return None


class _Monitor:
    """Samples query-status of every peer every 20 ms on its own QMP connections."""

    def __init__(self) -> None:
        self.max_running = 0
        self.samples = 0
        self.peers: dict[str, TrioQMP | None] = {}
        self._all: list[TrioQMP] = []

    async def add(self, name: str, qmp_path: str) -> None:
        self.peers[name] = q = await _connect(qmp_path)
        if q is not None:
            self._all.append(q)

    async def run(self) -> None:
        while True:
            running = 0
            for name, q in list(self.peers.items()):
                if q is None:
                    continue
                try:
                    with trio.fail_after(5):
                        st = await q.execute("query-status")
                    running += bool(st["running"])
                except Exception:
                    self.peers[name] = None
            self.samples += 1
            self.max_running = max(self.max_running, running)
            await trio.sleep(0.02)

    async def aclose(self) -> None:
        for q in self._all:
            with trio.CancelScope(shield=True):
                try:
                    await q.aclose()
                except Exception:
                    pass


async def _settle(src, dst, fault: Fault, timeout: float) -> None:
    """Wait until neither side will change by itself any more."""
    deadline = trio.current_time() + timeout
    cancelled = False
    s_done_at = None
    t0 = trio.current_time()
    while trio.current_time() < deadline:
        s = await _state(src.qmp) if src.proc.poll() is None else None
        d = await _state(dst.qmp) if dst.proc.poll() is None else None
        # an alive process that does not answer (SIGSTOPped) is not done
        s_done = src.proc.poll() is not None or (s is not None and s[0] in ("completed", "failed", "cancelled"))
        d_done = dst.proc.poll() is not None or (d is not None and d[0] in ("completed", "failed", "none"))
        if s_done and d_done:
            return
        if s_done and s_done_at is None:
            s_done_at = trio.current_time()
        if s_done and d is not None and d[0] in ("setup", "active") \
                and trio.current_time() - s_done_at > LATE_S + 2:
            return  # the source is done; a destination still waiting for bytes that never come
        if not s_done and not cancelled and trio.current_time() - t0 > STALL_CANCEL_S \
                and s is not None and s[0] in ("active", "device", "setup"):
            # A stalled stream never fails by itself (QEMU has no send timeout
            # either): the operator cancels.
            await src.qmp.execute("migrate_cancel")
            cancelled = True
        await trio.sleep(0.05)


async def _set_up(vm, handover: bool) -> None:
    caps = [{"capability": "events", "state": True}]
    if handover:
        caps.append({"capability": "x-handover", "state": True})
    await vm.qmp.execute("migrate-set-capabilities", {"capabilities": caps})
    await vm.qmp.execute("migrate-set-parameters", {"x-return-path-timeout": RETURN_PATH_TIMEOUT_MS,
                                                    "max-bandwidth": 200_000_000, "downtime-limit": 2000})


class Chain:
    """The guest's current home (a running ``migrator run``), kept across cases."""

    def __init__(self, tmp_path, *, memory: str, accel: str, workload: str) -> None:
        self.tmp_path = tmp_path
        self.memory = memory
        self.memory_bytes = int(memory.rstrip("M")) << 20
        self.accel = accel
        self.workload = workload
        self.stack = AsyncExitStack()
        self.source = None
        self.n = 0

    async def __aenter__(self):
        await self.stack.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self.stack.__aexit__(*exc)

    async def spawn(self, *args: str, workload: str = "idle"):
        self.n += 1
        name = f"vm{self.n}"
        return await self.stack.enter_async_context(
            vm_process(self.tmp_path, name, *args, memory=self.memory, accel=self.accel, workload=workload))

    async def ensure_source(self):
        if self.source is None or self.source.proc.poll() is not None:
            self.source = await self.spawn(workload=self.workload)
            await trio.sleep(0.3)  # let the guest write a little
        return self.source


def _ab_ok(ram: bytes) -> bool:
    return check_guests_ram(np.frombuffer(ram, dtype=np.uint8)) == 0


async def run_case(chain: Chain, fault: Fault, *, handover: bool) -> CaseResult:
    res = CaseResult(fault.name, fault.direction, fault.region, fault.action, handover)
    src = await chain.ensure_source()
    dport = free_port()
    async with trio.open_nursery() as nursery:
        async def spawn_dst(task_status=trio.TASK_STATUS_IGNORED):
            vm = await chain.spawn("--incoming", f"tcp:127.0.0.1:{dport}")
            task_status.started(vm)

        async def spawn_retry(task_status=trio.TASK_STATUS_IGNORED):
            task_status.started(await chain.spawn("--incoming", "defer", "-S"))

        dst = await nursery.start(spawn_dst)
        retry = await nursery.start(spawn_retry)
    for vm in (src, dst, retry):
        await _set_up(vm, handover)
    stopped: list = []

    async def process_fault(action: str, seconds: float) -> None:
        victim = src if action.endswith("src") else dst
        if action.startswith("kill"):
            victim.proc.send_signal(signal.SIGKILL)
            await victim.proc.wait()
        else:
            victim.proc.send_signal(signal.SIGSTOP)
            stopped.append(victim)
            await trio.sleep(seconds)
            victim.proc.send_signal(signal.SIGCONT)
            stopped.remove(victim)

    proxy = FaultProxy(dport, fault, process_fault)
    monitor = _Monitor()
    await monitor.add("src", src.qmp_path)
    await monitor.add("dst", dst.qmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor.run)
        await nursery.start(proxy.serve)
        await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{proxy.port}"})
        await _settle(src, dst, fault, timeout=30)
        await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    await monitor.aclose()
    for victim in stopped:
        victim.proc.send_signal(signal.SIGCONT)
    res.fired = proxy.fired
    res.max_running = monitor.max_running
    s = await _state(src.qmp) if src.proc.poll() is None else None
    d = await _state(dst.qmp) if dst.proc.poll() is None else None
    res.src_state = "dead" if s is None else f"{s[0]}/{s[1]}"
    res.dst_state = "dead" if d is None else f"{d[0]}/{d[1]}"
    res.final_running = sum(bool(x and x[2]) for x in (s, d))
    res.max_running = max(res.max_running, res.final_running)
    # the source's RAM: the ab guest's rule holds (checked paused, no torn snapshot)
    if s is not None:
        await src.qmp.execute("stop")
        res.src_ram_ok = _ab_ok(await pmem(src, chain.tmp_path, chain.memory_bytes, "src.ram"))
    # who owns the guest now?  The running side; with none running, the
    # operator's rule of the README: the destination if it completed or holds
    # a complete state nobody told it about, else the source.
    owner = None
    if s is not None and s[2] and not (d is not None and d[2]):
        owner = src
    elif d is not None and d[2]:
        owner = dst
    elif d is None and s is not None:
        owner = src  # a dead destination runs nothing: the operator resumes the source
    else:
        dinfo = await dst.qmp.execute("query-migrate") if d is not None else {}
        if d is not None and (d[0] == "completed" or "'cont' here starts it" in dinfo.get("error-desc", "")):
            owner = dst
        elif s is not None and s[1] in ("postmigrate", "paused", "running") and s[0] != "completed":
            owner = src
    res.owner = "src" if owner is src else "dst" if owner is dst else "lost"
    if owner is src:
        await src.qmp.execute("cont")
    elif owner is dst:
        await dst.qmp.execute("cont")
    if owner is None:
        # Only a kill can lose the guest: the process that had the only copy died.
        res.notes.append("guest lost: its only copy was killed")
        res.retry_ok = fault.action.startswith("kill")
        chain.source = None
        for vm in (src, dst, retry):
            await _retire(vm)
        return res
    # retry: the owner migrates to a fresh destination, RAMs compared paused
    rport = free_port()
    await retry.qmp.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{rport}"})
    await owner.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{rport}"})
    info = await owner.qmp.wait_migration(timeout=60)
    rinfo = await retry.qmp.wait_migration(timeout=30)
    if info["status"] == "completed" and rinfo["status"] == "completed":
        a = await pmem(owner, chain.tmp_path, chain.memory_bytes, "owner.ram")
        b = await pmem(retry, chain.tmp_path, chain.memory_bytes, "retry.ram")
        res.retry_ok = a == b and _ab_ok(b)
    else:
        res.notes.append(f"retry: {info} / {rinfo}")
    await retry.qmp.execute("cont")
    chain.source = retry
    for vm in (src, dst):
        await _retire(vm)
    return res


async def _retire(vm) -> None:
    """Quit a finished peer (kill it if it does not answer)."""
    if vm.proc.poll() is None:
        with trio.move_on_after(3):
            try:
                await vm.qmp.execute("quit")
                await vm.proc.wait()
            except Exception:
                pass
    if vm.proc.poll() is None:
        vm.proc.kill()
        await vm.proc.wait()


def matrix(*, full: bool) -> list[tuple[Fault, bool]]:
    """(fault, x-handover) pairs: every region x action in both directions,
    with and without x-handover (full), or a representative subset."""
    if not full:
        both = [
            Fault("fwd", "header", "cut", 3),
            Fault("fwd", "mid-page", "reset"),
            Fault("fwd", "mid-ram", "kill-dst"),
            Fault("fwd", "final-ram", "cut"),  # the vCPUs are stopped: device stage
            Fault("fwd", "device", "cut", 7),
            Fault("fwd", "eof", "cut"),  # everything but the EOF byte
            Fault("fwd", "after-eof", "cut"),
            Fault("fwd", "page", "stall"),
            Fault("rev", "ack", "cut"),
            Fault("rev", "ack", "delay", seconds=LATE_S),
            Fault("rev", "mid-ack", "reset"),
            Fault("rev", "ack", "kill-dst"),
            Fault("rev", "ack", "stop-src", seconds=LATE_S),
        ]
        return ([(f, False) for f in both] + [(f, True) for f in both]
                + [(Fault("fwd", "after-eof", "cut", 3), True),  # half a GO
                   (Fault("rev", "after-loaded", "cut"), True),  # GO sent, the final SHUT lost
                   (Fault("fwd", "device", "stop-dst", seconds=SHORT_S), True),
                   (Fault("fwd", "mid-ram", "kill-src"), False)])
    cases: list[tuple[Fault, bool]] = []
    for handover in (False, True):
        # Without x-handover nothing follows EOF on the forward direction and
        # the return path carries one 8-byte SHUT: "after-eof" is the moment
        # right after the EOF byte, and "after-loaded" does not exist.
        points = [("fwd", r, 3 if r == "device" or (r == "after-eof" and handover) else 0)
                  for r in FWD_REGIONS]
        points += [("rev", r, 0) for r in REV_OFFSETS if handover or r != "after-loaded"]
        for direction, region, delta in points:
            for action in ACTIONS:
                if action in ("delay", "stop-src", "stop-dst"):
                    cases += [(Fault(direction, region, action, seconds=secs), handover) for secs in (SHORT_S, LATE_S)]
                else:
                    cases.append((Fault(direction, region, action, delta), handover))
    return cases


def summary(results: list[CaseResult]) -> dict:
    return {
        "cases": len(results),
        "two_running_copies": sum(r.max_running > 1 for r in results),
        "zero_running_before_retry": sum(r.final_running == 0 for r in results),
        "fault_fired": sum(r.fired for r in results),
        "retry_ok": sum(r.retry_ok for r in results),
        "src_ram_bad": sum(r.src_ram_ok is False for r in results),
        "failed_cases": [r.case + (" (h)" if r.handover else "") for r in results if not r.ok],
    }


def header() -> str:
    return (f"{'case (direction:region:action)':<38} {'x':1} {'source':<24} {'destination':<26} "
            f"{'run':>3} {'ram':<5} retry")


def as_json(results: list[CaseResult]) -> str:
    return json.dumps([r.__dict__ for r in results], indent=1, default=str)


__all__ = ["ACTIONS", "Chain", "Fault", "FaultProxy", "FWD_REGIONS", "REV_OFFSETS", "CaseResult",
           "as_json", "header", "matrix", "run_case", "summary"]
