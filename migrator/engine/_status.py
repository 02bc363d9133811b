"""QEMU's ``MigrationStatus`` and its transitions, in one table.

Values and their order are QEMU's (qapi/migration.json).  Every change goes
through :meth:`MigrationState.set`, a compare-and-set like QEMU's
``migrate_set_state``: an illegal transition raises :class:`StateError` and
leaves the state unchanged.  Postcopy/COLO states exist in the enum (so QMP
clients see QEMU's names) but this engine never enters them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..errors import StateError


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_DEVICE = "postcopy-device"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER_SETUP = "postcopy-recover-setup"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"


S = MigrationStatus

#: Allowed transitions of the outgoing side (source) ...
SOURCE_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    # a new migration may start from any finished state
    S.NONE: frozenset({S.SETUP}),
    S.COMPLETED: frozenset({S.SETUP}),
    S.FAILED: frozenset({S.SETUP}),
    S.CANCELLED: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.CANCELLING, S.FAILED}),
    S.ACTIVE: frozenset({S.DEVICE, S.CANCELLING, S.FAILED}),
    S.DEVICE: frozenset({S.COMPLETED, S.CANCELLING, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED, S.FAILED}),
}

#: ... and of the incoming side (destination).
DESTINATION_TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.NONE: frozenset({S.SETUP}),
    S.SETUP: frozenset({S.ACTIVE, S.FAILED}),
    S.ACTIVE: frozenset({S.COMPLETED, S.FAILED}),
    S.FAILED: frozenset({S.SETUP}),
}

#: States in which a migration is in flight (QEMU's migration_is_running, + COLO).
RUNNING_STATES = frozenset({
    S.SETUP, S.WAIT_UNPLUG, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE, S.CANCELLING,
    S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP,
    S.POSTCOPY_RECOVER, S.COLO,
})


class MigrationState:
    """The current status plus the transition table it obeys.

    ``on_change(new_status)`` is called after every successful change (the
    QMP ``MIGRATION`` event is emitted from there).
    """

    def __init__(self, table: dict[MigrationStatus, frozenset[MigrationStatus]],
                 on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._table = table
        self.status = MigrationStatus.NONE
        self.on_change = on_change

    def set(self, old: MigrationStatus, new: MigrationStatus) -> bool:
        """Compare-and-set: move ``old`` -> ``new`` if the status is ``old``.

        Returns False (and changes nothing) if the status is not ``old``;
        raises StateError if ``old`` -> ``new`` is not a legal transition.
        """
        if new not in self._table.get(old, frozenset()):
            raise StateError(old.value, f"a state that may go to {new.value!r}")
        if self.status is not old:
            return False
        self.status = new
        if self.on_change is not None:
            self.on_change(new)
        return True

    def goto(self, new: MigrationStatus) -> None:
        """Move from the current status to ``new`` (must be legal)."""
        if not self.set(self.status, new):  # pragma: no cover - set() raised
            raise StateError(self.status.value, new.value)

    @property
    def running(self) -> bool:
        return self.status in RUNNING_STATES
