"""The kernel's KVM dirty_log_test, ported to the ``selftest`` guest and
:class:`RealVCPUs` (tools/testing/selftests/kvm/dirty_log_test.c; our own
code, same verification rules).  Test-only: tests/kvm/test_dirty_log_selftest.py
runs it against /dev/kvm.

Layout: slot 0 maps [0, 1 MiB) (page tables, code; not logged), slot
``TEST_SLOT`` = 1 maps the test range [1 MiB, 1 MiB + test size) with
``KVM_MEM_LOG_DIRTY_PAGES``.  The guest first writes the iteration into
every test page, then loops: ``per_loop`` writes of the current iteration
(re-read for every store) into pseudo-random pages, then GUEST_SYNC.

Host loop (``run_test``): sleep ``interval``; collect the dirty pages *while
the vCPU runs* (bitmap: GET_DIRTY_LOG; clear: GET then CLEAR of exactly the
fetched bits; ring: harvest + reset); then stop the vCPU at its next
GUEST_SYNC (never with a kick: a kicked vCPU may have its dirty bit set and
the store not yet done), verify, bump the iteration, let the vCPU go on.

Verification (``vm_dirty_log_verify``), for every page of the test range:

* a page tracked in the previous round must be dirty in this one;
* a dirty page holds ``iteration`` or ``iteration - 1`` (dirty ring: one
  page per round may hold ``iteration - 2``, and the last harvested page is
  exempt: ring-full exits publish the gfn before the store retires);
* a clean page holds at most ``iteration``; if it holds exactly
  ``iteration`` it was written after the collection and must be reported by
  the next one (tracked).

On top of the kernel test, a destination copy model checks the ordering rule
of migration: after each collection the pages are "sent" (copied), and at
verification every page whose content differs from its copy must be
reported next round.  ``broken`` selects a wrong variant to show the checks
catch it: ``"clear_all_ones"`` (CLEAR every bit, not only the fetched ones),
``"copy_before_protect"`` (copy pages before CLEAR / ring reset).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import trio

from memory import RAMBlock
from memory.kvm import linux_kvm as K
from memory.kvm import UserMemoryRegion
from memory.kvm.real import RealKVM, RealVCPU, RealVCPUs
from memory.kvm.real.guests import LAYOUT, Ctrl, HostRAM, load_guest_image

TEST_SLOT = 1
MODES = ("bitmap", "clear", "ring")
BROKEN = (None, "clear_all_ones", "copy_before_protect")


@dataclass
class SelftestReport:
    mode: str
    broken: str | None
    iterations: int = 0
    dirty_count: int = 0  # host_dirty_count
    clear_count: int = 0  # host_clear_count
    track_next_count: int = 0  # host_track_next_count
    #: tracked pages (written after a collection) missing from the next one
    missing_tracked: int = 0
    #: dirty pages holding a value other than iteration / iteration-1
    bad_set_values: int = 0
    #: clean pages holding a value above iteration
    bad_clear_values: int = 0
    #: copy model: pages differing from their copy and not reported next round
    missing_copies: int = 0
    ring_reset_mismatch: int = 0
    ring_full_exits: int = 0
    guest_writes: int = 0
    collect_ns: list[int] = field(default_factory=list)
    dirty_per_round: list[int] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def violations(self) -> int:
        return (self.missing_tracked + self.bad_set_values + self.bad_clear_values + self.missing_copies
                + self.ring_reset_mismatch)

    def note(self, msg: str) -> None:
        if len(self.first_errors) < 10:
            self.first_errors.append(msg)


class _SyncStop:
    """``vcpu_sync_stop_requested`` + ``sem_vcpu_stop`` / ``sem_vcpu_cont``."""

    def __init__(self) -> None:
        self.requested = False
        self.quit = False
        self.stopped = threading.Event()
        self.cont = threading.Event()

    def at_sync(self, vcpu_id: int, data: bytes) -> None:  # vCPU thread, at GUEST_SYNC
        if self.requested:
            self.requested = False
            self.stopped.set()
            self.cont.wait()
            self.cont.clear()


async def run_dirty_log_selftest(
    mode: str = "bitmap",
    *,
    iterations: int = 24,
    interval_s: float = 0.010,
    test_bytes: int = 64 << 20,
    per_loop: int = 256,
    ring_size: int = 1024,
    broken: str | None = None,
    clear_delay_s: float = 0.0,
    seed: int = 0x2545F4914F6CDD1D,
) -> SelftestReport:
    if mode not in MODES or broken not in BROKEN:
        raise ValueError(f"mode {mode!r} / broken {broken!r}")
    if broken == "clear_all_ones" and mode != "clear":
        raise ValueError("clear_all_ones only applies to the clear mode")

    low = LAYOUT["DATA_START"]
    ram = RAMBlock("selftest.ram", low + test_bytes)
    vm = RealKVM()
    rep = SelftestReport(mode, broken)
    t_start = time.perf_counter()
    try:
        if mode == "ring":
            vm.enable_dirty_ring(ring_size)
        elif mode == "clear":
            caps = vm.check_extension(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & K.KVM_DIRTY_LOG_MANUAL_CAPS
            vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, caps)
        entry = load_guest_image(ram, "selftest", iteration=1, per_loop=per_loop, rng=seed)
        vm.set_user_memory_region(UserMemoryRegion(0, 0, 0, low, ram.host[:low]))
        vm.set_user_memory_region(UserMemoryRegion(TEST_SLOT, K.KVM_MEM_LOG_DIRTY_PAGES, low, test_bytes,
                                                   ram.host[low:]))
        vcpu = RealVCPU(vm, 0)
        vcpu.apply_entry(entry)
        await _run(vm, vcpu, ram, rep, iterations=iterations, interval_s=interval_s,
                   test_bytes=test_bytes, clear_delay_s=clear_delay_s)
    finally:
        rep.elapsed_s = time.perf_counter() - t_start
        vm.close()
        ram.close()
    return rep


async def _run(vm: RealKVM, vcpu: RealVCPU, ram: HostRAM, rep: SelftestReport, *, iterations: int, interval_s: float,
               test_bytes: int, clear_delay_s: float) -> None:
    mode, broken = rep.mode, rep.broken
    low = LAYOUT["DATA_START"]
    npages = test_bytes // 4096
    words = (npages + 63) // 64
    vals = ram.host[low:].view(np.uint64).reshape(npages, 512)[:, 0]  # first u64 of every test page
    ctrl = Ctrl(ram)
    sync = _SyncStop()
    track = np.zeros(npages, dtype=bool)  # host_bmap_track
    copy_track = np.zeros(npages, dtype=bool)
    dst = np.zeros(npages, dtype=np.uint64)  # the destination's copy of each page's value
    bitmap = np.zeros(words, dtype=np.uint64)
    ring_acc = np.zeros(npages, dtype=bool)  # entries reaped on ring-full, for the next collection
    last_ring_page = -1
    min_iter = 0

    def ring_pages(slots: npt.NDArray[np.uint32], offsets: npt.NDArray[np.uint64]) -> npt.NDArray[np.intp]:
        bad = (slots != TEST_SLOT) | (offsets >= npages)
        if bad.any():
            rep.note(f"ring entry outside the test slot: slot {slots[bad][0]} offset {offsets[bad][0]}")
            rep.ring_reset_mismatch += int(bad.sum())
        kept: npt.NDArray[np.intp] = offsets[~bad].astype(np.intp)
        return kept

    def on_ring_full(vcpu_id: int) -> None:  # vCPU thread: reap so the guest can go on
        nonlocal last_ring_page
        rep.ring_full_exits += 1
        with vm.ring_lock:
            slots, offsets = vm._harvest_locked()
            pages = ring_pages(slots, offsets)
            if broken == "copy_before_protect":
                dst[pages] = vals[pages]
            n = vm.reset_dirty_rings()
            if n != len(offsets):
                rep.ring_reset_mismatch += 1
                rep.note(f"ring-full reset {n} != harvested {len(offsets)}")
            if broken != "copy_before_protect":
                dst[pages] = vals[pages]
            ring_acc[pages] = True
            if len(pages):
                last_ring_page = int(pages[-1])

    def collect() -> np.ndarray:
        """One collection, vCPU running; returns the dirty pages as bools and
        'sends' them (dst copy) in the order the mode requires."""
        nonlocal last_ring_page
        t0 = time.perf_counter_ns()
        if mode == "bitmap":
            vm.get_dirty_log(TEST_SLOT, bitmap)  # fetch + write-protect, atomically
            dirty = np.unpackbits(bitmap.view(np.uint8), bitorder="little", count=npages).astype(bool)
            idx = np.flatnonzero(dirty)
            dst[idx] = vals[idx]
        elif mode == "clear":
            vm.get_dirty_log(TEST_SLOT, bitmap)  # fetch only
            dirty = np.unpackbits(bitmap.view(np.uint8), bitorder="little", count=npages).astype(bool)
            idx = np.flatnonzero(dirty)
            if broken == "copy_before_protect":
                dst[idx] = vals[idx]
            if clear_delay_s:
                time.sleep(clear_delay_s)  # a slow path between GET and CLEAR widens the race
            if broken == "clear_all_ones":
                vm.clear_dirty_log(TEST_SLOT, 0, npages, np.full(words, ~np.uint64(0)))
            else:
                vm.clear_dirty_log(TEST_SLOT, 0, npages, bitmap)  # only the bits we fetched
            if broken != "copy_before_protect":
                dst[idx] = vals[idx]  # copy AFTER the clear
        else:
            with vm.ring_lock:
                slots, offsets = vm._harvest_locked()
                pages = ring_pages(slots, offsets)
                if broken == "copy_before_protect":
                    dst[pages] = vals[pages]
                if clear_delay_s:
                    time.sleep(clear_delay_s)
                n = vm.reset_dirty_rings()
                if n != len(offsets):
                    rep.ring_reset_mismatch += 1
                    rep.note(f"reset {n} != harvested {len(offsets)}")
                if broken != "copy_before_protect":
                    dst[pages] = vals[pages]  # copy AFTER the reset
                dirty = ring_acc.copy()
                ring_acc[:] = False
                dirty[pages] = True
                if len(pages):
                    last_ring_page = int(pages[-1])
        rep.collect_ns.append(time.perf_counter_ns() - t0)
        return dirty

    def verify(dirty: np.ndarray, iteration: int) -> None:
        nonlocal min_iter
        v = vals.copy()
        # 1. pages written after the previous collection must be reported now
        missing = track & ~dirty
        rep.track_next_count += int(track.sum())
        if missing.any():
            rep.missing_tracked += int(missing.sum())
            rep.note(f"iteration {iteration}: page {int(np.flatnonzero(missing)[0])} should have its dirty bit set")
        missing = copy_track & ~dirty
        if missing.any():
            rep.missing_copies += int(missing.sum())
            rep.note(f"iteration {iteration}: page {int(np.flatnonzero(missing)[0])} differs from its copy and "
                     "was not reported")
        track[:] = False
        # 2. dirty pages hold iteration or iteration - 1
        rep.dirty_count += int(dirty.sum())
        rep.dirty_per_round.append(int(dirty.sum()))
        bad = dirty & (v != iteration) & (v != iteration - 1)
        if mode == "ring" and bad.any():
            if 0 <= last_ring_page < npages:
                bad[last_ring_page] = False
            older = np.flatnonzero(bad & (v == iteration - 2))
            if len(older) and min_iter <= iteration - 2:
                bad[older[0]] = False  # once per round, see the selftest's long comment
                min_iter = iteration - 1
        if bad.any():
            rep.bad_set_values += int(bad.sum())
            p = int(np.flatnonzero(bad)[0])
            rep.note(f"iteration {iteration}: dirty page {p} holds {int(v[p])}")
        # 3. clean pages hold at most iteration; == iteration -> must be reported next time
        clean = ~dirty
        rep.clear_count += int(clean.sum())
        too_new = clean & (v > iteration)
        if too_new.any():
            rep.bad_clear_values += int(too_new.sum())
            rep.note(f"iteration {iteration}: clean page {int(np.flatnonzero(too_new)[0])} holds a future value")
        track[clean & (v == iteration)] = True
        # copy model: anything the destination does not have must come next round
        copy_track[:] = dst != v

    vcpus = RealVCPUs([vcpu], program="selftest", ram=ram, on_ring_full=on_ring_full,
                      io_handlers={LAYOUT["PORT_SYNC"]: sync.at_sync})
    async with trio.open_nursery() as nursery:
        await nursery.start(vcpus.run)
        iteration = 1
        ctrl["iteration"] = iteration
        await vcpus.vm_start()
        while iteration < iterations:
            await trio.sleep(interval_s)
            dirty = collect()
            sync.requested = True
            await trio.to_thread.run_sync(sync.stopped.wait, abandon_on_cancel=True)
            sync.stopped.clear()
            verify(dirty, iteration)
            iteration += 1
            rep.iterations = iteration
            if iteration == iterations:
                sync.quit = True
            sync.cont.set()
            ctrl["iteration"] = iteration
        await vcpus.vm_stop()
        rep.guest_writes = ctrl["syncs"] * ctrl["per_loop"]
        nursery.cancel_scope.cancel()
