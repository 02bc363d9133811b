"""The simulated vCPU processes' stop / command handshake, through the real
processes (:class:`memory.kvm.sim.sim_vcpu.SimVCPUs`): idle vCPUs are woken
by what the VMM posts, not by a timeout.

The vCPUs sleep up to 60 s when idle here, so a missed wake-up is a hang;
``trio.fail_after`` is only a deadlock guard, nothing is timed.  The broken
variant (the vCPUs wait on C_RUN, the word before the doorbell, which a
command does not change) hangs at its first command.
"""

from __future__ import annotations

import pytest
import trio

from memory import TARGET_PAGE_SIZE
from migrator.engine._machine import AccelConfig, Machine

pytestmark = pytest.mark.trio_timeout(60)


def _vcpus(wait_word: str):  # noqa: ANN202
    m = Machine(memory_bytes=1024 * TARGET_PAGE_SIZE, workload="ab",
                accel=AccelConfig(kind="sim", smp=2, fault_cost=(0, 0)))
    v = m.vcpus
    v.rate = 20000  # pages/s per vCPU: batches with rate ticks between them
    v.idle_timeout_s = 60.0  # a missed wake-up costs a minute
    v.wait_word = wait_word
    return v


async def _stop_start(v, rounds: int) -> None:  # noqa: ANN001
    async with trio.open_nursery() as nursery:
        await nursery.start(v.run)
        v.boot()
        for _ in range(rounds):
            await v.vm_start()  # CMD_LOAD to an idle vCPU (the first time), then the run epoch
            await trio.sleep(0.01)
            await v.vm_stop()  # the stop epoch, then CMD_SAVE to the idle vCPUs
        nursery.cancel_scope.cancel()


async def test_idle_vcpus_are_woken_by_commands_and_epochs():
    v = _vcpus("doorbell")
    with trio.fail_after(20):  # deadlock guard: a lost wake-up would take 60 s
        await _stop_start(v, 5)
    assert len(v.stop_ns) == 5 and v.expected_stop_ns() == max(v.stop_ns) > 0
    assert v.stats["pages_written"] > 0  # they ran between the stops


async def test_broken_vcpus_waiting_on_the_run_word_miss_commands():
    v = _vcpus("run")
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(5):
            await _stop_start(v, 5)


async def test_a_cancelled_stop_still_completes_and_cont_resumes():
    """A caller cancelled while vm_stop waits for the acks (a QMP client
    dropped mid-``stop``, a migrate_cancel): the stop epoch is posted, so
    the stop must complete; otherwise the controller says "running" while
    the vCPUs are stopped, vm_start returns at once and nothing resumes
    them.  Broken variant: the ack wait not shielded (shown red by the
    commit that added the shield)."""
    v = _vcpus("doorbell")
    real = v._answered

    async def answered(word, values, doing):  # noqa: ANN001, ANN202
        if doing == "stopping":
            cs.cancel()
            await trio.lowlevel.checkpoint()  # the cancel is delivered in the wait
        await real(word, values, doing)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(v.run)
            v.boot()
            await v.vm_start()
            v._answered = answered
            with trio.CancelScope() as cs:
                await v.vm_stop()
            v._answered = real
            assert not v.running and v._epoch % 2 == 0
            await v.vm_start()
            before = v.stats["pages_written"]
            while v.stats["pages_written"] == before:  # they run again (no timing: any progress)
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
