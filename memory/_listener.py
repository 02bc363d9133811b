"""``MemoryListener``: the callbacks the memory core drives (include/system/memory.h).

Every hook is a no-op here; a listener overrides the ones it implements.  The
memory core treats a hook as *present* only when a subclass (or the instance)
overrides it, exactly as QEMU tests the function pointer for NULL.  This
matters for three hooks:

* ``log_sync`` vs ``log_sync_global``: a listener has one or the other, never
  both (asserted at registration).  ``log_sync`` is called per logged
  FlatRange; ``log_sync_global`` once per sync, even for a per-region request.
* ``log_clear``: ``memory_region_clear_dirty_bitmap`` only visits listeners
  that implement it.

A listener that chooses at run time (the KVM listener: ``log_sync_global``
with a dirty ring, ``log_sync``/``log_clear`` without) overrides all of them
and names the ones it does not provide in :meth:`MemoryListener.absent_hooks`.

Ordering (system/memory.c): listeners sit in one global list and one list per
address space, sorted by ``priority`` (stable: equal priorities keep
registration order).  ``begin``/``commit``/``region_add``/``log_start``/
``log_global_start``/``log_sync`` run forward (low priority first);
``region_del``/``log_stop``/``log_global_stop`` run in reverse.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._region import AddressSpace, MemoryRegionSection


class MemoryListener:
    """Base class: all callbacks are no-ops.

    Attributes:
        priority: ordering key (KVM uses 10).
        name: for diagnostics.
        address_space: set while registered.
    """

    priority: int = 0
    name: str = "listener"

    def __init__(self) -> None:
        self.address_space: AddressSpace | None = None

    def absent_hooks(self) -> frozenset[str]:
        """Hooks this listener overrides but does not provide (NULL in QEMU)."""
        return frozenset()

    # -- topology -------------------------------------------------------------
    def begin(self) -> None:
        """A topology update (or replay) starts."""

    def commit(self) -> None:
        """The topology update is complete."""

    def region_add(self, section: MemoryRegionSection) -> None:
        """A FlatRange appeared (or its attributes changed)."""

    def region_del(self, section: MemoryRegionSection) -> None:
        """A FlatRange disappeared (or its attributes changed)."""

    def region_nop(self, section: MemoryRegionSection) -> None:
        """A FlatRange is unchanged (its dirty log mask may have changed)."""

    # -- dirty logging ------------------------------------------------------------
    def log_start(self, section: MemoryRegionSection, old: int, new: int) -> None:
        """The range's client mask gained clients (``old`` -> ``new``)."""

    def log_stop(self, section: MemoryRegionSection, old: int, new: int) -> None:
        """The range's client mask lost clients (``old`` -> ``new``)."""

    def log_sync(self, section: MemoryRegionSection) -> None:
        """Fetch dirty bits of a logged range into the dirty-memory clients."""

    def log_sync_global(self, last_stage: bool) -> None:
        """Fetch every dirty bit (replaces ``log_sync``, e.g. the dirty ring)."""

    def log_clear(self, section: MemoryRegionSection) -> None:
        """Clear (and re-protect) the fetched bits of a range."""

    def log_global_start(self) -> bool:
        """The first global dirty flag was set.  Return False (or raise) to veto."""
        return True

    def log_global_stop(self) -> None:
        """The last global dirty flag was cleared."""

    def log_global_after_sync(self) -> None:
        """The dirty bitmap was read after a sync."""


def listener_implements(listener: MemoryListener, hook: str) -> bool:
    """Whether ``listener`` overrides ``hook`` (QEMU: the pointer is non-NULL).

    A hook named by ``listener.absent_hooks()`` is absent.  An instance
    attribute overrides the class: a callable enables the hook, ``None``
    disables it.
    """
    if hook in listener.absent_hooks():
        return False
    if hook in vars(listener):
        return vars(listener)[hook] is not None
    return getattr(type(listener), hook) is not getattr(MemoryListener, hook)
