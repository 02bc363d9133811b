"""One VM process: machine, vCPUs, migration state, and its QMP commands.

The command handlers use QEMU's names, arguments, replies and error
wording (qapi/migration.json, qapi/misc.json, monitor/qmp-cmds.c).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from memory import GLOBAL_DIRTY_DIRTY_RATE, TARGET_PAGE_SIZE, Cause
from memory.kvm import kvm_statistics_dict

from ..engine import IncomingMigration, OutgoingMigration
from ..engine._history import MigrationHistory
from ..engine._machine import AccelConfig, Machine
from ..engine._qemu_devices import QemuDeviceState
from ..engine._seams import RAMBlocks, VCPUController
from ._commands import CommandTable
from ._params import MigrationCapabilities, MigrationOptions, MigrationParameters
from ..engine._status import DESTINATION_TRANSITIONS, SOURCE_TRANSITIONS, MigrationState
from ..engine._status import MigrationStatus as S
from ..errors import MigratorError, QMPError

if TYPE_CHECKING:
    from ._server import QMPServer


def _generic(desc: str) -> QMPError:
    return QMPError("GenericError", desc)


#: QEMU's qmp_migrate / qmp_migrate_incoming wording for an unknown scheme
INVALID_PROTOCOL_DESC = "Parameter 'uri' expects a valid migration protocol"


def check_migration_uri(uri: str, *, outgoing: bool) -> None:
    """Reject a bad migration URI synchronously, in QEMU's words.

    QEMU refuses an unknown scheme at once ("Parameter 'uri' expects a valid
    migration protocol" from ``migrate``, "unknown migration protocol: URI"
    from ``migrate-incoming``, migration/migration.c) but only fails later, in the
    connect, for a missing host or a port getaddrinfo refuses
    ("address resolution failed for HOST:PORT: ...", util/qemu-sockets.c);
    we say the same words, before anything starts.
    """
    from transport import BadURIError, TcpAddress, parse_uri

    scheme = uri.partition(":")[0] if ":" in uri else ""
    if scheme not in ("tcp", "unix", "file", "exec", "fd", "rdma", "vsock", "channels"):
        # qmp_migrate vs qemu_start_incoming_migration
        raise _generic(INVALID_PROTOCOL_DESC if outgoing else f"unknown migration protocol: {uri}")
    try:
        addr = parse_uri(uri)
    except BadURIError as exc:
        if scheme == "tcp" and "port must be" in exc.reason:
            host, _, port = uri[4:].rpartition(":")
            raise _generic(f"address resolution failed for {host}:{port}: "
                           "Servname not supported for ai_socktype") from None
        raise _generic(str(exc)) from None
    if outgoing and isinstance(addr, TcpAddress):
        if not addr.host:
            raise _generic(f"address resolution failed for :{addr.port}: Name or service not known")
        if addr.port == 0:
            raise _generic(f"Failed to connect to '{addr.host}:0': Connection refused")


class VM:
    """A source or destination VM process."""

    def __init__(self, *, memory_bytes: int, accel: AccelConfig, workload: str = "idle",
                 workload_opts: dict[str, Any] | None = None, incoming: str | None = None,
                 start_paused: bool = False, serial_path: str | None = None,
                 label: str = "", smp: int = 1) -> None:
        self.incoming_uri = incoming
        self.is_destination = incoming is not None
        self.machine = Machine(memory_bytes=memory_bytes, accel=accel, workload=workload,
                               workload_opts=workload_opts, prefault=self.is_destination,
                               serial_path=serial_path, destination=self.is_destination, smp=smp)
        self.ms = self.machine.ms
        self.vcpus: VCPUController = self.machine.vcpus
        self.kvm_listener = self.machine.kvm_listener
        # Like QEMU, only the *outgoing* migration's state restricts option
        # changes; the incoming side (MigrationIncomingState) does not.
        self.options = MigrationOptions(status=lambda: S.NONE if self.is_destination else self.state.status)
        self.label = label or accel.describe()
        self.state = MigrationState(DESTINATION_TRANSITIONS if self.is_destination else SOURCE_TRANSITIONS,
                                    on_change=self._on_migration_state)
        self.autostart = not start_paused
        self.runstate = "inmigrate" if self.is_destination else ("prelaunch" if start_paused else "running")
        self.outgoing: OutgoingMigration | None = None
        self.incoming: IncomingMigration | None = None
        self.last_outgoing: OutgoingMigration | None = None
        self.server: QMPServer | None = None  # set by run()
        self._nursery: trio.Nursery | None = None
        self.dirty_rate: dict[str, Any] = {"status": "unstarted"}
        #: QEMU device state (timer, slirp, run state) when this VM was loaded
        #: from a QEMU stream; None for a VM of ours (see _qemu_devices).
        self.qemu_devices: QemuDeviceState | None = None
        self._ran_ns = 0  # time the vCPUs ran (the timer section's clock)
        self._running_since: int | None = None

    # -- plumbing -------------------------------------------------------------
    @property
    def params(self) -> MigrationParameters:
        """Current MigrationParameters (replaced, never mutated, on set)."""
        return self.options.parameters

    @property
    def caps(self) -> "_Caps":
        return _Caps(self.options.capabilities)

    def log(self, msg: str) -> None:
        print(f"migrator[{self.label}]: {msg}", file=sys.stderr, flush=True)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        if self.server is not None:
            self.server.emit_event(name, data)

    def _on_migration_state(self, status: S) -> None:
        if self.caps.events:
            self.emit_event("MIGRATION", {"status": status.value})

    def set_runstate(self, state: str) -> None:
        self.runstate = state

    def describe_setup(self) -> dict[str, Any]:
        return {
            "memory-bytes": self.machine.memory_bytes,
            "page-size": TARGET_PAGE_SIZE,
            "accel": self.machine.accel.describe(),
            "smp": self.machine.smp,
            "workload": self.machine.workload_name,
            "parameters": self.params.to_qmp(),
            "capabilities": sorted(self.options.capabilities.enabled),
        }

    def ran_ns(self) -> int:
        """How long the vCPUs ran in this process (the virtual clock advance)."""
        now = time.monotonic_ns()
        return self._ran_ns + (now - self._running_since if self._running_since is not None else 0)

    def ram_blocks(self) -> RAMBlocks:
        return self.machine.ram_blocks()

    def kvm_listener_stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.kvm_listener.statistics())

    async def vm_stop(self, runstate: str = "paused") -> None:
        """Stop the vCPUs (``Cause.VM_STOP`` on the memory core's cost meter,
        from the call until every vCPU acknowledged), then the clocks."""
        was_running = self.vcpus.running
        meter = self.ms.cost_meter
        token = meter.begin(Cause.VM_STOP)
        try:
            await self.vcpus.vm_stop()
        finally:
            meter.end(Cause.VM_STOP, token)
        if self._running_since is not None:
            self._ran_ns += time.monotonic_ns() - self._running_since
            self._running_since = None
        self.runstate = runstate
        if was_running:
            self.emit_event("STOP")

    async def vm_start(self) -> None:
        await self.vcpus.vm_start()
        if self._running_since is None:
            self._running_since = time.monotonic_ns()
        self.runstate = "running"
        self.emit_event("RESUME")

    # -- lifetime -------------------------------------------------------------
    async def run(self, *, qmp_path: str | None = None, qmp_tcp: tuple[str, int] | None = None,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        from ._server import QMPServer

        self.server = server = QMPServer(self.commands(), name=self.label)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.vcpus.run)
            where = ""
            try:
                if qmp_path is not None:
                    where = f"unix:{qmp_path}"
                    await nursery.start(server.serve_unix, qmp_path)
                if qmp_tcp is not None:
                    where = f"tcp:{qmp_tcp[0]}:{qmp_tcp[1]}"
                    await nursery.start(server.serve_tcp, *qmp_tcp)
            except OSError as exc:
                raise MigratorError(f"--qmp {where}: {exc.strerror or exc}") from exc
            if self.is_destination:
                if self.incoming_uri is not None and self.incoming_uri != "defer":
                    await self._start_incoming(self.incoming_uri)
            else:
                self.machine.boot()
                if self.autostart:
                    await self.vm_start()
            task_status.started()
            await server.quit_requested.wait()
            nursery.cancel_scope.cancel()

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("the VM is not running (VM.run() owns its tasks)")
        return self._nursery

    async def _start_incoming(self, uri: str) -> None:
        self.incoming = incoming = IncomingMigration(self, uri)

        async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await incoming.run(task_status=task_status)
            except MigratorError:
                pass  # listening failed: FAILED, and reported by the caller below

        await self._require_nursery().start(runner)
        if incoming.error_desc and self.state.status is S.FAILED:
            raise _generic(f"incoming {uri}: {incoming.error_desc}")

    # -- QMP commands ---------------------------------------------------------
    def commands(self) -> CommandTable:
        table = CommandTable.from_objects(self.options)
        add = table.add
        add("query-status", self.qmp_query_status)
        add("stop", self.qmp_stop)
        add("cont", self.qmp_cont)
        add("migrate", self.qmp_migrate, args={"uri": str, "*detach": bool, "*resume": bool,
                                                "*blk": bool, "*inc": bool})
        add("migrate-incoming", self.qmp_migrate_incoming, args={"uri": str, "*exit-on-error": bool})
        add("migrate_cancel", self.qmp_migrate_cancel)
        add("query-migrate", self.qmp_query_migrate)
        add("pmemsave", self.qmp_pmemsave, args={"val": int, "size": int, "filename": str, "*cpu-index": int})
        add("calc-dirty-rate", self.qmp_calc_dirty_rate,
            args={"calc-time": int, "*calc-time-unit": str, "*sample-pages": int, "*mode": str})
        add("query-dirty-rate", self.qmp_query_dirty_rate, args={"*calc-time-unit": str})
        add("x-query-migration-history", self.qmp_x_query_migration_history)
        add("x-query-accel-stats", self.qmp_x_query_accel_stats)
        return table

    async def qmp_query_status(self) -> dict[str, Any]:
        return {"running": self.vcpus.running, "singlestep": False, "status": self.runstate}

    async def qmp_stop(self) -> dict[str, Any]:
        if self.runstate == "inmigrate":
            # QEMU: stop during incoming migration just drops autostart
            self.autostart = False
            return {}
        if self.vcpus.running:
            await self.vm_stop("paused")
        return {}

    async def qmp_cont(self) -> dict[str, Any]:
        if self.runstate == "inmigrate":
            if self.state.status is S.COMPLETED:
                pass
            else:
                self.autostart = True
                return {}
        if self.state.status in (S.SETUP, S.ACTIVE, S.DEVICE) and self.runstate == "finish-migrate":
            raise _generic("Migration is not finished yet")
        inc = self.incoming
        if self.is_destination and inc is not None and inc.undecided:
            # The operator decided this side owns the guest (x-handover: the
            # state is complete and valid, the source's word never came).
            inc.undecided = False
            inc.handover = "operator"
            self.log("cont: the operator started a loaded guest that got no go-ahead")
        if not self.vcpus.running:
            await self.vm_start()
            inc = self.incoming
            if inc is not None and self.state.status is S.COMPLETED and not inc.timeline.resumed_unix_ms:
                inc.timeline.resumed_unix_ms = time.time() * 1000  # -S: resumed by this cont
                inc.timeline.resumed_by_cont = True
        return {}

    def _migration_running(self) -> bool:
        return self.state.running

    async def qmp_migrate(self, uri: str, detach: bool = True, resume: bool = False,
                          blk: bool = False, inc: bool = False) -> dict[str, Any]:
        if resume:
            raise _generic("Cannot resume if there is no paused migration")
        if blk or inc:
            raise _generic("Block migration is not supported by migrator")
        owns = self.state.status is S.COMPLETED or (self.incoming is not None
                                                    and self.incoming.handover == "operator")
        if self.is_destination and not owns:
            raise _generic("Guest is waiting for an incoming migration")
        if self._migration_running():
            raise _generic("There's a migration process in progress")
        check_migration_uri(uri, outgoing=True)
        if self.is_destination:
            # a completed destination becomes a source for the next hop
            self.is_destination = False
            self.state = MigrationState(SOURCE_TRANSITIONS, on_change=self._on_migration_state)
        mig = OutgoingMigration(self, uri)
        self.outgoing = mig
        self.last_outgoing = mig
        self._require_nursery().start_soon(mig.run)
        return {}

    async def qmp_migrate_incoming(self, uri: str, exit_on_error: bool = True) -> dict[str, Any]:
        if not self.is_destination:
            raise _generic("'-incoming' was not specified on the command line")
        # QEMU (qmp_migrate_incoming) only latches "started" once listening
        # succeeded: a bad URI or an unusable path can be retried.
        started = self.incoming is not None and self.incoming.listening.is_set()
        if self.incoming_uri != "defer" or started:
            raise _generic("The incoming migration has already been started")
        check_migration_uri(uri, outgoing=False)
        await self._start_incoming(uri)
        return {}

    async def qmp_migrate_cancel(self) -> dict[str, Any]:
        if self.outgoing is not None:
            self.outgoing.cancel()
        return {}

    async def qmp_query_migrate(self) -> dict[str, Any]:
        status = self.state.status
        if status is S.NONE:
            return {}
        if self.is_destination or (self.outgoing is None and self.incoming is not None):
            info: dict[str, Any] = {"status": status.value}
            inc = self.incoming
            if status is S.COMPLETED and inc is not None and inc.counters.total_time_ms is not None:
                info["total-time"] = inc.counters.total_time_ms
            if status is S.FAILED and inc is not None and inc.error_desc:
                info["error-desc"] = inc.error_desc
            if inc is not None and inc.handover:
                info["x-handover"] = inc.handover
            return info
        mig = self.outgoing
        if mig is None:  # not reached: a source's status leaves NONE only by migrate
            return {"status": status.value}
        c = mig.counters
        info = {"status": status.value}
        now = time.perf_counter_ns()
        if status in (S.SETUP,):
            return info  # QEMU: has_total_time = false while in setup
        if status in (S.ACTIVE, S.DEVICE, S.CANCELLING, S.COMPLETED):
            total = c.total_time_ms if c.total_time_ms is not None else (now - c.start_ns) // 1_000_000
            info["total-time"] = total
            if c.setup_time_ms is not None:
                info["setup-time"] = c.setup_time_ms
            ram = {
                "transferred": c.transferred,
                "total": mig.ram.total_pages * TARGET_PAGE_SIZE if mig.ram else 0,
                "duplicate": c.duplicate,
                "normal": c.normal,
                "normal-bytes": c.normal * TARGET_PAGE_SIZE,
                "mbps": c.mbps,
                "dirty-sync-count": c.dirty_sync_count,
                "page-size": TARGET_PAGE_SIZE,
                "pages-per-second": int(c.pages_per_second),
                "precopy-bytes": c.precopy_bytes,
                "downtime-bytes": c.downtime_bytes,
                "postcopy-bytes": 0,
                "multifd-bytes": c.multifd_bytes,
                "postcopy-requests": 0,
                "dirty-sync-missed-zero-copy": 0,
            }
            if status is S.COMPLETED:
                info["downtime"] = c.downtime_ms or 0
                if c.total_time_ms and c.setup_time_ms is not None and c.total_time_ms > c.setup_time_ms:
                    ram["mbps"] = c.transferred * 8 / (c.total_time_ms - c.setup_time_ms) / 1000
            else:
                info["expected-downtime"] = c.expected_downtime_ms
                ram["remaining"] = mig.ram.pending_bytes if mig.ram else 0
                ram["dirty-pages-rate"] = c.dirty_pages_rate
            info["ram"] = ram
            if c.cpu_throttle_percentage and status is not S.COMPLETED:
                info["cpu-throttle-percentage"] = c.cpu_throttle_percentage
        if status is S.FAILED and c.error_desc:
            info["error-desc"] = c.error_desc
        if mig.owner.note:
            info["x-handover"] = mig.owner.note
        return info

    async def qmp_pmemsave(self, val: int, size: int, filename: str, cpu_index: int | None = None) -> dict[str, Any]:
        if val < 0 or size < 0:
            raise _generic("Parameter 'val' and 'size' must be non-negative")
        ram = self.machine.ram_block.host
        end = val + size
        in_ram_end = min(end, ram.size)

        def write() -> None:
            with open(filename, "wb") as f:
                if val < in_ram_end:
                    f.write(ram[val:in_ram_end].data)
                tail = end - max(val, in_ram_end)
                while tail > 0:  # beyond RAM: unassigned memory reads as zero here
                    n = min(tail, 1 << 20)
                    f.write(bytes(n))
                    tail -= n

        try:
            await trio.to_thread.run_sync(write)
        except OSError as exc:
            raise _generic(f"Could not open '{filename}': {exc.strerror}") from None
        return {}

    async def qmp_calc_dirty_rate(self, calc_time: int, calc_time_unit: str = "second",
                                  sample_pages: int = 512, mode: str = "page-sampling") -> dict[str, Any]:
        if self.dirty_rate.get("status") == "measuring":
            raise _generic("the dirty rate is already being measured.")
        if calc_time_unit not in ("second", "millisecond"):
            raise _generic(f"Parameter 'calc-time-unit' does not accept value '{calc_time_unit}'")
        if mode not in ("page-sampling", "dirty-bitmap", "dirty-ring"):
            raise _generic(f"Parameter 'mode' does not accept value '{mode}'")
        seconds = calc_time / (1000.0 if calc_time_unit == "millisecond" else 1.0)
        if not 0 < seconds <= 60:
            raise _generic("Parameter 'calc-time' is out of range[1, 60].")
        if mode == "dirty-ring" and not self.kvm_listener.dirty_ring:
            raise _generic("mode dirty-ring is not enabled, use other method instead.")
        if self._migration_running():
            raise _generic("Dirty rate measurement is not supported during migration")
        self.dirty_rate = {"status": "measuring", "start-time": int(time.time()),
                           "calc-time": calc_time, "calc-time-unit": calc_time_unit,
                           "sample-pages": sample_pages, "mode": mode}
        self._require_nursery().start_soon(self._measure_dirty_rate, seconds)
        return {}

    async def _measure_dirty_rate(self, seconds: float) -> None:
        """Exact dirty rate from the dirty log (every dirty page counted once).

        Like QEMU's dirty-bitmap mode: start DIRTY_RATE tracking, sync and
        discard, clear-protect (manual protect), wait, sync again and count
        the pages fetched in between.  Not sampled, whatever ``mode`` says.
        """
        ms = self.ms
        ms.memory_global_dirty_log_start(GLOBAL_DIRTY_DIRTY_RATE)
        try:
            ms.memory_global_dirty_log_sync(False)
            ms.memory_region_clear_dirty_bitmap(self.machine.ram_mr, 0, self.machine.memory_bytes)
            before = self.kvm_listener.statistics().pages_fetched
            t0 = time.perf_counter()
            await trio.sleep(seconds)
            ms.memory_global_dirty_log_sync(False)
            elapsed = time.perf_counter() - t0
            pages = self.kvm_listener.statistics().pages_fetched - before
        finally:
            ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_DIRTY_RATE)
        mib_per_s = pages * TARGET_PAGE_SIZE / (1 << 20) / elapsed
        self.dirty_rate.update(status="measured", **{"dirty-rate": int(round(mib_per_s)),
                                                     "x-dirty-pages": int(pages)})

    async def qmp_query_dirty_rate(self, calc_time_unit: str | None = None) -> dict[str, Any]:
        out = dict(self.dirty_rate)
        out.setdefault("status", "unstarted")
        return out

    async def qmp_x_query_migration_history(self) -> dict[str, Any]:
        mig = self.last_outgoing
        if mig is None and self.incoming is not None:
            # a destination: no iterations, its own timeline (the driver merges
            # it into the source's history, see migrator.cli._demo)
            return MigrationHistory(label=self.label, status=self.state.status.value,
                                    setup=self.describe_setup(),
                                    destination=self.incoming.timeline).to_json()
        if mig is None:
            raise _generic("No outgoing migration has run in this VM")
        return mig.counters.history.to_json()

    async def qmp_x_query_accel_stats(self) -> dict[str, Any]:
        rec = self.vcpus.statistics()
        stats: dict[str, Any] = {"kvm": kvm_statistics_dict(self.machine.kvm.statistics()), "listener": self.kvm_listener_stats()}
        # one object per vCPU; a controller with totals of its own (real KVM) beside them
        stats["vcpus"] = [v.to_json() for v in rec.vcpus]
        totals = rec.controller_json()
        if totals is not None:
            stats["vcpu-controller"] = totals
        out: dict[str, Any] = _jsonable(stats)
        return out


def _jsonable(obj: Any) -> Any:
    """numpy scalars -> Python numbers, keys -> str, tuples -> lists (json.dumps-able)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


class _Caps:
    """Attribute view of the enabled capabilities for the engine."""

    def __init__(self, caps: MigrationCapabilities) -> None:
        self.events = caps["events"]
        self.auto_converge = caps["auto-converge"]
        self.x_ram_only = caps["x-ram-only"]
        self.x_handover = caps["x-handover"]
        self.x_qemu_devices = caps["x-qemu-devices"]
        self.multifd = caps["multifd"]


if TYPE_CHECKING:
    from ..engine._seams import DestinationVM, SourceVM

    # VM is both ends of a migration (mypy checks this; nothing runs it)
    def _vm_is_both_ends(vm: VM) -> tuple[SourceVM, DestinationVM]:
        return vm, vm
