"""``--smp 2`` on real KVM: live migration of a running two-vCPU ``ab`` guest
between two ``migrator run --accel kvm --smp 2`` processes, and the
destination refusing the state of another vCPU count.

The ab guest splits its data range per vCPU (``vcpu_ranges``); QEMU's
``check_guests_ram`` holds within each vCPU's share, not across shares (two
vCPUs are at different passes), so every check here is per share.  "Every
vCPU's state resumed" is shown by each share: after ``cont`` on the
destination every vCPU's pass counter and page-write counter (guest RAM)
keep growing from the source's values and its share keeps 0 bad pages, which
only holds if each vCPU restarted with its own registers (r15 = its control
slot, rdi inside its own share, rbx its pass count).
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from memory.kvm import kvm_usable
from memory.kvm.real.guests import LAYOUT, ab_pages_written, check_guests_ram, vcpu_ranges
from memory.kvm.real.guests._image import vcpu_slot_gpa

from tests.integration.harness import free_port, migrate_live_then_converge, pmem, vm_process, wait_serial

_ok, _why = kvm_usable()
pytestmark = [pytest.mark.skipif(not _ok, reason=f"real KVM unusable: {_why}"),
              pytest.mark.trio_timeout(90)]

MiB = 1 << 20
MEM = 64 * MiB
SMP = 2
RANGES = vcpu_ranges(LAYOUT["DATA_START"], MEM, SMP)


def _bad_per_vcpu(ram: bytes) -> list[int]:
    view = np.frombuffer(ram, np.uint8)
    return [check_guests_ram(view, a, b).bad for a, b in RANGES]


def _slot(ram: bytes, index: int, field: str) -> int:
    off = vcpu_slot_gpa(index) + LAYOUT["VC_" + field.upper()]
    return int.from_bytes(ram[off : off + 8], "little")


def _pages_written(ram: bytes) -> list[int]:
    view = np.frombuffer(ram, np.uint8)
    return [ab_pages_written(view, a, b, _slot(ram, i, "writes")) for i, (a, b) in enumerate(RANGES)]


def _uri(kind: str, tmp_path) -> str:
    return f"tcp:127.0.0.1:{free_port()}" if kind == "tcp" else f"unix:{tmp_path / 'mig.sock'}"


@pytest.mark.parametrize("mode,transport", [("bitmap", "tcp"), ("ring", "unix"), ("clear", "unix")])
async def test_smp2_live_migration_resumes_every_vcpu(tmp_path, mode, transport):
    accel = f"kvm,dirty-log={mode}" + (",dirty-ring-size=1024" if mode == "ring" else "")
    uri = _uri(transport, tmp_path)
    serial = tmp_path / "src.serial"
    smp = ("--smp", str(SMP))
    async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", *smp, memory="64M", accel=accel) as dst, \
            vm_process(tmp_path, "src", "--serial", f"file:{serial}", *smp, memory="64M", accel=accel,
                       workload="ab") as src:
        await wait_serial(serial, timeout=30)
        with trio.fail_after(30):  # and every vCPU through a few passes of its share
            while True:
                stats = await src.qmp.execute("x-query-accel-stats")
                if min(v["passes"] for v in stats["vcpus"]) >= 3:
                    break
                await trio.sleep(0.02)
        vcpus = stats["vcpus"]
        assert [v["cpu-index"] for v in vcpus] == list(range(SMP))
        for v in vcpus:
            assert v["pages-written"] > 0 and v["passes"] > 0 and v["mmu-lock-wait-ns"] is None
            assert {"pf_taken", "pf_fixed", "pf_fast", "pf_spurious", "pf_emulate"} <= set(v["faults"])
        assert stats["vcpu-controller"]["smp"] == SMP
        info = await migrate_live_then_converge(src, uri, trickle=4_000_000, timeout=60)
        assert info["status"] == "completed", (info, src.log())
        assert info["ram"]["dirty-sync-count"] >= 2
        dinfo = await dst.qmp.wait_migration()
        assert dinfo["status"] == "completed", dst.log()
        a = await pmem(src, tmp_path, MEM, "src.ram")
        b = await pmem(dst, tmp_path, MEM, "dst.ram")
        assert a == b
        assert _bad_per_vcpu(b) == [0] * SMP
        passes = [_slot(b, i, "pass") for i in range(SMP)]
        written = _pages_written(b)
        assert all(p > 0 for p in passes)
        # every vCPU resumes on the destination from where it stopped
        await dst.qmp.execute("cont")
        await trio.sleep(0.5)
        await dst.qmp.execute("stop")
        c = await pmem(dst, tmp_path, MEM, "dst2.ram")
        assert _bad_per_vcpu(c) == [0] * SMP
        view_b, view_c = np.frombuffer(b, np.uint8), np.frombuffer(c, np.uint8)
        for i, (lo, hi) in enumerate(RANGES):
            assert not np.array_equal(view_b[lo:hi:4096], view_c[lo:hi:4096]), f"vCPU {i}'s share did not change"
            assert _slot(c, i, "pass") > passes[i], i
            # resumed, not restarted: a restart would re-zero the share, its pages
            # would count the passes since the restart, not VC_PASS
            p = _slot(c, i, "pass")
            assert check_guests_ram(view_c, lo, hi).first_value in (p % 256, (p + 1) % 256), (i, p)
        dstats = await dst.qmp.execute("x-query-accel-stats")
        # the guest's page-write count continues from the source's (it lives in guest RAM and registers)
        assert [v["pages-written"] for v in dstats["vcpus"]] == _pages_written(c)
        assert all(x > y for x, y in zip(_pages_written(c), written)), (written, _pages_written(c))
        assert all(v["exits"].get("intr", 0) >= 1 for v in dstats["vcpus"])  # each vCPU thread ran and stopped
        history = await src.qmp.execute("x-query-migration-history")
        assert history["status"] == "completed" and history["setup"]["smp"] == SMP


async def test_vcpu_count_mismatch_fails_the_destination_and_the_source_runs_on(tmp_path):
    uri = _uri("unix", tmp_path)
    accel = "kvm,dirty-log=bitmap"
    async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", "--smp", "1", memory="64M", accel=accel) as dst, \
            vm_process(tmp_path, "src", "--smp", str(SMP), memory="64M", accel=accel, workload="ab") as src:
        await trio.sleep(0.2)
        # converge at once (the failure comes at the end, when the vCPU state is loaded)
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1_000_000_000, "downtime-limit": 30000})
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration(timeout=60)
        assert info["status"] == "failed", info
        dinfo = await dst.qmp.wait_migration()
        assert dinfo["status"] == "failed"
        assert "2 vCPU(s)" in dinfo["error-desc"] and "--smp 2" in dinfo["error-desc"], dinfo
        assert (await dst.qmp.execute("query-status"))["running"] is False
        # the source keeps running, every vCPU's share intact and changing
        st = await src.qmp.execute("query-status")
        assert st["running"] is True and st["status"] == "running", st
        r1 = await pmem(src, tmp_path, MEM, "r1")
        await trio.sleep(0.3)
        await src.qmp.execute("stop")
        r2 = await pmem(src, tmp_path, MEM, "r2")
        assert _bad_per_vcpu(r2) == [0] * SMP
        assert all(_slot(r2, i, "pass") > _slot(r1, i, "pass") for i in range(SMP))
