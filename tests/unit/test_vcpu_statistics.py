"""The vCPU controllers' frozen statistics records.

``SimVCPUs.statistics()`` returns a :class:`SimVCPUStatistics` (one
:class:`SimVCPUCounters` per vCPU process): the record is frozen, its
``to_json()`` is exactly what ``x-query-accel-stats`` returns for a running
sim VM, and that JSON is still today's layout: the per-vCPU keys and their
values, checked against the simulated KVM's own per-vCPU counter rows through
the old name table below (the oracle, kept here independent of the product).
"""

from __future__ import annotations

import dataclasses

import pytest
import trio

from memory.kvm import VCPUControllerStatistics, VCPUCounters
from memory.kvm.sim import SimVCPUCounters, SimVCPUStatistics
from migrator.engine._machine import AccelConfig
from migrator.qmp._vm import VM

#: x-query-accel-stats' per-vCPU keys on the simulator, in order, with the
#: simulated KVM counter each one shows (None: not a counter of the row)
SIM_VCPU_JSON = (
    ("cpu-index", None), ("pid", None), ("workload", None), ("pages-written", "pages_written"),
    ("mmu-lock-wait-ns", "mmu_lock_wait_ns"), ("mmu-lock-acquisitions", "mmu_lock_acquisitions"),
    ("faults-fast", "faults_fast"), ("faults-map", "faults_map"), ("faults-push-down", "faults_push_down"),
    ("pml-logged", "pml_logged"), ("fast-pf-cmpxchg-failed", "fast_pf_cas_failed"),
    ("root-reloads", "root_reloads"), ("fault-cost-ns", "fault_cost_ns"), ("store-retries", "store_retries"),
    ("mmio-exits", "mmio_exits"), ("dirty-ring-full-exits", "ring_full_exits"), ("batches", "batches"),
    ("run-ns", "run_ns"), ("throttle-sleep-ns", "throttle_sleep_ns"), ("throttle-pct", None),
)


async def test_sim_record_is_what_x_query_accel_stats_returns():
    vm = VM(memory_bytes=16 << 20, accel=AccelConfig(kind="sim", smp=2), workload="ab", label="stats")
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.qmp_cont()
        with trio.fail_after(30):  # a deadline, not a measurement
            while not all((v.pages_written or 0) > 0 for v in vm.vcpus.statistics().vcpus):
                await trio.sleep(0.01)
        await vm.qmp_stop()  # counters hold still from here
        reply = await vm.qmp_x_query_accel_stats()
        rec = vm.vcpus.statistics()
        kvm = vm.machine.kvm
        rows = [kvm.vcpu_statistics(v) for v in range(2)]  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
    assert isinstance(rec, SimVCPUStatistics)
    assert reply["vcpus"] == rec.to_json() == [v.to_json() for v in rec.vcpus]
    assert "vcpu-controller" not in reply  # the simulator reports only its vCPUs
    for v, (obj, row) in enumerate(zip(reply["vcpus"], rows, strict=True)):
        assert list(obj) == [k for k, _ in SIM_VCPU_JSON]
        assert {k: obj[k] for k, name in SIM_VCPU_JSON if name} == {k: row[name] for k, name in SIM_VCPU_JSON if name}
        assert obj["cpu-index"] == v and obj["workload"] == "ab" and obj["pid"] > 0 and obj["throttle-pct"] == 0
    # the typed fields and the totals agree with the JSON
    assert rec.pages_written == sum(o["pages-written"] for o in reply["vcpus"]) > 0
    assert rec.run_ns == sum(o["run-ns"] for o in reply["vcpus"])
    assert [v.faults["map"] for v in rec.vcpus] == [o["faults-map"] for o in reply["vcpus"]]


def test_records_are_frozen():
    v = SimVCPUCounters(index=0, pages_written=3, run_ns=5, mmu_lock_wait_ns=0, workload="fill",
                        faults={"fast": 1, "map": 2, "push_down": 0}, exits={"mmio": 0, "dirty_ring_full": 0},
                        counters={"batches": 1})
    rec = SimVCPUStatistics(vcpus=(v,), counters={"stop_ns_last": 7})
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.pages_written = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.vcpus = ()  # type: ignore[misc]
    for mapping in (v.faults, v.exits, v.counters, rec.counters, rec.exits):
        with pytest.raises(TypeError):
            mapping["x"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):  # slots: no stray attributes either
        object.__setattr__(v, "extra", 1)


def test_record_copies_what_it_is_given():
    faults = {"fast": 1}
    vcpus = [VCPUCounters(index=0, pages_written=1, faults=faults)]
    rec = VCPUControllerStatistics(vcpus=vcpus)  # type: ignore[arg-type]  # a list, as a careless caller might
    faults["fast"] = 99
    vcpus.append(VCPUCounters(index=1, pages_written=None))
    assert rec.vcpus[0].faults["fast"] == 1 and len(rec.vcpus) == 1 and isinstance(rec.vcpus, tuple)


@pytest.mark.parametrize("written, total", [((1, 2), 3), ((1, None), None), ((), 0)])
def test_totals_are_none_when_a_vcpu_does_not_count(written, total):
    rec = VCPUControllerStatistics(vcpus=tuple(VCPUCounters(index=i, pages_written=w) for i, w in enumerate(written)))
    assert rec.pages_written == total


def test_neutral_layout_for_other_controllers():
    """A controller without its own layout (a test fake) still gives JSON
    with its totals beside the vCPUs."""
    rec = VCPUControllerStatistics(vcpus=(VCPUCounters(index=0, pages_written=None, counters={"guest_entries": 2}),),
                                   throttle_pct=20, counters={"stops": 1}, exits={"io": 3})
    assert rec.stops == 1
    assert rec.to_json() == {"stops": 1, "exits": {"io": 3}, "throttle_pct": 20, "smp": 1, "vcpus": [{
        "cpu-index": 0, "pages-written": None, "run-ns": None, "mmu-lock-wait-ns": None, "throttle-sleep-ns": 0,
        "faults": {}, "exits": {}, "guest-entries": 2}]}
