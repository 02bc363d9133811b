"""QMP: the sans-IO connection (:mod:`._protocol`), the trio server, the
command table with QEMU's argument types, migration parameters and
capabilities, and :class:`VM`, one VM process with its QMP commands.

Depends on :mod:`migrator.engine` (and below); never on
:mod:`migrator.cli` or :mod:`migrator.reports`.
"""

from ._commands import CommandTable, command
from ._params import MigrationCapabilities, MigrationOptions, MigrationParameters
from ._protocol import QMPConnection
from ._server import QMPServer
from ._vm import VM

__all__ = [
    "CommandTable", "MigrationCapabilities", "MigrationOptions", "MigrationParameters",
    "QMPConnection", "QMPServer", "VM", "command",
]
