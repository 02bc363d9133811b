"""RealVCPUs' frozen statistics record against x-query-accel-stats, on real
KVM, in process: ``vcpus`` is each :class:`KvmVCPUCounters`' ``to_json()``
and ``vcpu-controller`` the totals, in today's layout."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from memory.kvm.real import KvmVCPUStatistics
from migrator.engine._machine import AccelConfig
from migrator.qmp._vm import VM

pytestmark = pytest.mark.kvm

#: today's per-vCPU keys of x-query-accel-stats on real KVM, in order
KVM_VCPU_KEYS = ["cpu-index", "pages-written", "passes", "faults", "mmu-lock-wait-ns", "exits", "kvm-exits",
                 "throttle-sleep-ns", "halted"]


async def test_kvm_record_is_what_x_query_accel_stats_returns(require_kvm):
    vm = VM(memory_bytes=16 << 20, accel=AccelConfig(kind="kvm"), workload="ab", label="stats", smp=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.run)
        await vm.qmp_cont()
        with trio.fail_after(30):  # a deadline, not a measurement
            while not all((v.pages_written or 0) > 0 for v in vm.vcpus.statistics().vcpus):
                await trio.sleep(0.01)
        await vm.qmp_stop()
        reply = await vm.qmp_x_query_accel_stats()
        rec = vm.vcpus.statistics()
        nursery.cancel_scope.cancel()
    assert isinstance(rec, KvmVCPUStatistics)
    assert reply["vcpus"] == [v.to_json() for v in rec.vcpus]
    assert reply["vcpu-controller"] == rec.controller_json()
    assert rec.to_json() == {**reply["vcpu-controller"], "vcpus": reply["vcpus"]}
    for i, obj in enumerate(reply["vcpus"]):
        assert list(obj) == KVM_VCPU_KEYS
        assert obj["cpu-index"] == i and obj["pages-written"] > 0 and obj["mmu-lock-wait-ns"] is None
        assert obj["faults"]["pf_taken"] >= 1 and obj["halted"] is False
    ctl = reply["vcpu-controller"]
    assert {"stops", "stop_ns_total", "stop_ns_max", "stop_ns_last", "exits", "exits_total", "serial_bytes",
            "msr_rejected", "throttle_pct", "smp", "passes"} <= set(ctl)
    assert ctl["smp"] == 2 and ctl["stops"] == rec.stops >= 1 and ctl["exits_total"] == sum(ctl["exits"].values())
    assert rec.pages_written == sum(o["pages-written"] for o in reply["vcpus"]) and rec.run_ns is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        rec.vcpus[0].halted = True  # type: ignore[misc]
