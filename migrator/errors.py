"""Errors raised by the ``migrator`` package.

Hierarchy::

    MigratorError                 root of every error this package raises
    ├── MigrationError            a migration failed (its error-desc)
    ├── QMPError                  becomes a QMP error reply {"error": {"class", "desc"}}
    │   └── StateError            a command was issued in the wrong migration state
    └── LocalProtocolError        misuse of the sans-IO QMP connection (our bug, not the peer's)

``LocalProtocolError`` is also :class:`transport.LocalProtocolError`: there is
one "our own code misused a sans-IO protocol object" error in the project,
whichever protocol (QMP here, the migration stream in ``transport``), so
``except transport.LocalProtocolError`` sees both.  Its message is ours
alone: subclassing adds nothing to the text a QMP client or log sees.

Faults of the QMP *peer* (bad JSON, bad arguments, unknown commands) are not
exceptions at the connection level: QEMU answers them with an error reply and
keeps the monitor usable, and so do we.  They surface as ``QMPError`` only
inside command validation, where the dispatcher converts them into replies.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from transport.errors import LocalProtocolError as _TransportLocalProtocolError

__all__ = [
    "ErrorClass",
    "LocalProtocolError",
    "MigrationError",
    "MigratorError",
    "QMPError",
    "StateError",
]


class ErrorClass(enum.StrEnum):
    """QMP error classes, as in QEMU's ``qapi/error.json`` (``QapiErrorClass``).

    Being a ``str`` subclass, a member serialises to its QMP spelling.
    """

    GENERIC_ERROR = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class MigratorError(Exception):
    """Root of all errors raised by ``migrator``."""


class QMPError(MigratorError):
    """An error to be reported to a QMP client.

    Raise it from a command handler (or argument validation) and the
    dispatcher sends ``{"error": {"class": error_class, "desc": desc}}``.

    Args:
        error_class: one of QEMU's error classes (see :class:`ErrorClass`);
            a plain string is accepted for forward compatibility.
        desc: the human-readable description, worded as QEMU words it.
    """

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = str(error_class)
        self.desc = desc

    @classmethod
    def generic(cls, desc: str) -> QMPError:
        """Shorthand for ``QMPError(ErrorClass.GENERIC_ERROR, desc)``."""
        return cls(ErrorClass.GENERIC_ERROR, desc)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.error_class!r}, {self.desc!r})"


def _state_name(state: Any) -> str:
    # Accept MigrationStatus enum members (their value is QEMU's string) or strings.
    return str(getattr(state, "value", state))


class StateError(QMPError):
    """A command needs the migration in one of ``required`` states but it is in ``state``.

    Raised by the ``@require(...)`` guard of state-dependent commands and
    reported to the client as a ``GenericError``.  The evidence is kept:
    ``state`` (the actual state) and ``required`` (a tuple of acceptable
    states).  QEMU words these errors per command; pass ``desc`` to use the
    exact QEMU text, otherwise a generic description is built.
    """

    def __init__(self, state: Any, required: Iterable[Any] | Any, desc: str | None = None) -> None:
        if isinstance(required, (str, bytes)) or not isinstance(required, Iterable):
            required = (required,)
        self.state = state
        self.required = tuple(required)
        if desc is None:
            wanted = ", ".join(f"'{_state_name(s)}'" for s in self.required)
            desc = f"Migration is in state '{_state_name(state)}', expected one of: {wanted}"
        super().__init__(ErrorClass.GENERIC_ERROR, desc)

    def __repr__(self) -> str:
        return f"StateError(state={self.state!r}, required={self.required!r}, desc={self.desc!r})"


class LocalProtocolError(MigratorError, _TransportLocalProtocolError):
    """The sans-IO QMP connection was used incorrectly by our own code.

    For example: reading requests before the greeting was sent, feeding data
    after EOF, or replying with a value that cannot be encoded as JSON.
    """


class MigrationError(MigratorError):
    """A migration failed (bad incoming stream content, peer went away, ...).

    The message is what ``query-migrate`` reports as ``error-desc``.
    """
