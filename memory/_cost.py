"""Per-cause cost accounting hooks: what the memory core and the KVM glue report.

A benchmark that wants to know what the dirty log costs (how long each
``KVM_GET_DIRTY_LOG`` took, what a global sync cost, when the vCPUs were
stopped) sets :attr:`memory.MemorySystem.cost_meter` to an object that
implements :class:`CostMeter`; the code below calls it at fixed, documented
places.  Nothing is wrapped or patched at run time: the calls are part of
the code path, and when no meter is set they go to :data:`NO_METER`, whose
methods do nothing (one attribute load and two calls per metered event).

Theory of operation
===================

Every metered event is a ``begin(cause)`` / ``end(cause, token, pages=n)``
pair around one operation, in the thread that performs it.  ``begin``
returns a token that the caller hands back to ``end`` unchanged (a meter
puts its start time in it); ``end`` is called in a ``finally``, so an
operation that raises is still accounted.  Events nest: a global sync
contains the ioctls it issues.  A meter sees them in call order, so it can
attribute a leaf event to the sync that is open around it.

The hooks, what each one times (from where to where), and ``pages``:

=====================  ==========================================================
cause                  begin -> end
=====================  ==========================================================
``GLOBAL_SYNC``        ``MemorySystem.memory_global_dirty_log_sync(False)``:
                       entry -> return, so every listener's fetches and the
                       write-protect-all hook after them.  ``pages`` 0.
``FINAL_SYNC``         the same with ``last_stage=True`` (switchover, vCPUs
                       stopped).
``REGION_SYNC``        the KVM listener's ``log_sync`` of one section outside
                       a global sync (a display's per-region sync), or its
                       ``log_sync_global`` (dirty ring) outside one: entry ->
                       return, including its write-protect-all if the
                       region-sync rule issues one.
``GET_DIRTY_LOG``      the KVM listener around one ``KvmVM.get_dirty_log``
                       call (one slot); ``pages`` = bits set in the bitmap it
                       returned.  Counted even when it raised (ENOENT).
``CLEAR_DIRTY_LOG``    the KVM listener around one ``KvmVM.clear_dirty_log``
                       (manual protect); ``pages`` = bits it was asked to clear.
``WRITE_PROTECT_ALL``  the write-protect-all hook around one
                       ``KvmVM.write_protect_all(True)`` (one per VM per sync).
``WRITE_PROTECT_OFF``  the same around ``write_protect_all(False)``.
``RING_HARVEST``       the KVM listener around ``harvest_dirty_rings()``
                       (:class:`memory.kvm.DirtyRingBackend`); ``pages`` =
                       entries harvested.
``RING_RESET``         around ``reset_dirty_rings()`` (``KVM_RESET_DIRTY_RINGS``);
                       ``pages`` = entries reset.
``RING_REAP``          around one ``reap_dirty_rings()`` of a backend that
                       harvests and resets in one locked call
                       (:class:`memory.kvm.DirtyRingReaper`); ``pages`` =
                       entries harvested.
``SET_MEMORY_REGION``  the KVM listener around one ``set_user_memory_region``
                       (slot add/delete and log start/stop: on KVM the latter
                       write-protects every mapped page of the slot).
``VM_STOP``            the VM's ``vm_stop`` around stopping the vCPUs
                       (``migrator.qmp``'s ``VM.vm_stop``): entry -> every vCPU
                       acknowledged the stop.
=====================  ==========================================================

A meter must be cheap and must not raise: it runs inside the dirty-log
critical path, and an exception from ``end`` would replace the operation's
own.  It must not call back into the memory core.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

__all__ = ["Cause", "CostMeter", "DIRTY_LOG_CAUSES", "NO_METER", "NullMeter", "SYNC_CAUSES"]


class Cause(enum.Enum):
    """Why time was spent (see the table in the module docstring)."""

    GLOBAL_SYNC = "global-sync"
    FINAL_SYNC = "final-sync"
    REGION_SYNC = "region-sync"
    GET_DIRTY_LOG = "get-dirty-log"
    CLEAR_DIRTY_LOG = "clear-dirty-log"
    WRITE_PROTECT_ALL = "write-protect-all"
    WRITE_PROTECT_OFF = "write-protect-off"
    RING_HARVEST = "ring-harvest"
    RING_RESET = "ring-reset"
    RING_REAP = "ring-reap"
    SET_MEMORY_REGION = "set-memory-region"
    VM_STOP = "vm-stop"


#: the causes that are a sync (they contain the other events)
SYNC_CAUSES = frozenset({Cause.GLOBAL_SYNC, Cause.FINAL_SYNC, Cause.REGION_SYNC})
#: the dirty-log ioctls: fetching dirty bits and re-protecting the pages
DIRTY_LOG_CAUSES = frozenset(
    {
        Cause.GET_DIRTY_LOG,
        Cause.CLEAR_DIRTY_LOG,
        Cause.WRITE_PROTECT_ALL,
        Cause.RING_HARVEST,
        Cause.RING_RESET,
        Cause.RING_REAP,
    }
)


@runtime_checkable
class CostMeter(Protocol):
    """Receives one ``begin``/``end`` pair per metered event."""

    def begin(self, cause: Cause) -> int:
        """An event of ``cause`` starts; returns the token for :meth:`end`."""
        ...

    def end(self, cause: Cause, token: int, pages: int = 0) -> None:
        """The event begun with ``token`` is over (also after an exception).

        ``pages``: the cause's page count (see the module docstring), 0 if
        it has none.
        """
        ...


class NullMeter:
    """The meter that measures nothing (:data:`NO_METER`)."""

    __slots__ = ()

    def begin(self, cause: Cause) -> int:
        return 0

    def end(self, cause: Cause, token: int, pages: int = 0) -> None:
        return None

    def __repr__(self) -> str:
        return "NO_METER"


#: the default :attr:`MemorySystem.cost_meter`; code that computes something
#: only for the meter (a popcount) may skip it when ``meter is NO_METER``
NO_METER = NullMeter()
