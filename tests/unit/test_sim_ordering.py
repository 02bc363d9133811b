"""The dirty-logging ordering rules, proved by exhaustive interleaving.

One guest write fault (``SimKVM.write_fault_steps``) runs against one
migration round (``SimKVM.get_dirty_log_steps`` then userspace copying the
reported pages), under EVERY interleaving of their atomic steps.  Then the
vCPU is stopped and a final sync (GET + copy) runs, as at the end of live
migration.

The invariant, checked at every intermediate state (Marcelo's rule with
Xiao's fault-window amendment and the snapshot of an in-flight GET), for the
written page P::

    writable(P)  =>  dirty(P) or in_snapshot(P) or in_fault_window(P)

* writable(P): the vCPU can store to P without faulting (leaf and upper
  entries writable, no root reload pending);
* dirty(P): P's bit is set in the slot's live dirty bitmap;
* in_snapshot(P): an in-progress GET took P's bit (xchg) and userspace has
  not yet copied the pages of that snapshot;
* in_fault_window(P): during the current fault the vCPU made P's spte
  writable and has not yet set P's dirty bit.

And the end-to-end property: after the final sync, the destination's copy of
P equals the source's (the write was not lost).  With the kernel's order
both always hold; with each reversed order some interleaving breaks both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from memory import RAMBlock
from memory.kvm import SimKVM, UserMemoryRegion
from memory.kvm import linux_kvm as K
from tests.simkit import inspect_spte

NPAGES = 64
PAGE = 5  # the gfn the guest writes (slot at gpa 0)
WWP = K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT

_BLOCK = RAMBlock("ordering", NPAGES * 4096)


@dataclass
class Run:
    """One replayed schedule and what it observed."""

    vm: SimKVM
    dest: np.ndarray
    trace: list = field(default_factory=list)
    violations: list = field(default_factory=list)
    # invariant bookkeeping
    snapshot: set = field(default_factory=set)
    made_writable: bool = False
    marked: bool = False
    refaults: int = 0
    lost: bool = False


def _setup(kind: str) -> tuple[SimKVM, np.ndarray]:
    _BLOCK.host[:] = 0
    vm = SimKVM()
    vm.set_user_memory_region(UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, NPAGES * 4096, _BLOCK.host))
    bm = np.zeros(1, dtype=np.uint64)
    if kind == "fast":
        # P mapped, then protected and clean: the next write is a fast page fault
        vm.vcpu_write(np.array([PAGE]))
        vm.get_dirty_log(0, bm)
        assert not inspect_spte(vm, PAGE).writable and inspect_spte(vm, PAGE).mmu_writable
    elif kind == "map":
        # P never touched, its neighbour mapped (and clean): the write maps
        # P's leaf in tables that exist
        vm.vcpu_write(np.array([PAGE + 1]))
        vm.get_dirty_log(0, bm)
    else:
        # nothing mapped: the fault also creates and links the tables
        assert kind == "map_cold"
    assert not inspect_spte(vm, PAGE).dirty_logged
    # the previous round copied everything
    return vm, _BLOCK.pages.copy()


def _migration(run: Run, protocol: str):
    """The migration thread: one dirty sync, then copy the reported pages."""
    vm = run.vm
    bm = np.zeros(1, dtype=np.uint64)
    flags = 0 if protocol == "legacy" else WWP
    yield from vm.get_dirty_log_steps(0, bm, flags)
    if protocol == "wp_all":  # rule 4: protect all, THEN read the pages
        vm.write_protect_all(True)
        yield "write_protect_all"
    if protocol == "wp_all_broken":  # read the pages before protecting: wrong
        _copy(run, bm)
        yield "copy_pages"
        vm.write_protect_all(True)
        yield "write_protect_all"
        return
    _copy(run, bm)
    yield "copy_pages"


def _copy(run: Run, bm: np.ndarray) -> None:
    pages = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
    run.dest[pages] = _BLOCK.pages[pages]
    run.snapshot.clear()


def _observe(run: Run, actor: str, step) -> None:
    """Update the invariant's bookkeeping after ``step`` and check it."""
    action = getattr(step, "action", step)
    run.trace.append((actor, action))
    if actor == "vcpu":
        if action in ("fast_set_writable", "set_spte"):
            run.made_writable = True
        elif action == "mark_dirty":
            run.marked = True
        elif action == "store_faulted":
            run.refaults += 1
            run.made_writable = run.marked = False  # a new fault begins
    elif action == "xchg":
        run.snapshot.update(step.gfns)
    info = inspect_spte(run.vm, PAGE)
    in_window = run.made_writable and not run.marked
    if info.effectively_writable and not (info.dirty_logged or PAGE in run.snapshot or in_window):
        run.violations.append(list(run.trace))


def _finishes(name: str, action: str, protocol: str) -> bool:
    """Whether ``action`` is the thread's last step (generators end right after it)."""
    if name == "vcpu":
        return action == "store"
    return action == ("write_protect_all" if protocol == "wp_all_broken" else "copy_pages")


def replay(kind: str, order: str, protocol: str, schedule: list[str]) -> tuple[Run, list[str]]:
    """Run ``schedule`` (a list of "vcpu"/"mig"); return the run and who can step next."""
    vm, dest = _setup(kind)
    run = Run(vm, dest)
    threads = {"vcpu": vm.write_fault_steps(PAGE, order=order), "mig": _migration(run, protocol)}
    runnable = {"vcpu", "mig"}
    for name in schedule:
        step = next(threads[name])
        _observe(run, name, step)
        if _finishes(name, getattr(step, "action", step), protocol):
            runnable.discard(name)
    return run, sorted(runnable)


def explore(kind: str, order: str, protocol: str = "legacy") -> list[Run]:
    """Every interleaving, each followed by the vCPU stop and a final sync."""
    finished: list[Run] = []

    def rec(schedule: list[str]) -> None:
        run, runnable = replay(kind, order, protocol, schedule)
        if runnable:
            for name in runnable:
                rec(schedule + [name])
            return
        _final_sync(run)
        finished.append(run)

    rec([])
    return finished


def _final_sync(run: Run) -> None:
    """vCPU stopped (its write retired): GET + copy, then compare P."""
    vm = run.vm
    bm = np.zeros(1, dtype=np.uint64)
    vm.get_dirty_log(0, bm)
    _copy(run, bm)
    run.lost = not np.array_equal(run.dest[PAGE], _BLOCK.pages[PAGE])
    assert _BLOCK.pages[PAGE][0] == 1, "the guest's store must have retired exactly once"


# ---------------------------------------------------------------------------
# the kernel's order: never lost, invariant always holds
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fast", "map", "map_cold"])
def test_kernel_order_never_loses_a_write(kind: str) -> None:
    runs = explore(kind, "spte_first")
    assert len(runs) >= 20, "the enumeration must cover many interleavings"
    assert [r.violations[0] for r in runs if r.violations] == []
    assert [r.trace for r in runs if r.lost] == []
    # the model is not vacuous: in some interleavings GET protects the page
    # between the fault and the store, and the store faults again
    assert any(r.refaults for r in runs)
    # ... and in some the concurrent GET reports the page (the in-snapshot case)
    assert any(("mig", "xchg") in r.trace and r.trace.index(("mig", "xchg")) > r.trace.index(("vcpu", "mark_dirty"))
               for r in runs)


def test_dirty_before_rmap_does_not_matter_to_the_fast_path() -> None:
    # the fast page fault adds nothing to the rmap: only the map kind needs rule 2
    runs = explore("fast", "dirty_before_rmap")
    assert not any(r.lost or r.violations for r in runs)


# ---------------------------------------------------------------------------
# the broken variants must fail
# ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "order"),
    [("fast", "dirty_first"), ("map", "dirty_first"), ("map", "dirty_before_rmap")],
)
def test_reversed_order_loses_a_write(kind: str, order: str) -> None:
    runs = explore(kind, order)
    losing = [r for r in runs if r.lost]
    assert losing, f"{kind}/{order}: no interleaving loses the write, the test cannot tell the orders apart"
    # the invariant catches every losing interleaving before the final sync
    assert all(r.violations for r in losing)
    assert len(losing) < len(runs)  # most interleavings are still fine: it is a race


def test_xiao_2013_first_diagram_replays_to_a_loss() -> None:
    """VCPU: mark_page_dirty; GET: xchg, walk rmap (nothing), ...; VCPU: add
    the spte to the rmap, make it writable, write: nothing logs the write."""
    schedule = ["vcpu"] + ["mig"] * 5 + ["vcpu"] * 3
    run, runnable = replay("map", "dirty_before_rmap", "legacy", schedule)
    assert runnable == []
    assert [a for _, a in run.trace] == [
        "mark_dirty", "xchg", "write_protect", "flush_tlbs", "copy_to_user", "copy_pages",
        "rmap_add", "set_spte", "store",
    ]
    _final_sync(run)
    assert run.lost and run.violations
    # with the kernel's order GET finds the spte in the rmap and protects it:
    # the store faults again, and that fault logs the page
    run, runnable = replay("map", "spte_first", "legacy", ["vcpu"] * 3 + ["mig"] * 5 + ["vcpu"] * 4)
    assert runnable == []
    assert [a for _, a in run.trace][-4:] == ["store_faulted", "fast_set_writable", "mark_dirty", "store"]
    _final_sync(run)
    assert not run.lost and not run.violations


# ---------------------------------------------------------------------------
# the 2017 protocol: GET without write protect, then write-protect-all
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fast", "map"])
def test_write_protect_all_protocol_never_loses_a_write(kind: str) -> None:
    runs = explore(kind, "spte_first", "wp_all")
    assert len(runs) >= 20
    assert not any(r.lost or r.violations for r in runs)
    # some stores had to wait for the root reload + push-down
    assert any(("vcpu", "load_root") in r.trace for r in runs)


@pytest.mark.parametrize("kind", ["fast", "map"])
def test_copying_before_write_protect_all_loses_a_write(kind: str) -> None:
    runs = explore(kind, "spte_first", "wp_all_broken")
    assert any(r.lost for r in runs)
    assert all(r.violations for r in runs if r.lost)


# ---------------------------------------------------------------------------
# rule 6: the push-down, with a second vCPU storing through the same tables
# ---------------------------------------------------------------------------
Q = PAGE + 1  # the other vCPU's page: same leaf table as P


def _setup_push_down() -> tuple[SimKVM, np.ndarray]:
    """P and Q mapped writable and dirty; one round of the 2017 protocol
    (GET without write protect, WP-all, copy the snapshot); both vCPUs then
    reloaded the root (it is protected; nothing below it is yet)."""
    _BLOCK.host[:] = 0
    vm = SimKVM(nr_vcpus=2)
    vm.set_user_memory_region(UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, NPAGES * 4096, _BLOCK.host))
    vm.vcpu_write(np.array([PAGE, Q]))
    bm = np.zeros(1, dtype=np.uint64)
    vm.get_dirty_log(0, bm, WWP)
    vm.write_protect_all(True)
    dest = _BLOCK.pages.copy()  # the snapshot's pages, copied after WP-all
    vm._enter_guest(0, 0)
    vm._enter_guest(1, 0)
    assert inspect_spte(vm, Q).writable and not inspect_spte(vm, Q).effectively_writable
    return vm, dest


def _explore_two_vcpus(order: str) -> list[tuple[list, list, bool]]:
    """Every interleaving of vCPU 0 writing P (``order``) and vCPU 1 writing Q
    (kernel order); at each step, Marcelo's rule for both pages (outside a
    vCPU's own fault window); then a final GET + copy.  Returns
    ``(trace, violations, lost)`` per interleaving."""
    out = []

    def replay(schedule):
        vm, dest = _setup_push_down()
        threads = {
            0: vm.write_fault_steps(PAGE, 0, order=order, value=0x11),
            1: vm.write_fault_steps(Q, 1, value=0x22),
        }
        window = {0: False, 1: False}
        trace, violations, done = [], [], set()
        for v in schedule:
            step = next(threads[v])
            trace.append((v, step.action))
            if step.action in ("fast_set_writable", "set_spte"):
                window[v] = True
            elif step.action in ("mark_dirty", "store_faulted"):
                window[v] = False
            elif step.action == "store":
                done.add(v)
            for v2, page in ((0, PAGE), (1, Q)):
                info = inspect_spte(vm, page)
                if info.effectively_writable and not info.dirty_logged and not window[v2]:
                    violations.append((page, list(trace)))
        return vm, dest, trace, violations, done

    def rec(schedule):
        vm, dest, trace, violations, done = replay(schedule)
        runnable = [v for v in (0, 1) if v not in done]
        if runnable:
            for v in runnable:
                rec(schedule + [v])
            return
        bm = np.zeros(1, dtype=np.uint64)
        vm.get_dirty_log(0, bm)  # vCPUs stopped: the final sync
        pages = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
        dest[pages] = _BLOCK.pages[pages]
        assert (_BLOCK.pages[PAGE][0], _BLOCK.pages[Q][0]) == (0x11, 0x22)
        out.append((trace, violations, not np.array_equal(dest, _BLOCK.pages)))

    rec([])
    return out


def test_push_down_protects_the_child_first_never_loses_a_write() -> None:
    runs = _explore_two_vcpus("spte_first")
    assert len(runs) >= 20
    assert [t for t, v, lost in runs if v or lost] == []
    # not vacuous: vCPU 1 sometimes finds the tables already pushed down by vCPU 0
    assert any(t.count((1, "store")) and not any(v == 1 and a.startswith("push_down") for v, a in t) for t, _, _ in runs)


def test_push_down_making_the_upper_entry_writable_first_loses_a_write() -> None:
    """Rule 6 reversed: between vCPU 0 making the root entry writable and
    loading (protecting) the table below it, vCPU 1's store to Q goes through
    the old generation's writable entries without a fault: nothing logs it."""
    runs = _explore_two_vcpus("upper_first")
    losing = [t for t, _, lost in runs if lost]
    assert losing
    assert all(v for t, v, lost in runs if lost)  # the rule check sees it first
    assert any(t[:3] == [(0, "push_down_upper_l4"), (1, "store"), (0, "load_child_l4")] for t in losing)
