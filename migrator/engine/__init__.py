"""The pre-copy engine: source and destination, RAM state, QEMU's status
table, the history records, device-state validation, multifd channels and
machine construction.

Modules: ``_source`` (OutgoingMigration), ``_destination``
(IncomingMigration), ``_ownership`` (who may run the guest),
``_switchover`` (when to stop the guest), ``_convergence`` (rate windows,
auto-converge), ``_counters``, ``_ram``, ``_multifd``, ``_devstate``,
``_qemu_devices``, ``_history``, ``_status``, ``_machine``, ``_seams`` (the VM as
Protocols).

Depends on :mod:`memory` (and :mod:`memory.kvm`), :mod:`transport` and
:mod:`migrator.errors` only; never on :mod:`migrator.qmp`,
:mod:`migrator.cli` or :mod:`migrator.reports`.
"""

from ._devstate import DeviceStateError, validate_device_state
from ._destination import IncomingMigration
from ._source import OutgoingMigration
from ._history import (
    DestinationTimeline, DowntimeBreakdown, DowntimePrediction, IterationRecord, MigrationHistory,
)
from ._machine import AccelConfig, Machine, parse_accel, parse_size, parse_smp
from ._ram import RAMLoadState, RAMSaveState
from ._status import (
    DESTINATION_TRANSITIONS, RUNNING_STATES, SOURCE_TRANSITIONS, MigrationState, MigrationStatus,
)

__all__ = [
    "AccelConfig", "DESTINATION_TRANSITIONS", "DestinationTimeline", "DeviceStateError",
    "DowntimeBreakdown", "DowntimePrediction", "IncomingMigration", "IterationRecord", "Machine",
    "MigrationHistory", "MigrationState", "MigrationStatus", "OutgoingMigration", "RAMLoadState",
    "RAMSaveState", "RUNNING_STATES", "SOURCE_TRANSITIONS", "parse_accel", "parse_size",
    "parse_smp", "validate_device_state",
]
