"""The pre-copy migration engine, QMP server, history and reports.

Public API (implementation lives in ``_private`` modules):

* the engine: :class:`VM` (one source or destination process),
  :class:`OutgoingMigration`, :class:`IncomingMigration`, :class:`Machine`,
  :func:`parse_accel`, :func:`parse_size`;
* QEMU's state machine: :class:`MigrationStatus`, :class:`MigrationState`;
* QMP: :class:`QMPServer`, :class:`CommandTable`, :func:`command`,
  :class:`MigrationOptions`, :class:`MigrationParameters`,
  :class:`MigrationCapabilities`;
* history and reports: :class:`MigrationHistory`, :class:`IterationRecord`,
  :class:`DowntimeBreakdown`, :func:`write_report`;
* errors: see :mod:`migrator.errors`.
"""

from ._commands import CommandTable, command
from ._engine import IncomingMigration, OutgoingMigration
from ._history import DowntimeBreakdown, IterationRecord, MigrationHistory
from ._machine import AccelConfig, Machine, parse_accel, parse_size
from ._params import MigrationCapabilities, MigrationOptions, MigrationParameters
from ._report import ReportPaths, RunSummary, write_report
from ._server import QMPServer
from ._status import MigrationState, MigrationStatus
from ._vm import VM
from .errors import LocalProtocolError, MigrationError, MigratorError, QMPError, StateError

__all__ = [
    "AccelConfig", "CommandTable", "DowntimeBreakdown", "IncomingMigration", "IterationRecord",
    "LocalProtocolError", "Machine", "MigrationCapabilities", "MigrationError", "MigrationHistory",
    "MigrationOptions", "MigrationParameters", "MigrationState", "MigrationStatus", "MigratorError",
    "OutgoingMigration", "QMPError", "QMPServer", "ReportPaths", "RunSummary", "StateError", "VM",
    "command", "parse_accel", "parse_size", "write_report",
]
