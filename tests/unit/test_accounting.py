"""The cost-meter hooks against the backend's own statistics.

A small compare-like workload (a guest dirtying pages between global
syncs, then the last-stage sync and log stop) runs on the simulated KVM
through the real KVM listener in every dirty-log mode, with a
``CauseAccounting`` as the memory core's cost meter.  The meter must have
seen every ioctl the backend says it served: per cause, its event count
equals the backend's call counter, and the VMM row's counters (which only
ioctls change) moved only inside metered events.  The broken variant - a
listener whose GET path forgets the meter - must be caught by the same
check.
"""

from __future__ import annotations

import errno

import numpy as np
import pytest

from memory import GLOBAL_DIRTY_MIGRATION, NO_METER, TARGET_PAGE_SIZE as P, Cause, MemorySystem
from memory import KVMListenerError
from memory.kvm import KVMMemoryListener, KvmStatistics, SimKVM, kvm_statistics_dict
from memory.kvm._slot import KVMSlot
from memory.kvm.sim._sim_shm import Params
from migrator.reports._accounting import AccountingSnapshot, CauseAccounting

NPAGES = 256
PROBED = ("sptes_write_protected", "dirty_log_calls", "clear_dirty_log_calls", "write_protect_all_calls",
          "mmu_lock_hold_ns", "mmu_lock_acquisitions", "tlb_flushes")
MODES = {
    "legacy": dict(write_protect_all=False, manual_protect=False),
    "manual-protect": dict(write_protect_all=False, manual_protect=True),
    "write-protect-all": dict(write_protect_all=True),
    "dirty-ring": dict(dirty_ring=True),
}


class ForgetfulListener(KVMMemoryListener):
    """The broken variant: a GET path that does not report to the meter
    (the listener's own statistics still count the call)."""

    def _slot_get_dirty_log(self, mem: KVMSlot, flags: int) -> None:
        assert mem.dirty_bmap is not None
        try:
            self.kvm.get_dirty_log(mem.id, mem.dirty_bmap, flags)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        self._n["get_dirty_log_calls"] += 1


class Run:
    def __init__(self, mode: str, listener_cls: type[KVMMemoryListener] = KVMMemoryListener) -> None:
        ring = mode == "dirty-ring"
        self.kvm = SimKVM(nr_vcpus=1, params=Params(nr_vcpus=1, ring_entries=1024 if ring else 0))
        if ring:
            self.kvm.enable_dirty_ring(1024)
        self.ms = MemorySystem()
        assert self.ms.cost_meter is NO_METER
        self.acct = CauseAccounting(self.kvm.ioctl_statistics, stat_names=PROBED)
        self.ms.cost_meter = self.acct
        self.vmm0 = self.kvm.ioctl_statistics()
        self.kvm0 = self.kvm.statistics()
        self.kml = listener_cls(self.ms, self.kvm, max_slot_size=64 * P, **MODES[mode])
        assert self.kml.mode.value == mode
        self.ms.memory_listener_register(self.kml, self.ms.address_space_memory)
        self.ram = self.ms.memory_region_init_ram("pc.ram", NPAGES * P)
        self.ms.system_memory.add_subregion(0, self.ram)
        self.syncs = 0

    def workload(self) -> None:
        """Bulk stage, three dirty rounds (a different share of RAM each),
        the last-stage sync, log stop."""
        ms, kvm = self.ms, self.kvm
        ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
        kvm.vcpu_write(np.arange(NPAGES, dtype=np.int64))  # the guest maps everything
        for step in (3, 5, 7, 1):
            ms.memory_global_dirty_log_sync()
            self.syncs += 1
            if self.kml.mode.value == "manual-protect":
                ms.memory_region_clear_dirty_bitmap(self.ram, 0, NPAGES * P)  # the sender's chunk clear
            kvm.vcpu_write(np.arange(0, NPAGES, step, dtype=np.int64))
        ms.memory_region_sync_dirty_bitmap(self.ram)  # a display's per-region sync
        ms.memory_global_dirty_log_sync(last_stage=True)
        self.syncs += 1
        ms.memory_global_dirty_log_stop(GLOBAL_DIRTY_MIGRATION)

    def snapshot(self) -> AccountingSnapshot:
        return self.acct.snapshot()


def meter_mismatches(run: Run, snap: AccountingSnapshot) -> list[str]:
    """Where the meter and the backend's own statistics disagree (empty: none)."""
    kvm_d = run.kvm.statistics().delta(run.kvm0)
    vmm_d = run.kvm.ioctl_statistics().delta(run.vmm0)
    lst = run.kml.statistics()
    out = []

    def same(what: str, metered: int, backend: int) -> None:
        if metered != backend:
            out.append(f"{what}: meter {metered} != backend {backend}")

    same("GET_DIRTY_LOG calls", snap[Cause.GET_DIRTY_LOG].calls, kvm_d["dirty_log_calls"])
    same("GET_DIRTY_LOG calls (listener)", snap[Cause.GET_DIRTY_LOG].calls, lst.get_dirty_log_calls)
    same("CLEAR_DIRTY_LOG calls", snap[Cause.CLEAR_DIRTY_LOG].calls, kvm_d["clear_dirty_log_calls"])
    same("CLEAR_DIRTY_LOG pages", snap[Cause.CLEAR_DIRTY_LOG].pages, lst.pages_cleared)
    same("WRITE_PROTECT_ALL(_OFF) calls",
         snap[Cause.WRITE_PROTECT_ALL].calls + snap[Cause.WRITE_PROTECT_OFF].calls, kvm_d["write_protect_all_calls"])
    same("global syncs", sum(1 for s in snap.syncs), run.syncs)
    same("REGION_SYNC events", snap[Cause.REGION_SYNC].calls, lst.region_syncs)
    # Only ioctls change the VMM's row: every change must fall inside a metered event.
    leaves = snap.group(c for c in Cause if c not in (Cause.GLOBAL_SYNC, Cause.FINAL_SYNC, Cause.REGION_SYNC))
    for name in ("sptes_write_protected", "mmu_lock_acquisitions", "tlb_flushes"):
        same(f"VMM {name}", leaves.stat(name), vmm_d[name])
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_meter_sees_every_ioctl_the_backend_served(mode: str) -> None:
    run = Run(mode)
    run.workload()
    snap = run.snapshot()
    assert meter_mismatches(run, snap) == []
    assert snap.unmatched_ends == 0
    # the workload exercised the mode's own path
    syncs = snap.syncs
    assert [s.last_stage for s in syncs] == [False] * (run.syncs - 1) + [True]
    assert snap[Cause.GLOBAL_SYNC].calls == run.syncs - 1 and snap[Cause.FINAL_SYNC].calls == 1
    assert snap[Cause.GLOBAL_SYNC].time_ns > 0 and snap[Cause.SET_MEMORY_REGION].time_ns > 0
    if mode == "dirty-ring":
        assert snap[Cause.GET_DIRTY_LOG].calls == 0
        harvest, reset = snap[Cause.RING_HARVEST], snap[Cause.RING_RESET]
        assert harvest.calls >= run.syncs and harvest.time_ns > 0 and reset.time_ns > 0
        # every entry the vCPU pushed was harvested, and every harvested one reset
        assert harvest.pages == reset.pages == run.kvm.statistics().delta(run.kvm0)["pages_marked_dirty"]
    else:
        get = snap[Cause.GET_DIRTY_LOG]
        assert get.calls >= run.syncs * 4 and get.time_ns > 0 and get.max_time_ns > 0
        # each dirty round's pages came back from the GETs of the sync after it
        dirty = [s.pages for s in syncs]
        per_round = [len(range(0, NPAGES, step)) for step in (3, 5, 7)]
        assert dirty[0] == NPAGES  # the guest wrote everything after log start (manual: INITIALLY_SET too)
        assert dirty[1:4] == per_round
    if mode == "legacy":
        # legacy GET write-protects every page it returns, inside the ioctl
        assert snap[Cause.GET_DIRTY_LOG].stat("sptes_write_protected") >= sum(s.pages for s in syncs[:4])
    if mode == "write-protect-all":
        assert snap[Cause.WRITE_PROTECT_ALL].calls == run.syncs and snap[Cause.WRITE_PROTECT_ALL].time_ns > 0
        # the global syncs' GETs leave pages writable: write-protect-all protects them, in O(1)
        assert all(s.stat("sptes_write_protected") == 0 for s in syncs)
        assert snap[Cause.WRITE_PROTECT_ALL].stat("sptes_write_protected") == 0
    if mode == "manual-protect":
        assert snap[Cause.CLEAR_DIRTY_LOG].calls > 0 and snap[Cause.CLEAR_DIRTY_LOG].time_ns > 0


def test_a_listener_that_skips_the_meter_is_caught() -> None:
    run = Run("legacy", ForgetfulListener)
    run.workload()
    snap = run.snapshot()
    problems = meter_mismatches(run, snap)
    assert snap[Cause.GET_DIRTY_LOG].calls == 0
    assert any(p.startswith("GET_DIRTY_LOG calls: meter 0 != backend") for p in problems), problems
    assert any(p.startswith("VMM sptes_write_protected") for p in problems), problems


def test_meter_nests_syncs_and_survives_unmatched_ends() -> None:
    clock = iter(range(0, 10_000, 10)).__next__
    acct = CauseAccounting(clock=clock)
    t_sync = acct.begin(Cause.GLOBAL_SYNC)
    t_get = acct.begin(Cause.GET_DIRTY_LOG)
    acct.end(Cause.GET_DIRTY_LOG, t_get, 7)
    t_wp = acct.begin(Cause.WRITE_PROTECT_ALL)
    acct.end(Cause.WRITE_PROTECT_ALL, t_wp)
    acct.end(Cause.GLOBAL_SYNC, t_sync)
    acct.end(Cause.VM_STOP, 12345)  # never begun: counted, not raised
    snap = acct.snapshot()
    (sync,) = snap.syncs
    assert (sync.index, sync.last_stage, sync.pages, sync.events) == (1, False, 7, 2)
    assert sync.dirty_log_ns == 20 and sync.time_ns == 50
    assert snap[Cause.GET_DIRTY_LOG].first_begin_ns == 10
    assert snap[Cause.VM_STOP].calls == 0 and snap.unmatched_ends == 1
    with pytest.raises(AttributeError):
        snap.syncs = ()  # type: ignore[misc]  # frozen record: the point of the test
    acct.reset()
    assert acct.snapshot().syncs == () and acct.snapshot()[Cause.GET_DIRTY_LOG].calls == 0


def test_statistics_are_frozen_records_and_json_keeps_its_shape() -> None:
    kvm = SimKVM(nr_vcpus=1)
    st = kvm.statistics()
    assert isinstance(st, KvmStatistics)
    with pytest.raises(TypeError):
        st.counters["faults_fast"] = 1  # type: ignore[index]  # read-only view: the point of the test
    d = kvm_statistics_dict(st)
    assert type(d) is dict and d == dict(st) and set(d) >= {"faults_fast", "dirty_log_calls"}
    assert kvm_statistics_dict({"a": 1}) == {"a": 1}  # a test fake's dict


def test_dirty_ring_listener_needs_a_ring_backend() -> None:
    class NoRing:
        page_size = P

        def check_extension(self, cap: int) -> int:
            return 0

    with pytest.raises(KVMListenerError, match="reap_dirty_rings"):
        KVMMemoryListener(MemorySystem(), NoRing(), dirty_ring=True)  # type: ignore[arg-type]
