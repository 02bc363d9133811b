"""migrator: a pure-Python, QEMU-side live-migration engine.

Subpackages, each depending only on the ones listed before it:

* :mod:`migrator.errors`: the exception hierarchy every layer shares;
* :mod:`migrator.engine`: the pre-copy engine (:class:`OutgoingMigration`,
  :class:`IncomingMigration`), RAM state, QEMU's state machine
  (:class:`MigrationStatus`, :class:`MigrationState`), the history records,
  :class:`Machine` and :func:`parse_accel`, :func:`parse_size`;
* :mod:`migrator.qmp`: the QMP connection and server, the command table,
  :class:`MigrationOptions`/:class:`MigrationParameters`/
  :class:`MigrationCapabilities`, and :class:`VM` (one VM process);
* :mod:`migrator.reports`: reports, plots and the seed's comparison, over
  recorded histories and public statistics;
* :mod:`migrator.cli`: the command line and the demo driver.

This module re-exports the public names.
"""

from .engine import (
    AccelConfig, DowntimeBreakdown, IncomingMigration, IterationRecord, Machine, MigrationHistory,
    MigrationState, MigrationStatus, OutgoingMigration, parse_accel, parse_size,
)
from .errors import LocalProtocolError, MigrationError, MigratorError, QMPError, StateError
from .qmp import (
    VM, CommandTable, MigrationCapabilities, MigrationOptions, MigrationParameters, QMPServer,
    command,
)
from .reports import ReportPaths, RunSummary, write_report

__all__ = [
    "AccelConfig", "CommandTable", "DowntimeBreakdown", "IncomingMigration", "IterationRecord",
    "LocalProtocolError", "Machine", "MigrationCapabilities", "MigrationError", "MigrationHistory",
    "MigrationOptions", "MigrationParameters", "MigrationState", "MigrationStatus", "MigratorError",
    "OutgoingMigration", "QMPError", "QMPServer", "ReportPaths", "RunSummary", "StateError", "VM",
    "command", "parse_accel", "parse_size", "write_report",
]
