"""The KVM listener's dirty-log modes: how fetched pages are re-protected.

``DirtyLogMode`` (one per listener, chosen from the VM's capabilities by
:func:`choose_mode`) and ``RegionSyncRule`` (what a per-region sync does in
write-protect-all mode).  The listener (``memory/kvm/_listener.py``) issues
the ioctls; this module holds the rules and the choice.  The fourth mode,
``DIRTY_RING``, is asked for explicitly and has its own module
(``memory/kvm/_dirty_ring.py``).

Three ways to re-protect what was fetched
=========================================

Some facts about KVM dirty logging (see /work/shared/reference/kvm.md): a
page is logged when a write faults on a write-protected mapping; once the
fault made the mapping writable, further writes are silent until something
write-protects the page again.  Hence the one rule every mode obeys:

    fetch -> re-protect -> only then may anyone read the fetched pages.

* **legacy**: ``KVM_GET_DIRTY_LOG`` (flags 0) returns the bits, clears them and
  write-protects those pages through the rmap, all in the one ioctl.  Its cost
  grows with the number of dirty pages.
* **manual protect** (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` with
  ``INITIALLY_SET``): GET only copies.  ``log_clear`` (from
  ``memory_region_clear_dirty_bitmap``, which migration calls per chunk
  *before* sending any page of it) issues ``KVM_CLEAR_DIRTY_LOG`` for **only
  the bits already fetched into ``dirty_bmap``** inside the requested range
  (start aligned down to 64 pages, the padding masked off), then drops them
  from ``dirty_bmap``.  A bit set in the kernel after our GET was never in
  ``dirty_bmap``, so it is never cleared unseen.
* **write-protect-all** (the 2017 series: caps 145 and 146): a *global* sync
  fetches every slot with ``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT`` (bits copied
  and cleared, pages left writable), and the memory core's write-protect-all
  hook - called after every listener fetched every slot and before the sync
  returns - issues one ``KVM_WRITE_PROTECT_ALL_MEM(1)``.  A write landing
  between the fetch and the protection is not in the kernel bitmap, but the
  page is in our snapshot and will be read only after the protection, so it
  is not lost (Paolo's reading of the series).

  ``KVM_WRITE_PROTECT_ALL_MEM(0)`` only clears the enable bit: tables the lazy
  protection has not reached yet are then never protected, so their pages
  stay writable and unlogged.  The draft issued it after every ``log_stop``;
  a display switching VGA logging off mid-migration (or migration ending
  while a display still logs) would lose writes.  Rule kept here: the
  memory core's ``False`` request is deferred until every listener of the VM
  has committed the topology update, and issued only if no slot of any of
  them still logs dirty pages.

  Both requests are per VM, not per listener (``WriteProtectAllHook``): the
  ioctl protects every address space, so one call after the last fetch of
  every listener covers them all, and it must be made if *any* of them
  fetched without protection (x86 QEMU has two KVM listeners, as 0 and the
  SMRAM address space as 1).

Per-region syncs in write-protect-all mode (Paolo's open question)
==================================================================

"How would this work when kvm_physical_sync_dirty_bitmap is called from
memory_region_sync_dirty_bitmap rather than memory_global_dirty_log_sync?"
A display device syncs only its own region (``memory_region_sync_dirty_bitmap``
in 2017, ``memory_region_snapshot_and_clear_dirty`` today), at its refresh
rate, between migration's global syncs.  Nothing calls write-protect-all at
the end of such a sync.  If it fetched with ``WITHOUT_WRITE_PROTECT`` (the
draft's unconditional flag - ``RegionSyncRule.NAIVE``), a page P it fetched
stays writable with its kernel bit cleared, until the next global sync's
write-protect-all - which, outside a migration, never comes.  The display
loses for sure: global sync + WP-all, guest writes P (logged), display sync
(naive: P fetched, drawn, left writable), guest writes P again (silent), the
next refresh does not redraw P.  Migration is saved only by the order of its
consumer: P's bit also went into MIGRATION, and QEMU's consumer reads those
bits only in ``migration_bitmap_sync``, right after a global sync whose
write-protect-all re-protects P, so it reads P after the silent write.  A
consumer that took MIGRATION bits without a global sync of its own (trusting
the display's fetch) would read P, the guest would write it silently, and
the destination would keep the old P.  Rather than depend on that, every
fetch is made safe where it happens.

The rule chosen (``RegionSyncRule.PROTECTING_FETCH``, the default): **a sync that
is not the global sync uses the protecting fetch** - ``KVM_GET_DIRTY_LOG``
with flags 0, so the kernel write-protects through the rmap exactly the pages
it returns.  Every page fetched is protected by the same ioctl, before the
caller can read it, and the cost grows only with that region's dirty pages
(a framebuffer), never with guest size; the O(1) write-protect-all stays
reserved for the global sync where the rmap walk was the expensive part.
The listener tells the two apart by ``MemorySystem.global_sync_in_progress``.

Alternative (``RegionSyncRule.WRITE_PROTECT_ALL``): fetch without protection
and call ``KVM_WRITE_PROTECT_ALL_MEM(1)`` right after the region's slots were
fetched.  Also correct, but every display refresh then write-protects the
whole guest, and every page the guest writes afterwards takes a fault again:
a 60 Hz display would multiply migration's fault rate.  ``NAIVE`` is kept
only so tests can show it loses a page.

Other modes need no special rule: legacy GET always protects; in manual
mode a per-region fetch only copies, and the display's
``memory_region_clear_dirty_bitmap`` re-protects what it consumed.

"""

from __future__ import annotations

import enum

from .._errors import KVMListenerError
from ._backend import KvmVM
from .linux_kvm import (
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
    KVM_CAP_X86_WRITE_PROTECT_ALL_MEM,
    KVM_DIRTY_LOG_MANUAL_CAPS,
)


class DirtyLogMode(enum.Enum):
    """How fetched pages are re-protected (see the module docstring)."""

    LEGACY = "legacy"
    MANUAL_PROTECT = "manual-protect"
    WRITE_PROTECT_ALL = "write-protect-all"
    DIRTY_RING = "dirty-ring"


class RegionSyncRule(enum.Enum):
    """What a per-region sync does in write-protect-all mode."""

    PROTECTING_FETCH = "protecting-fetch"
    WRITE_PROTECT_ALL = "write-protect-all"
    NAIVE = "naive"  # loses pages; for tests only


def choose_mode(kvm: KvmVM, write_protect_all: bool | None, manual_protect: bool | None) -> DirtyLogMode:
    """The mode for a listener without a dirty ring (``kvm_init``'s choice).

    ``None`` means "if the VM supports it" (write-protect-all first); an
    explicit ``True`` the VM cannot provide raises.  Enables
    ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` when manual protect is chosen; a
    failing enable falls back to legacy unless it was asked for, as QEMU does.

    Raises:
        KVMListenerError: both modes requested, or one the VM lacks.
        OSError: an explicitly requested manual-protect enable failed.
    """
    wp_caps = bool(kvm.check_extension(KVM_CAP_X86_WRITE_PROTECT_ALL_MEM)) and bool(
        kvm.check_extension(KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT)
    )
    manual_caps = int(kvm.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) & KVM_DIRTY_LOG_MANUAL_CAPS
    if write_protect_all and manual_protect:
        raise KVMListenerError("write-protect-all and manual protect are exclusive")
    if write_protect_all is None:
        write_protect_all = wp_caps and not manual_protect
    elif write_protect_all and not wp_caps:
        raise KVMListenerError(
            "write-protect-all requested but not supported",
            cap_write_protect_all=KVM_CAP_X86_WRITE_PROTECT_ALL_MEM,
            cap_without_write_protect=KVM_CAP_X86_DIRTY_LOG_WITHOUT_WRITE_PROTECT,
        )
    if write_protect_all:
        return DirtyLogMode.WRITE_PROTECT_ALL
    explicit = manual_protect is True
    if manual_protect is None:
        manual_protect = bool(manual_caps)
    if not manual_protect:
        return DirtyLogMode.LEGACY
    if not manual_caps:
        raise KVMListenerError("manual protect requested but not supported", cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
    try:
        kvm.enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, manual_caps)
    except OSError:
        if explicit:
            raise
        return DirtyLogMode.LEGACY  # QEMU warns and falls back
    return DirtyLogMode.MANUAL_PROTECT
