"""The shared-memory simulated KVM's machinery, one piece at a time: the
layout seen from two mappings, the atomics, and the handshakes the vCPU
processes rely on (TLB flush waits for guest-mode exit, synchronize_srcu
waits for the memslot read side, root reload requests), each with the
broken variant shown failing."""

from __future__ import annotations

import threading
import time

import numpy as np

from memory import RAMBlock
from memory.kvm import SimKVM, UserMemoryRegion
from memory.kvm.sim import _sim_shm as S
from memory.kvm import linux_kvm as K
from tests.simkit import check_invariants, inspect_spte

P = 4096
_RAM = RAMBlock("test-sim-shared", 1024 * P)


def make(nr_vcpus: int = 2, npages: int = 256) -> SimKVM:
    vm = SimKVM(nr_vcpus=nr_vcpus)
    vm.set_user_memory_region(UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, npages * P, _RAM.host))
    return vm


def test_an_attached_view_sees_the_same_mmu_and_memory() -> None:
    vm = make()
    other = SimKVM(nr_vcpus=2, params=vm.shared_state.params, _attach=(vm.shared_state.fd, 0))
    other.self_vcpu = 1
    # a fault taken through the attached view (as a vCPU process does) ...
    other.vcpu_write(np.arange(10), 1)
    # ... is the VMM's state: leaves, rmap, dirty bits, per-vCPU statistics
    assert inspect_spte(vm, 3).writable and inspect_spte(vm, 3).dirty_logged
    assert vm.vcpu_statistics(1)["faults_map"] == 10 and vm.vcpu_statistics(0)["faults_map"] == 0
    bm = np.zeros(4, np.uint64)
    vm.get_dirty_log(0, bm)
    assert np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little")).tolist() == list(range(10))
    assert not inspect_spte(other, 3).writable  # protected by the VMM's GET, seen by the vCPU
    # the host pages are the RAM block's, not a copy
    other._slots[0].pages[5, 0] = 0x5A
    assert _RAM.pages[5, 0] == 0x5A
    check_invariants(vm)


def test_atomics() -> None:
    st = S.SharedState.create(S.Params(nr_vcpus=1, l1_rows=4, l2_rows=4, l3_rows=4, arena_bytes=4096))
    w = st.arena_view(0, "uint64", 4)
    a = int(w.ctypes.data)
    assert S.fetch_or8(a, 0b101) == 0 and int(w[0]) == 0b101
    assert S.fetch_and8(a, ~0b100) == 0b101 and int(w[0]) == 1
    assert S.xchg8(a, 1 << 63) == 1 and int(w[0]) == 1 << 63
    assert not S.cas8(a, 0, 7) and S.cas8(a, 1 << 63, 7) and int(w[0]) == 7
    b = w.view(np.uint8)
    assert not S.cas1(a + 1, 1, 2) and S.cas1(a, 7, 9) and int(b[0]) == 9
    assert S.fetch_add8(a + 8, 3) == 0 and S.load8(a + 8) == 3


def test_mmu_lock_excludes_and_accounts_waiting() -> None:
    vm = make()
    lock = vm._mmu_lock
    inside = []

    def other() -> None:
        other_vm = SimKVM(nr_vcpus=2, params=vm.shared_state.params, _attach=(vm.shared_state.fd, 0))
        other_vm._stats.row = 0
        with other_vm._mmu_lock:
            inside.append(time.monotonic())

    with lock:
        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.05)
        assert not inside  # waiting for us
        released = time.monotonic()
    t.join(5)
    assert inside and inside[0] >= released
    assert vm.vcpu_statistics(0)["mmu_lock_wait_ns"] >= 40_000_000
    assert vm.statistics()["mmu_lock_hold_ns"] >= 40_000_000


def _in_thread(fn):
    done = []
    t = threading.Thread(target=lambda: done.append(fn()))
    t.start()
    return t, done


def test_tlb_flush_waits_for_a_vcpu_in_guest_mode() -> None:
    vm = make()
    vm.vcpu_write(np.arange(64), 1)
    ctl = vm.shared_state["vcpu_ctl"]
    ctl[1, S.C_GUEST_SEQ] = 1  # vCPU 1 is in guest mode (may be storing through old sptes)
    bm = np.zeros(4, np.uint64)
    t, done = _in_thread(lambda: vm.get_dirty_log(0, bm))
    time.sleep(0.05)
    assert not done, "GET returned while a vCPU could still store through a writable spte it protected"
    assert not inspect_spte(vm, 5).writable  # protected already; only the flush is pending
    ctl[1, S.C_GUEST_SEQ] = 2  # the vCPU exits guest mode
    t.join(5)
    assert done
    # a vCPU outside guest mode is not waited for
    ctl[1, S.C_GUEST_SEQ] = 2
    vm.vcpu_write(np.arange(64), 1)
    t0 = time.monotonic()
    vm.get_dirty_log(0, bm)
    assert time.monotonic() - t0 < 1


def test_guest_entry_sees_a_protection_or_a_reload_request() -> None:
    vm = make()
    u = np.arange(64)
    vm.vcpu_write(u, 0)
    assert vm.guest_can_store(u, 0)
    vm.get_dirty_log(0, np.zeros(4, np.uint64))
    assert not vm.guest_can_store(u, 0)  # must exit and fault again
    vm.vcpu_write(u, 0)
    vm.get_dirty_log(0, np.zeros(4, np.uint64), K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT)
    assert vm.guest_can_store(u, 0)  # nothing protected yet (rule 4: the snapshot covers it)
    vm.write_protect_all(True)
    assert not vm.guest_can_store(u, 0)  # the reload request stops the entry


def test_memslot_change_waits_for_the_read_side() -> None:
    vm = make()
    vm.vcpu_write(np.arange(8), 1)
    ctl = vm.shared_state["vcpu_ctl"]
    gen = int(vm.shared_state["hdr"][S.H_SLOTS_GEN])
    ctl[1, S.C_SRCU] = gen + 1  # vCPU 1 is inside an access that read the current table
    region = UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 1 << 30, 256 * P, _RAM.host)
    t, done = _in_thread(lambda: vm.set_user_memory_region(region))  # a move: zaps the old leaves
    time.sleep(0.05)
    assert not done
    assert vm._mmus[0].levels[1].flat[vm._mmus[0].leaf_index(np.array([3]))][0] & 1, (
        "the slot's leaves were zapped under a vCPU still using the old memslot")
    ctl[1, S.C_SRCU] = 0
    t.join(5)
    assert done and vm.memslot(0)[0] == (1 << 30) >> 12


def test_bitmap_atomics_are_skipped_only_when_no_vcpu_process_can_run() -> None:
    vm = make()
    ctl = vm.shared_state["vcpu_ctl"]
    assert vm._quiescent()  # no vCPU process: numpy copy + fill is exact
    ctl[1, S.C_ALIVE] = 1
    ctl[1, S.C_RUN] = 1  # running
    assert not vm._quiescent()
    ctl[1, S.C_RUN] = 2  # stop requested, not yet acknowledged: may still set bits
    assert not vm._quiescent()
    ctl[1, S.C_ACK] = 2  # acknowledged: nothing in flight
    assert vm._quiescent()
    attached = SimKVM(nr_vcpus=2, params=vm.shared_state.params, _attach=(vm.shared_state.fd, 0))
    assert not attached._quiescent()  # a vCPU process never assumes the others stopped


def test_dirty_ring_in_order_harvest_reset_and_full() -> None:
    import errno

    import pytest

    vm = SimKVM(nr_vcpus=2, params=S.Params(nr_vcpus=2, ring_entries=256))
    assert vm.check_extension(K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL) == 256 * 16
    with pytest.raises(OSError, match="EINVAL"):
        vm.enable_dirty_ring(512)  # more than the layout holds
    vm.enable_dirty_ring(128)
    vm.set_user_memory_region(UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, 256 * P, _RAM.host))
    with pytest.raises(OSError, match="ENXIO"):
        vm.get_dirty_log(0, np.zeros(4, np.uint64))
    vm.vcpu_write(np.array([7, 3, 9]), 1)  # one vCPU's faults, in page order within the batch
    vm.vcpu_write(np.array([5]), 0)
    vm.vcpu_write(np.array([2]), 1)
    slots, offs = vm.harvest_dirty_rings()
    assert offs.tolist() == [5, 3, 7, 9, 2] and set(slots.tolist()) == {0}  # vCPU 0's ring, then vCPU 1's
    assert inspect_spte(vm, 3).writable  # harvested, not yet reset
    assert vm.harvest_dirty_rings()[1].size == 0  # nothing twice
    assert vm.reset_dirty_rings() == 5
    assert not inspect_spte(vm, 3).writable and not inspect_spte(vm, 2).writable  # re-protected
    vm.vcpu_write(np.array([3]), 1)  # faults again, a new entry
    assert vm.harvest_dirty_rings()[1].tolist() == [3]
    vm.reset_dirty_rings()
    # a full ring refuses the push before changing anything
    free = vm.ring_free(0)
    vm.vcpu_write(np.arange(10, 10 + free), 0)
    assert vm.ring_free(0) == 0
    with pytest.raises(OSError) as ei:
        vm.vcpu_write(np.arange(100, 200), 0)  # 100 new faults: past the hard limit
    assert ei.value.errno == errno.ENOSPC
    assert not inspect_spte(vm, 150).present  # refused before any change
    vm.harvest_dirty_rings()
    assert vm.reset_dirty_rings() == free
    assert vm.ring_free(0) == 128 - S.RING_RSVD_ENTRIES


def test_a_command_posted_between_the_look_and_the_sleep_wakes_the_idle_vcpu() -> None:
    """The stopped vCPU's loop reads its doorbell, finds no command, then
    sleeps; the VMM posts a command in between.  The doorbell was rung after
    the read, so the sleep returns at once.  The old wait (futex on C_RUN,
    which a command does not change; the VMM woke C_RUN's address) sleeps
    through it until its timeout: the 50 ms the demo's stop-vcpus showed.
    The 60 s timeout makes a missed wake-up a hang; join(10) only guards."""
    from memory.kvm.sim._sim_vcpu_proc import Doorbell, _Ctl, ring_doorbell

    vm = make()
    ctl = _Ctl(vm.shared_state, 1)
    ctl.store(S.C_RUN, 2)  # stopped (acknowledged): the vCPU is idle
    bell = Doorbell(ctl)
    seen = bell.read()  # the loop's first read ...
    assert ctl.load(S.C_CMD) == 0  # ... then its look: nothing to do
    ctl.store(S.C_CMD, 1 << 8 | 2)  # the VMM posts CMD_SAVE ...
    ring_doorbell(ctl.addr(S.C_DOORBELL))  # ... and rings
    t, done = _in_thread(lambda: bell.wait(seen, 60.0))  # the loop's sleep
    t.join(10)
    assert done, "the idle vCPU slept through a command posted after its look"

    # broken: the wait before the doorbell (on C_RUN; the VMM stored C_CMD and
    # woke C_RUN's address before the vCPU was asleep): the wake-up is lost
    ctl.store(S.C_CMD_ACK, ctl.load(S.C_CMD))  # the first command is done
    old = Doorbell(ctl, "run")
    seen = old.read()
    assert ctl.load(S.C_CMD) == ctl.load(S.C_CMD_ACK)  # the look: nothing to do
    ctl.store(S.C_CMD, 2 << 8 | 2)  # the VMM posts the next command ...
    S.futex_wake(ctl.addr(S.C_RUN))  # ... and wakes as it did: nobody is asleep yet
    t, done = _in_thread(lambda: old.wait(seen, 60.0))
    t.join(1.0)
    assert not done, "the old wait was expected to miss the command"
    ctl.store(S.C_RUN, 4)  # release it (a new epoch changes the word it sleeps on)
    S.futex_wake(ctl.addr(S.C_RUN))
    t.join(10)
    assert done
