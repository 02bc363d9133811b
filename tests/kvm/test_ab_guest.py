"""QEMU's a-b test guest behaviour on real KVM (the ``ab`` program)."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from memory.kvm.real.guests import LAYOUT, check_guests_ram
from memory.kvm.real.vcpu import RealMachine

from tests.integration.harness import wait_until as _wait_for

pytestmark = pytest.mark.kvm
START = LAYOUT["DATA_START"]


def _check(m: RealMachine):
    return check_guests_ram(m.ram.host, START, m.ram.used_length)


async def test_ab_runs_natively_prints_and_keeps_its_invariant(require_kvm, tmp_path):
    serial_file = tmp_path / "serial.log"
    got: list[bytes] = []
    with RealMachine("ab", 8 << 20, log_dirty=False, serial=got.append, serial_path=serial_file) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            assert m.ctrl["pass"] == 0 and not m.vcpus.running
            await m.vcpus.vm_start()
            await _wait_for(lambda: m.ctrl["pass"] >= 200)
            await m.vcpus.vm_stop()
            passes = m.ctrl["pass"]
            out = bytes(m.vcpus.serial_output)
            assert out[:1] == b"A" and set(out[1:]) == {ord("B")}
            assert out.count(b"B") == passes // 64  # one 'B' every 64 passes
            assert b"".join(got) == out
            assert _check(m).bad == 0
            # once vm_stop returned, the guest writes nothing any more
            snap = m.ram.host.copy()
            await trio.sleep(0.05)
            assert np.array_equal(snap, m.ram.host) and m.ctrl["pass"] == passes
            st = m.vcpus.statistics()
            assert st.passes == passes and st.exits["io"] == len(out) and st.stops == 1
            # the guest's work ran natively: one emulated instruction per 'out'
            assert m.vm.statistics()["insn_emulation"] <= st.exits["io"] + 2
            nursery.cancel_scope.cancel()
    assert serial_file.read_bytes() == out


async def test_stop_resume_cycles_are_exact(require_kvm):
    with RealMachine("ab", 8 << 20, log_dirty=False) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            last = 0
            for _ in range(15):
                await m.vcpus.vm_start()
                await _wait_for(lambda: m.ctrl["pass"] > last)
                await m.vcpus.vm_stop()
                r = _check(m)
                assert r.bad == 0, r
                before = m.ram.host[START::4096].copy()
                await trio.sleep(0.002)
                assert np.array_equal(before, m.ram.host[START::4096])
                # the page byte after the stop agrees with the pass counter:
                # pages hold pass or pass+1 (the pass being run)
                assert r.first_value in (m.ctrl["pass"] % 256, (m.ctrl["pass"] + 1) % 256)
                last = m.ctrl["pass"]
            assert m.vcpus.statistics().stops == 15
            nursery.cancel_scope.cancel()


async def test_hlt_through_gp_stub_and_wake(require_kvm):
    with RealMachine("ab", 4 << 20, log_dirty=False) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            await _wait_for(lambda: m.ctrl["pass"] >= 3)
            m.ctrl["halt_req"] = 1
            await _wait_for(m.vcpus.halted)
            halted_at = m.ctrl["pass"]
            r = _check(m)
            assert r.bad == 0 and not r.hit_edge  # halted at a pass boundary: every page equal
            assert r.first_value == halted_at % 256
            assert m.ctrl["halts"] == 1 and m.vcpus.statistics().counters["halts"] == 1
            await trio.sleep(0.02)
            assert m.ctrl["pass"] == halted_at
            m.ctrl["halt_req"] = 0
            m.vcpus.wake()
            await _wait_for(lambda: m.ctrl["pass"] > halted_at + 2)
            await m.vcpus.vm_stop()
            assert _check(m).bad == 0
            nursery.cancel_scope.cancel()


async def test_throttle_makes_the_vcpu_sleep(require_kvm):
    with RealMachine("ab", 4 << 20, log_dirty=False) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            m.vcpus.set_throttle(50)
            await m.vcpus.vm_start()
            await _wait_for(lambda: m.vcpus.statistics().counters.get("throttle_sleep_ns", 0) > 0)
            m.vcpus.set_throttle(0)
            await m.vcpus.vm_stop()
            st = m.vcpus.statistics()
            assert st.exits.get("intr", 0) >= 2  # throttle kicks + the stop
            assert _check(m).bad == 0
            with pytest.raises(ValueError):
                m.vcpus.set_throttle(100)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
async def test_ab_precopy_into_a_local_copy(require_kvm, mode):
    """Pre-copy the running ab guest into a second buffer with each dirty-log
    mode (fetch -> re-protect -> copy), finish with the vCPU stopped: the copy
    equals the source and passes QEMU's check."""
    size = 16 << 20
    # ring: 1024 entries < the 3840 data pages, so the ring fills and the
    # default RING_FULL handler (reap into the VM's stash) is exercised
    with RealMachine("ab", size, dirty_log=mode, ring_size=1024) as m:
        vm = m.vm
        npages = size // 4096
        words = (npages + 63) // 64
        bitmap = np.zeros(words, np.uint64)
        dst = np.zeros((npages, 4096), np.uint8)

        def sync_and_copy():
            if mode == "ring":
                _, offsets, _ = vm.reap_dirty_rings()  # harvest, reset (re-protect), then copy
                idx = np.unique(offsets.astype(np.intp))
            else:
                vm.get_dirty_log(0, bitmap)
                if mode == "clear":
                    vm.clear_dirty_log(0, 0, npages, bitmap)
                idx = np.flatnonzero(np.unpackbits(bitmap.view(np.uint8), bitorder="little", count=npages))
            dst[idx] = m.ram.pages[idx]
            return len(idx)

        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            await _wait_for(lambda: m.ctrl["pass"] >= 2)
            if mode == "bitmap":
                vm.get_dirty_log(0, bitmap)  # start of migration: bulk stage sends everything
            dst[:] = m.ram.pages
            rounds = [sync_and_copy() for _ in range(5) if not await trio.sleep(0.02)]
            await m.vcpus.vm_stop()
            rounds.append(sync_and_copy())
            nursery.cancel_scope.cancel()
        assert all(r > 0 for r in rounds[:-1]), rounds  # the guest kept dirtying while tracked
        assert np.array_equal(dst, m.ram.pages)
        assert check_guests_ram(dst.reshape(-1), START, size).bad == 0
        if mode == "ring":
            assert m.vcpus.statistics().exits.get("dirty_ring_full", 0) > 0
            assert vm.statistics()["ring_full_reaps"] > 0
