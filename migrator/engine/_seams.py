"""The seams the engine crosses, as :class:`typing.Protocol`\\ s.

The engine (:class:`~migrator.engine.OutgoingMigration`,
:class:`~migrator.engine.IncomingMigration`) never imports the objects it
drives: the VM process lives in :mod:`migrator.qmp` (which the engine must
not import), the vCPU controllers in :mod:`memory.kvm.sim` and
:mod:`memory.kvm.real`.  What it needs from them is written down here, once,
so that mypy checks both sides: the engine uses no member that is not listed,
and every implementation provides every member (the typing-only functions at
the end of this module and of ``migrator.qmp._vm`` prove it; mypy checks
them, nothing runs them; ``tests/unit/test_seams.py`` runs that check).

* :class:`VCPUController`: the vCPUs of one VM (``SimVCPUs``, ``RealVCPUs``):
  run, stop/resume, throttle, state save/load, statistics.
* :class:`MigrationParametersView`, :class:`MigrationCapabilitiesView`: the
  migration parameters and capabilities the engine reads (QEMU's names in
  snake_case; :class:`migrator.qmp.MigrationParameters` and the VM's
  capability view implement them).
* :class:`DirtyLogListener`: the KVM memory listener, for its mode and
  statistics.
* :class:`MigrationVM`: what both directions need from a VM;
  :class:`SourceVM` and :class:`DestinationVM` add what each direction needs.

Members the engine only reads are read-only properties here, so a frozen
dataclass field or a plain attribute satisfies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ._convergence import RateParams, ThrottleParams
from ._switchover import SwitchoverParams

if TYPE_CHECKING:
    import trio

    from memory import MemoryRegion, MemorySystem, RAMBlock
    from memory.kvm import (DirtyLogMode, KVMListenerStatistics, KVMMemoryListener, RealVCPUs, SimVCPUs,
                            VCPUControllerStatistics)

    from ._machine import Machine
    from ._qemu_devices import QemuDeviceState
    from ._status import MigrationState

__all__ = [
    "DestinationVM", "DirtyLogListener", "MigrationCapabilitiesView", "MigrationParametersView",
    "MigrationVM", "RAMBlocks", "SourceVM", "VCPUController", "VCPUStatistics",
]

#: A controller's statistics: a frozen record of its totals and one
#: ``VCPUCounters`` per vCPU (``pages_written``: an int, or None when the
#: guest program does not count); ``to_json()`` for x-query-accel-stats.
VCPUStatistics: TypeAlias = "VCPUControllerStatistics"

#: The VM's RAM blocks with the memory region each one backs.
RAMBlocks: TypeAlias = "Sequence[tuple[RAMBlock, MemoryRegion]]"


class VCPUController(Protocol):
    """The vCPUs of one VM, as the VM process and the engine drive them.

    State rules: the vCPUs start stopped; ``save_state``/``load_state`` only
    while stopped (they raise ``RuntimeError`` otherwise); ``vm_stop``
    returns once no guest instruction runs any more.
    """

    @property
    def running(self) -> bool:
        """Whether the vCPUs run the guest (between vm_start and vm_stop)."""
        ...

    @property
    def throttle_pct(self) -> int:
        """The cpu-throttle percentage in force (0: not throttled)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """Own the vCPUs (processes or threads) until cancelled; started stopped."""
        ...

    async def vm_start(self) -> None:
        """Resume every vCPU."""
        ...

    async def vm_stop(self) -> None:
        """Stop every vCPU; on return no guest store or fault is in flight."""
        ...

    def set_throttle(self, pct: int) -> None:
        """cpu-throttle: ``pct`` percent of each time slice asleep (ValueError if out of range)."""
        ...

    def save_state(self) -> bytes:
        """Every vCPU's state, as one blob (stopped only)."""
        ...

    def load_state(self, data: bytes) -> None:
        """Load a blob of :meth:`save_state` (stopped only); ValueError if it does not fit."""
        ...

    def statistics(self) -> VCPUStatistics:
        """Counters, see :data:`VCPUStatistics`."""
        ...

    def expected_stop_ns(self) -> int:
        """What the next :meth:`vm_stop` is expected to take (ns), from the
        controller's own recent stops: the downtime prediction's stop term."""
        ...


class MigrationParametersView(RateParams, ThrottleParams, SwitchoverParams, Protocol):
    """The migration parameters the engine reads (QEMU's, plus our ``x-`` ones):
    what the rate windows, auto-converge and the switchover decision each
    declare they read, and the rest below.

    Read again at every use: ``migrate-set-parameters`` acts mid-migration.
    """

    @property
    def multifd_channels(self) -> int: ...
    @property
    def multifd_compression(self) -> str: ...
    @property
    def multifd_zstd_level(self) -> int: ...
    @property
    def zero_page_detection(self) -> str: ...
    @property
    def x_clear_bitmap_shift(self) -> int: ...
    @property
    def x_return_path_timeout(self) -> int: ...  # ms


class MigrationCapabilitiesView(Protocol):
    """The enabled capabilities the engine reads, one bool each."""

    @property
    def events(self) -> bool: ...
    @property
    def auto_converge(self) -> bool: ...
    @property
    def multifd(self) -> bool: ...
    @property
    def x_ram_only(self) -> bool: ...
    @property
    def x_handover(self) -> bool: ...
    @property
    def x_qemu_devices(self) -> bool: ...


class DirtyLogListener(Protocol):
    """The KVM memory listener: how fetched pages are re-protected, and its counters."""

    @property
    def mode(self) -> DirtyLogMode: ...

    def statistics(self) -> KVMListenerStatistics: ...


class MigrationVM(Protocol):
    """What both directions of a migration need from the VM process."""

    @property
    def state(self) -> MigrationState:
        """The migration state machine of this VM (its status and transitions)."""
        ...

    @property
    def params(self) -> MigrationParametersView: ...

    @property
    def caps(self) -> MigrationCapabilitiesView: ...

    @property
    def vcpus(self) -> VCPUController: ...

    def ram_blocks(self) -> RAMBlocks: ...

    def log(self, msg: str) -> None:
        """One line for the operator (stderr)."""
        ...

    def set_runstate(self, state: str) -> None:
        """QEMU's run state (``paused``, ``postmigrate``...) without touching the vCPUs."""
        ...

    async def vm_start(self) -> None:
        """Resume the guest (``cont``): the vCPUs run, RESUME is emitted."""
        ...


class SourceVM(MigrationVM, Protocol):
    """The source VM of an :class:`~migrator.engine.OutgoingMigration`."""

    @property
    def label(self) -> str: ...

    @property
    def runstate(self) -> str: ...

    @property
    def ms(self) -> MemorySystem: ...

    @property
    def kvm_listener(self) -> DirtyLogListener: ...

    @property
    def qemu_devices(self) -> QemuDeviceState | None:
        """QEMU's device state if this VM was loaded from a stock QEMU stream."""
        ...

    def describe_setup(self) -> dict[str, Any]: ...

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None: ...

    def kvm_listener_stats(self) -> dict[str, Any]: ...

    def ran_ns(self) -> int:
        """How long the vCPUs ran in this process (the virtual clock)."""
        ...

    async def vm_stop(self, runstate: str = ...) -> None:
        """Stop the guest, enter ``runstate``; STOP is emitted if it ran."""
        ...


class DestinationVM(MigrationVM, Protocol):
    """The destination VM of an :class:`~migrator.engine.IncomingMigration`."""

    #: set by the engine when the stream carries a stock QEMU's device sections
    qemu_devices: QemuDeviceState | None

    @property
    def machine(self) -> Machine: ...

    @property
    def autostart(self) -> bool:
        """Resume once loaded (false with ``-S`` or after ``stop``)."""
        ...


if TYPE_CHECKING:
    # The implementations satisfy the seams (the VM's proof is in migrator.qmp._vm,
    # which this package may not import).
    def _sim_vcpus_are_a_controller(v: SimVCPUs) -> VCPUController:
        return v

    def _real_vcpus_are_a_controller(v: RealVCPUs) -> VCPUController:
        return v

    def _kvm_listener_is_a_dirty_log_listener(listener: KVMMemoryListener) -> DirtyLogListener:
        return listener
