"""The VM's write-protect-all hook: one ``KVM_WRITE_PROTECT_ALL_MEM`` per sync, per VM.

The 2017 draft registers one callback with the memory core
(``memory_register_write_protect_all``); the core calls it with ``True``
after the last fetch of a global sync and with ``False`` after a
``log_stop``.  :class:`WriteProtectAllHook` is that callback, shared by every
KVM listener of the VM (see the "Three ways to re-protect" essay in
``memory/kvm/_modes.py`` for why it is per VM).  It talks to its listeners
through :class:`WriteProtectAllClient`, a handful of public methods, never
their internals.

Metered (``memory/_cost.py``): ``Cause.WRITE_PROTECT_ALL`` around the
``write_protect_all(True)`` ioctl, ``Cause.WRITE_PROTECT_OFF`` around
``write_protect_all(False)``, on the first listener's memory core's meter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from .._cost import NO_METER, Cause, CostMeter
from ._backend import KvmVM

if TYPE_CHECKING:
    from .._system import MemorySystem


class WriteProtectAllClient(Protocol):
    """What the hook needs of a listener (``KVMMemoryListener`` implements it)."""

    @property
    def ms(self) -> MemorySystem: ...

    def write_protect_pending(self) -> bool:
        """Pages were fetched WITHOUT_WRITE_PROTECT and not yet re-protected."""
        ...

    def write_protect_done(self, time_ns: int) -> None:
        """The VM was write-protected (one ioctl of ``time_ns``): nothing is pending."""
        ...

    def write_protect_off_done(self) -> None:
        """``KVM_WRITE_PROTECT_ALL_MEM(0)`` was issued."""
        ...

    def in_topology_update(self) -> bool:
        """Between the listener's ``begin`` and ``commit``."""
        ...

    def logs_dirty_pages(self) -> bool:
        """Some slot of the listener has ``KVM_MEM_LOG_DIRTY_PAGES``."""
        ...


class WriteProtectAllHook:
    """The draft's ``kvm_write_protect_all_mem``: ONE per VM, shared by every
    ``KVMMemoryListener`` of that VM (QEMU's ``kvm_init`` registers it once, and
    ``KVM_WRITE_PROTECT_ALL_MEM`` acts on every address space of the VM).

    Ordering rule it keeps: the memory core calls it with ``True`` after the
    last fetch of EVERY listener; it must then protect if ANY listener of the
    VM fetched without protection since the last call.  A per-listener hook
    is wrong twice over: the memory core keeps one hook, so the last
    registered listener's would replace the others' (and, if that listener
    fetched nothing, the others' unprotected fetches would never be
    re-protected), and unregistering it would leave the others fetching
    ``WITHOUT_WRITE_PROTECT`` with no hook at all.  ``False`` (switch the lazy
    protection off) is safe only when no slot of ANY listener of the VM still
    logs, checked once every listener has applied its part of the topology
    update.
    """

    def __init__(self, kvm: KvmVM) -> None:
        self.kvm = kvm
        self.listeners: list[WriteProtectAllClient] = []
        self.off_requested = False

    def _meter(self) -> CostMeter:
        return self.listeners[0].ms.cost_meter if self.listeners else NO_METER

    def __call__(self, write: bool) -> None:
        if not write:
            self.off_requested = True
            self.off_if_idle()
            return
        pending = [kml for kml in self.listeners if kml.write_protect_pending()]
        if not pending:
            return  # no page was left unprotected since the last call
        meter = self._meter()
        token = meter.begin(Cause.WRITE_PROTECT_ALL)
        t0 = time.perf_counter_ns()
        try:
            self.kvm.write_protect_all(True)
        except OSError as exc:
            exc.add_note("KVM_WRITE_PROTECT_ALL_MEM(1)")
            raise
        finally:
            dt = time.perf_counter_ns() - t0
            meter.end(Cause.WRITE_PROTECT_ALL, token)
        for kml in pending:
            kml.write_protect_done(dt)

    def off_if_idle(self) -> None:
        """Issue a requested ``KVM_WRITE_PROTECT_ALL_MEM(0)`` once no listener of
        the VM is inside a topology update, and only if no slot logs."""
        if not self.off_requested or any(kml.in_topology_update() for kml in self.listeners):
            return
        self.off_requested = False
        if any(kml.logs_dirty_pages() for kml in self.listeners):
            return  # some slot still logs: its writes rely on the lazy protection
        meter = self._meter()
        token = meter.begin(Cause.WRITE_PROTECT_OFF)
        try:
            self.kvm.write_protect_all(False)
        except OSError as exc:
            exc.add_note("KVM_WRITE_PROTECT_ALL_MEM(0)")
            raise
        finally:
            meter.end(Cause.WRITE_PROTECT_OFF, token)
        for kml in self.listeners:
            kml.write_protect_off_done()
