"""RealVCPUs with several vCPU threads (``--smp N`` on real KVM), in process:
the per-vCPU split of the ab guest, exact vm_stop, halt, throttling,
statistics and the vCPU-count check of a state load."""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory.kvm import kvm_usable
from memory.kvm.real.guests import LAYOUT, check_guests_ram, load_guest_image, vcpu_ranges
from memory.kvm.real.guests._image import IOPB_SIZE, TSS_SIZE, tss_base_limit, vcpu_slot_gpa
from memory.kvm.real.vcpu import RealMachine, VCPUStateError, validate_vcpu_states

from tests.integration.harness import wait_until as _wait_for

pytestmark = pytest.mark.kvm
START = LAYOUT["DATA_START"]


@asynccontextmanager
async def _running(size: int, smp: int = 2):
    """A RealMachine running the ab guest on ``smp`` vCPU threads (started stopped)."""
    with RealMachine("ab", size, log_dirty=False, smp=smp) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            yield m
            nursery.cancel_scope.cancel()


def _bad(m: RealMachine, smp: int) -> list[int]:
    return [check_guests_ram(m.ram.host, a, b).bad for a, b in vcpu_ranges(START, m.ram.used_length, smp)]


# ---------------------------------------------------------------- layout (no KVM needed)

@pytest.mark.parametrize("start,end,n", [(START, START + 4096 * 10, 3), (START, 64 << 20, 2), (START, START + 4096, 1),
                                         (START, START + 4096 * 12, 12)])
def test_vcpu_ranges_split_the_data_range_contiguously(start, end, n):
    r = vcpu_ranges(start, end, n)
    assert len(r) == n and r[0][0] == start and r[-1][1] == end
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
    sizes = [b - a for a, b in r]
    assert all(s % 4096 == 0 and s > 0 for s in sizes) and max(sizes) - min(sizes) <= 4096
    assert sizes == sorted(sizes, reverse=True)


def test_vcpu_ranges_refuses_more_vcpus_than_pages():
    with pytest.raises(ValueError):
        vcpu_ranges(START, START + 4096, 2)


def test_image_gives_each_vcpu_its_tss_stack_and_slot():
    n = LAYOUT["VCPU_MAX"]
    ram = np.zeros(4 << 20, np.uint8)
    entry = load_guest_image(ram, "ab", vcpus=n)
    q = ram.view(np.uint64)
    bitmap = LAYOUT["TSS_GPA"] + TSS_SIZE
    tss_spans, stacks = [], []
    for i in range(n):
        e = entry.for_vcpu(i)
        base, limit = e.segments["tr"].base, e.segments["tr"].limit
        assert (base, limit) == tss_base_limit(i) and e.segments["tr"].selector == LAYOUT["TSS_SEL"]
        iomap = int.from_bytes(ram[base + 102 : base + 104].tobytes(), "little")
        rsp0 = int.from_bytes(ram[base + 4 : base + 12].tobytes(), "little")
        assert base + iomap == bitmap and limit == iomap + IOPB_SIZE  # the one shared bitmap, 0xff byte included
        tss_spans.append((base, base + TSS_SIZE))
        stacks.append(rsp0)
        slot = vcpu_slot_gpa(i) // 8
        assert e.gprs["r15"] == vcpu_slot_gpa(i) and q[slot + LAYOUT["VC_INDEX"] // 8] == i
    spans = sorted(tss_spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # TSSes do not overlap
    assert spans[0][0] >= LAYOUT["IDT_GPA"] + 16 * LAYOUT["IDT_VECTORS"]  # nor the IDT
    assert len(set(stacks)) == n and min(stacks) - LAYOUT["KSTACK_SIZE"] >= bitmap + IOPB_SIZE + 1
    assert vcpu_slot_gpa(n) <= LAYOUT["CTRL_GPA"] + 4096
    ranges = [(int(q[vcpu_slot_gpa(i) // 8]), int(q[vcpu_slot_gpa(i) // 8 + 1])) for i in range(n)]
    assert ranges == vcpu_ranges(START, len(ram), n)
    with pytest.raises(ValueError):
        load_guest_image(ram, "ab", vcpus=n + 1)
    with pytest.raises(ValueError):
        load_guest_image(ram, "selftest", vcpus=2)
    with pytest.raises(ValueError):
        entry.for_vcpu(n)


# ---------------------------------------------------------------- real vCPU threads

async def test_two_vcpus_run_their_shares_and_vm_stop_is_exact(require_kvm):
    async with _running(8 << 20) as m:
        for cycle in range(5):
            at = [m.ctrl.vcpu(i, "pass") for i in range(2)]
            await m.vcpus.vm_start()
            await _wait_for(lambda: all(m.ctrl.vcpu(i, "pass") >= at[i] + 5 for i in range(2)))
            await m.vcpus.vm_stop()
            # once vm_stop returned, neither vCPU writes anything any more
            assert not any(c.in_run for c in m.vcpus._ctls)
            snap = m.ram.host.copy()
            await trio.sleep(0.03)
            assert np.array_equal(snap, m.ram.host), f"a vCPU kept writing after vm_stop (cycle {cycle})"
            assert _bad(m, 2) == [0, 0]
        st = m.vcpus.statistics()
        per = st.vcpus
        assert len(per) == 2 and st.stops == 5
        assert st.passes == sum(v.passes or 0 for v in per) == m.ctrl["pass"]
        for i, ((a, b), v) in enumerate(zip(vcpu_ranges(START, 8 << 20, 2), per)):
            # pages-written (the published count plus the pass in progress read
            # from RAM) against the stopped vCPU's registers: rbx passes done,
            # rdi the next page (the page at rdi may already be written: the
            # stop fell between its store and the add)
            regs = m.vcpus.vcpus[i].get_regs()
            share, pw = (b - a) // 4096, v.pages_written
            assert pw is not None
            assert regs.r15 == vcpu_slot_gpa(i) and a <= regs.rdi <= b and regs.r9 == share
            if regs.rdi < b:
                assert pw - share * (regs.rbx + 1) - (regs.rdi - a) // 4096 in (0, 1), (i, pw, regs.rbx, regs.rdi)
            else:  # the pass's last page is written; rbx counts it or not yet
                assert pw in (share * (regs.rbx + 1), share * (regs.rbx + 2)), (i, pw, regs.rbx)
            assert v.faults["pf_taken"] >= 1 and v.mmu_lock_wait_ns is None
            assert v.exits["intr"] == 5  # each vCPU thread honoured each stop
        # only vCPU 0 prints
        assert per[1].exits.get("io", 0) == 0 and per[0].exits["io"] == st.counters["serial_bytes"]


async def test_statistics_of_running_vcpus_do_not_block(require_kvm):
    """The kernel stats fd is read while both vCPUs sit in KVM_RUN (a vCPU
    ioctl there would wait for vcpu->mutex until the next exit)."""
    async with _running(8 << 20) as m:
        await m.vcpus.vm_start()
        await _wait_for(lambda: m.ctrl["pass"] >= 10)
        def read_all():
            m.vm.statistics()
            return m.vcpus.vcpu_statistics()

        with trio.fail_after(2):  # abandoned on timeout: the stop at teardown unblocks it
            for _ in range(20):
                per = await trio.to_thread.run_sync(read_all, abandon_on_cancel=True)
        assert all(v.faults for v in per)
        await m.vcpus.vm_stop()


async def test_expected_stop_is_the_longest_recent_stop(require_kvm):
    """The downtime prediction's stop term: a default before any stop, then
    the longest of the last STOP_HISTORY measured stops."""
    from memory.kvm.real.vcpu import DEFAULT_STOP_NS, STOP_HISTORY

    async with _running(4 << 20) as m:
        assert m.vcpus.expected_stop_ns() == DEFAULT_STOP_NS
        for _ in range(STOP_HISTORY + 2):
            await m.vcpus.vm_start()
            await m.vcpus.vm_stop()
        recent = list(m.vcpus.stop_ns)
        assert len(recent) == STOP_HISTORY and m.vcpus.expected_stop_ns() == max(recent) > 0


async def test_a_cancelled_vm_stop_still_waits_for_every_vcpu(require_kvm):
    """A caller cancelled at vm_stop's wait (a QMP client dropped mid-``stop``)
    still gets an exact stop: every vCPU thread is out of KVM_RUN and the
    stop is recorded.  Broken variant (the wait cancellable): it returns
    before the threads stopped and records nothing."""
    async with _running(4 << 20) as m:
        await m.vcpus.vm_start()
        await _wait_for(lambda: min(m.ctrl.vcpu(i, "pass") for i in range(2)) >= 1)
        with trio.CancelScope() as cs:
            cs.cancel()
            await m.vcpus.vm_stop()
        assert all(ctl.stopped.is_set() for ctl in m.vcpus._ctls) and len(m.vcpus.stop_ns) == 1
        assert _bad(m, 2) == [0, 0]


async def test_every_vcpu_halts_and_resumes(require_kvm):
    async with _running(4 << 20) as m:
        await m.vcpus.vm_start()
        await _wait_for(lambda: min(m.ctrl.vcpu(i, "pass") for i in range(2)) >= 3)
        m.ctrl["halt_req"] = 1
        await _wait_for(m.vcpus.halted)
        assert m.ctrl["halts"] == 2  # one hlt per vCPU, each on its own kernel stack
        at = [m.ctrl.vcpu(i, "pass") for i in range(2)]
        await trio.sleep(0.05)
        assert [m.ctrl.vcpu(i, "pass") for i in range(2)] == at
        m.ctrl["halt_req"] = 0
        m.vcpus.wake()
        await _wait_for(lambda: all(m.ctrl.vcpu(i, "pass") > at[i] + 2 for i in range(2)))
        await m.vcpus.vm_stop()
        assert _bad(m, 2) == [0, 0]
        assert m.vcpus.statistics().counters["halts"] == 2
        # a vCPU woken from hlt runs guest code again: vm_stop must wait for it
        for _ in range(5):
            m.ctrl["halt_req"] = 1
            await m.vcpus.vm_start()
            await _wait_for(m.vcpus.halted)
            m.ctrl["halt_req"] = 0
            at = [m.ctrl.vcpu(i, "pass") for i in range(2)]
            m.vcpus.wake()
            await _wait_for(lambda: all(m.ctrl.vcpu(i, "pass") > at[i] for i in range(2)))
            await m.vcpus.vm_stop()
            assert not any(c.in_run for c in m.vcpus._ctls), "vm_stop returned with a vCPU in KVM_RUN"
            snap = m.ram.host.copy()
            await trio.sleep(0.01)
            assert np.array_equal(snap, m.ram.host)


async def test_throttle_sleeps_every_vcpu(require_kvm):
    async with _running(4 << 20) as m:
        m.vcpus.set_throttle(50)
        await m.vcpus.vm_start()
        await _wait_for(lambda: all(v.throttle_sleep_ns > 0 for v in m.vcpus.vcpu_statistics()))
        m.vcpus.set_throttle(0)
        await m.vcpus.vm_stop()
        assert _bad(m, 2) == [0, 0]


async def test_state_load_checks_the_vcpu_count_before_touching_a_vcpu(require_kvm):
    async with _running(4 << 20) as src:
        await src.vcpus.vm_start()
        # every vCPU's own passes: CTRL_PASS is their sum, and on a loaded host
        # vCPU 1 can reach 10 passes before vCPU 0's thread first enters
        # KVM_RUN; vCPU 0 then is saved at its entry and prints the 'A' of a
        # fresh start on the destination (the rare "rebooted" flake)
        await _wait_for(lambda: all(src.ctrl.vcpu(i, "pass") >= 10 for i in range(2)))
        await src.vcpus.vm_stop()
        assert src.vcpus.serial_output.count(b"A") == 1
        state = src.vcpus.save_state()
        ram = src.ram.host.copy()
        image = validate_vcpu_states(state)
        assert [r.id for r in image.vcpus] == [0, 1]
        assert image.vcpus[0].regs.r15 != image.vcpus[1].regs.r15  # each vCPU's own control slot
    with RealMachine("ab", 4 << 20, log_dirty=False, load_image=False) as one:
        before = bytes(one.vcpu.get_regs())
        with pytest.raises(VCPUStateError, match=r"2 vCPU\(s\), this VM has 1 \(--smp 1\)"):
            one.vcpus.load_state(state)
        assert bytes(one.vcpu.get_regs()) == before  # nothing was loaded
    with RealMachine("ab", 4 << 20, log_dirty=False, load_image=False, smp=2) as two:
        two.ram.host[:] = ram
        two.vcpus.load_state(state)
        assert [v.get_regs().rip for v in two.vcpus.vcpus] == [r.regs.rip for r in image.vcpus]
        # both vCPUs carry on, each in its own share, from its own pass
        at = [two.ctrl.vcpu(i, "pass") for i in range(2)]
        async with trio.open_nursery() as nursery:
            await nursery.start(two.vcpus.run)
            await two.vcpus.vm_start()
            await _wait_for(lambda: all(two.ctrl.vcpu(i, "pass") >= at[i] + 3 for i in range(2)))
            await two.vcpus.vm_stop()
            nursery.cancel_scope.cancel()
        assert _bad(two, 2) == [0, 0]
        for i, (a, b) in enumerate(vcpu_ranges(START, 4 << 20, 2)):
            p = two.ctrl.vcpu(i, "pass")
            assert check_guests_ram(two.ram.host, a, b).first_value in (p % 256, (p + 1) % 256)
        assert two.vcpus.serial_output.count(b"A") == 0  # resumed, not rebooted
        # a truncated payload is refused before any vCPU is touched
        with pytest.raises(VCPUStateError, match="section"):
            validate_vcpu_states(state[:-10])


def test_machine_refuses_more_vcpus_than_the_guest_layout_has():
    from migrator.engine._machine import AccelConfig, Machine

    with pytest.raises(ValueError, match=f"at most {LAYOUT['VCPU_MAX']} vCPUs"):
        Machine(memory_bytes=8 << 20, accel=AccelConfig(kind="kvm"), workload="ab", smp=LAYOUT["VCPU_MAX"] + 1)


def test_each_vcpu_has_its_own_apic_id_in_cpuid(require_kvm):
    with RealMachine("ab", 4 << 20, log_dirty=False, smp=3) as m:
        for v in m.vcpus.vcpus:
            c = v.get_cpuid2()
            assert [int(x) >> 24 for x in c["ebx"][c["function"] == 1]] == [v.vcpu_id]
            assert all(int(x) == v.vcpu_id for x in c["edx"][(c["function"] == 0xB) | (c["function"] == 0x1F)])


@pytest.fixture(scope="module")
def two_vcpu_state():
    ok, why = kvm_usable()
    if not ok:
        pytest.skip(f"real KVM unusable here: {why}")
    with RealMachine("ab", 2 << 20, log_dirty=False, smp=2) as m:
        return m.vcpus.save_state()  # stopped vCPUs at their entry state


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_state_is_refused_with_a_state_error(two_vcpu_state, data):
    """Any corruption of the blob (byte flips in the header or the payload,
    truncation, junk appended) parses or raises VCPUStateError, never
    another exception."""
    blob = bytearray(two_vcpu_state)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
        if kind == "flip" and blob:
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        elif kind == "truncate":
            del blob[data.draw(st.integers(0, len(blob))):]
        else:
            blob += data.draw(st.binary(max_size=64))
    try:
        image = validate_vcpu_states(bytes(blob))
    except VCPUStateError:
        return
    assert all(isinstance(r.id, int) and isinstance(r.mp_state, int) for r in image.vcpus)
