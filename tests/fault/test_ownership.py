"""Who owns the guest: the hand-over rule, in process and deterministic.

Destination: a FakeChannel releases the stream byte by byte; the source: a
real OutgoingMigration over a unix socket to a scripted peer that reads the
whole stream with our decoder and then answers (or does not) as the case
says.  Each case checks the invariant "at most one side runs the guest" and
the exact state each side ends in.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from memory import GLOBAL_DIRTY_MIGRATION
from memory.kvm.linux_kvm import KVM_MEM_LOG_DIRTY_PAGES
from memory.kvm.sim._sim_shm import C_RUN
from migrator.engine import IncomingMigration, OutgoingMigration
from migrator.engine._status import MigrationStatus as S
from transport import (MIG_CMD_X_GO, MIG_CMD_X_NOGO, NEED_DATA, Message, MessageDecoder,
                       StreamDecoder, VMDescription, encode_go, encode_loaded, encode_nogo, encode_shut)

from .streams import (FakeChannel, build_stream, destination_vm, device_payload, sim_state, source_vm,
                      vcpus_running)

SMALL = 64 << 10  # 16 pages: small enough to feed byte by byte


# -- destination ------------------------------------------------------------------
def _incoming(vm):
    vm.state.goto(S.SETUP)
    vm.incoming = IncomingMigration(vm, vm.incoming_uri)
    return vm.incoming


async def test_destination_does_nothing_before_the_last_byte_of_eof():
    """Deterministic, not a race: after every byte up to the stream's last one
    (EOF, then the VM description QEMU reads after it) the destination has not
    completed, loaded, acknowledged or resumed anything."""
    async with vcpus_running(destination_vm(memory=SMALL)) as vm:
        inc = _incoming(vm)
        stream, regions = build_stream(device_payload(sim_state("idle", memory=SMALL)), memory=SMALL)
        chan = FakeChannel(close=False)
        loaded = []
        real_load = vm.vcpus.load_state
        vm.vcpus.load_state = lambda data: (loaded.append(1), real_load(data))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inc.process, chan)
            cuts = list(range(0, regions["device"], 997)) + list(range(regions["device"], len(stream)))
            fed = 0
            for cut in cuts[1:]:
                chan.feed(stream[fed:cut])
                fed = cut
                await trio.testing.wait_all_tasks_blocked()
                assert vm.state.status is S.ACTIVE, fed
                assert not loaded and not chan.sent and not vm.vcpus.running, fed
                assert vm.runstate == "inmigrate"
            assert fed == len(stream) - 1 and regions["eof"] < fed  # EOF and all but the last byte after it
            chan.feed(stream[fed:])
        assert vm.state.status is S.COMPLETED and loaded and vm.vcpus.running
        assert chan.sent == [encode_shut(0)]


@pytest.mark.parametrize("start_paused", [False, True])
async def test_destination_sets_its_run_state_before_it_says_completed(start_paused):
    """QEMU's process_incoming_migration_bh: vm_start (or the received run
    state) first, then COMPLETED, so a client that sees "completed" never
    reads "inmigrate" from query-status.  The run state is recorded at the
    instant of each status change (the MIGRATION event's hook)."""
    async with vcpus_running(destination_vm(memory=SMALL, start_paused=start_paused)) as vm:
        inc = _incoming(vm)
        stream, _ = build_stream(device_payload(sim_state("idle", memory=SMALL)), memory=SMALL)
        seen = []
        emit = vm.state.on_change
        assert emit is not None

        def record(new):
            seen.append((new, vm.runstate))
            emit(new)

        vm.state.on_change = record
        chan = FakeChannel(close=False)
        chan.feed(stream)
        with trio.fail_after(30):
            await inc.process(chan)
    assert (S.COMPLETED, "paused" if start_paused else "running") in seen, seen


def _stream(handover_memory=SMALL, running=True):
    return build_stream(device_payload(sim_state("idle", memory=handover_memory), running=running),
                        memory=handover_memory)


async def test_destination_with_handover_runs_only_on_go():
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        inc = _incoming(vm)
        stream, regions = _stream()
        chan = FakeChannel(stream, close=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inc.process, chan)
            await trio.testing.wait_all_tasks_blocked()
            assert chan.sent == [encode_loaded(len(stream))]
            assert vm.state.status is S.ACTIVE and not vm.vcpus.running and inc.handover == "waiting-for-go"
            assert (await vm.qmp_query_migrate())["x-handover"] == "waiting-for-go"
            await vm.qmp_cont()  # the operator cannot start it while it waits
            assert not vm.vcpus.running
            chan.feed(encode_go(len(stream))[:5])
            await trio.testing.wait_all_tasks_blocked()
            assert not vm.vcpus.running  # half a GO is no GO
            chan.feed(encode_go(len(stream))[5:])
        assert vm.state.status is S.COMPLETED and vm.vcpus.running and inc.handover == "go"
        assert chan.sent == [encode_loaded(len(stream)), encode_shut(0)]


@pytest.mark.parametrize("ending", ["closed", "timeout", "wrong-count", "garbage"])
async def test_destination_without_go_stays_paused_until_the_operator_decides(ending):
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        vm.options.parameters = vm.params.apply(x_return_path_timeout=100)
        inc = _incoming(vm)
        stream, _ = _stream()
        chan = FakeChannel(stream, close=False)
        if ending == "closed":
            chan.close()
        elif ending == "wrong-count":
            chan.feed(encode_go(len(stream) - 1))
        elif ending == "garbage":
            chan.feed(b"\x00\x01\x00\x04\x00\x00\x00\x00")  # a SHUT: not a message a destination accepts
        with trio.fail_after(10):
            await inc.process(chan)
        assert not vm.vcpus.running and vm.runstate == "paused"
        assert vm.state.status is S.FAILED and inc.undecided and inc.handover == "no-go-ahead"
        info = await vm.qmp_query_migrate()
        assert "'cont' here starts it" in info["error-desc"], info
        assert chan.sent == [encode_loaded(len(stream))]
        await vm.qmp_cont()  # the operator decided: the state is complete and valid
        assert vm.vcpus.running


@pytest.mark.parametrize("handover", [False, True])
async def test_destination_of_a_stock_qemu_stream_runs_at_eof_and_sends_nothing(handover):
    """A RAM-only stream (x-ram-only) is for a stock QEMU, which opens no return
    path: its source waits for nothing, so even with x-handover the destination
    must not wait for a GO that never comes, and has nobody to send SHUT to."""
    async with vcpus_running(destination_vm(memory=SMALL, handover=handover)) as vm:
        vm.options.parameters = vm.params.apply(x_return_path_timeout=100)
        stream, _ = build_stream(None, memory=SMALL)
        chan = FakeChannel(stream, close=False)
        inc = _incoming(vm)
        with trio.fail_after(10):
            await inc.process(chan)
        assert vm.state.status is S.COMPLETED and vm.vcpus.running, inc.error_desc
        assert chan.sent == [] and inc.handover == "" and not inc.undecided


async def test_destination_without_handover_refuses_a_hand_over_source():
    """Capabilities that differ: the source hands over (it resumes the guest
    unless LOADED and its GO come), this destination would run at EOF and
    only then say SHUT(0); a SHUT that is late or lost would make two copies.
    The stream says the source hands over, so the destination refuses: it
    never runs and says SHUT(1), on which the source resumes.  Broken
    variant (the header's "handover" ignored): it runs and says SHUT(0)."""
    async with vcpus_running(destination_vm(memory=SMALL, handover=False)) as vm:
        inc = _incoming(vm)
        stream, _ = build_stream(device_payload(sim_state("idle", memory=SMALL), handover=True), memory=SMALL)
        chan = FakeChannel(stream, close=False)
        with trio.fail_after(10):
            await inc.process(chan)
        assert vm.state.status is S.FAILED and not vm.vcpus.running
        assert "set x-handover here too" in inc.error_desc
        assert chan.sent == [encode_shut(1)]


async def test_destination_with_handover_takes_a_hand_over_stream():
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        inc = _incoming(vm)
        stream, _ = build_stream(device_payload(sim_state("idle", memory=SMALL), handover=True), memory=SMALL)
        chan = FakeChannel(stream, close=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(inc.process, chan)
            await trio.testing.wait_all_tasks_blocked()
            assert chan.sent == [encode_loaded(len(stream))] and not vm.vcpus.running
            chan.feed(encode_go(len(stream)))
        assert vm.state.status is S.COMPLETED and vm.vcpus.running


async def test_destination_told_nogo_never_runs():
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        inc = _incoming(vm)
        stream, _ = _stream()
        chan = FakeChannel(stream + encode_nogo(), close=False)
        await inc.process(chan)
        assert vm.state.status is S.FAILED and inc.handover == "nogo" and not inc.undecided
        await vm.qmp_cont()
        assert not vm.vcpus.running and vm.runstate == "inmigrate"


async def test_destination_skips_a_vm_description_before_go():
    """QEMU appends a VMDESCRIPTION after EOF; the hand-over reader skips it."""
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        stream, _ = _stream()
        vmdesc = b"\x06" + (7).to_bytes(4, "big") + b'{"a":1}'
        chan = FakeChannel(stream + vmdesc + encode_go(len(stream)), close=False)
        await _incoming(vm).process(chan)
        assert vm.state.status is S.COMPLETED and vm.vcpus.running


async def test_paused_source_arrives_paused_after_go():
    async with vcpus_running(destination_vm(memory=SMALL, handover=True)) as vm:
        stream, _ = _stream(running=False)
        chan = FakeChannel(stream + encode_go(len(stream)), close=False)
        await _incoming(vm).process(chan)
        assert vm.state.status is S.COMPLETED and not vm.vcpus.running and vm.runstate == "paused"


# -- source -----------------------------------------------------------------------
async def _peer(listener, script: str, seen: dict) -> None:
    """A scripted destination: read the whole stream, then follow ``script``."""
    async with listener:
        stream = await listener.accept()
    async with stream:
        dec = StreamDecoder()
        total = 0
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                data = await stream.receive_some(1 << 20)
                if not data:
                    seen["closed-early"] = True
                    return
                total += len(data)
                dec.receive_data(data)
                continue
            if isinstance(ev, VMDescription):  # after EOF, as in every stream we write
                break
        n = dec.stream_offset
        seen["stream_bytes"] = n
        if script == "shut0":
            await stream.send_all(encode_shut(0))
        elif script == "shut1":
            await stream.send_all(encode_shut(1))
        elif script == "close":
            return
        elif script == "silent":
            await trio.sleep_forever()
        elif script == "garbage":
            await stream.send_all(b"\x00\x09\x00\x00")
            await trio.sleep_forever()
        elif script.startswith("loaded"):
            await stream.send_all(encode_loaded(n - 1 if script == "loaded-wrong" else n))
            rp = MessageDecoder({MIG_CMD_X_GO, MIG_CMD_X_NOGO})
            while True:
                msg = rp.next_message()
                if isinstance(msg, Message):
                    seen["word"] = "go" if msg.type == MIG_CMD_X_GO else "nogo"
                    seen["word_value"] = msg.value
                    break
                if msg is not NEED_DATA:
                    seen["word"] = None
                    break
                rp.receive_data(await stream.receive_some(64))
            if script == "loaded" and seen.get("word") == "go":
                await stream.send_all(encode_shut(0))
            elif script == "loaded-silent":
                await trio.sleep_forever()


def _dirty_logging_off(vm) -> bool:
    flags = vm.machine.kvm.memslot(0)[2]
    return not vm.ms.global_dirty_tracking & GLOBAL_DIRTY_MIGRATION and not flags & KVM_MEM_LOG_DIRTY_PAGES


@asynccontextmanager
async def _migrate(tmp_path, script: str, *, handover: bool, prepare=None):
    vm = source_vm(handover=handover)
    vm.options.parameters = vm.params.apply(x_return_path_timeout=300, max_bandwidth=1 << 34)
    seen: dict = {}
    path = str(tmp_path / "peer.sock")
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.vcpus.run)
        vm.machine.boot()
        await vm.vm_start()
        nursery.start_soon(_peer, listener, script, seen)
        mig = OutgoingMigration(vm, f"unix:{path}")
        vm.outgoing = mig
        if prepare is not None:
            prepare(vm, mig)
        with trio.fail_after(30):
            await mig.run()
        assert _dirty_logging_off(vm), script
        assert vm.vcpus.throttle_pct == 0
        # the checks run while the vCPU processes still run (cancelling
        # their supervisor stops them)
        yield vm, mig, seen
        nursery.cancel_scope.cancel()


# (script, handover) -> (status, source runs afterwards, what the peer was told)
SOURCE_CASES = {
    ("shut0", False): ("completed", False, None),
    ("shut1", False): ("failed", True, None),
    ("close", False): ("failed", False, None),  # outcome unknown: never resume
    ("silent", False): ("failed", False, None),
    ("garbage", False): ("failed", False, None),
    ("loaded", False): ("failed", True, "nothing"),  # the peer waits for a GO we never send
    ("shut0", True): ("completed", False, None),  # a peer without x-handover ran the guest
    ("shut1", True): ("failed", True, None),
    ("close", True): ("failed", True, None),  # no GO was sent: the peer cannot run
    ("silent", True): ("failed", True, None),
    ("garbage", True): ("failed", True, None),
    ("loaded", True): ("completed", False, "go"),
    ("loaded-silent", True): ("completed", False, "go"),  # GO sent, final SHUT lost: committed
    ("loaded-wrong", True): ("failed", True, "nogo"),
}


@pytest.mark.parametrize(("script", "handover"), sorted(SOURCE_CASES))
async def test_source_outcome(tmp_path, script, handover):
    status, runs, word = SOURCE_CASES[script, handover]
    async with _migrate(tmp_path, script, handover=handover) as (vm, mig, seen):
        assert vm.state.status.value == status, (mig.counters.error_desc, seen)
        assert vm.vcpus.running is runs
        assert vm.runstate == ("running" if runs else "postmigrate")
        if status == "failed" and not runs:
            assert "the destination may be running" in mig.counters.error_desc
            assert "'cont' exactly one side" in mig.counters.error_desc
        if word == "go":
            assert seen["word"] == "go" and seen["word_value"] == seen["stream_bytes"]
            note = "destination confirmed" if script == "loaded" else "go-ahead not confirmed"
            assert (await vm.qmp_query_migrate())["x-handover"] == note
        elif word == "nogo":
            assert seen["word"] == "nogo"
        elif word == "nothing":
            assert seen.get("word") is None


async def test_failure_after_the_vcpus_stopped_resumes_the_source(tmp_path):
    def prepare(vm, mig):
        def broken():
            raise RuntimeError("vCPU state unreadable")
        vm.vcpus.save_state = broken

    async with _migrate(tmp_path, "shut0", handover=False, prepare=prepare) as (vm, mig, seen):
        assert vm.state.status is S.FAILED and "vCPU state unreadable" in mig.counters.error_desc
        assert mig._stopped_vm and vm.vcpus.running and vm.runstate == "running"
        assert "stream_bytes" not in seen  # the destination never saw EOF


@pytest.mark.parametrize("handover", [False, True])
async def test_cancel_in_the_device_stage_resumes_the_source(tmp_path, handover):
    def prepare(vm, mig):
        inner = vm.state.on_change

        def on_change(status):
            inner(status)
            if status is S.DEVICE:
                mig.cancel()
        vm.state.on_change = on_change

    async with _migrate(tmp_path, "shut0", handover=handover, prepare=prepare) as (vm, mig, seen):
        assert vm.state.status is S.CANCELLED and vm.vcpus.running and vm.runstate == "running"
        assert "stream_bytes" not in seen


async def test_cancel_while_the_vcpus_stop_resumes_the_source(tmp_path):
    """migrate_cancel lands while vm_stop waits for the vCPUs' acks (the stop
    epoch is already posted): the stop must finish and the source resume.
    Broken variant (the stop cancelled half-way): the vCPUs stay stopped
    while the controller and the runstate still say "running"."""
    def prepare(vm, mig):
        real = vm.vcpus._answered

        async def answered(word, values, doing):
            if doing == "stopping":
                mig.cancel()
                await trio.lowlevel.checkpoint()  # the cancel is delivered while waiting
            await real(word, values, doing)
        vm.vcpus._answered = answered

    async with _migrate(tmp_path, "shut0", handover=False, prepare=prepare) as (vm, mig, seen):
        assert vm.state.status is S.CANCELLED and vm.runstate == "running"
        epochs = {int(vm.vcpus._ctl[v, C_RUN]) for v in range(vm.vcpus.smp)}
        assert vm.vcpus.running and vm.vcpus._epoch & 1 and epochs == {vm.vcpus._epoch}
        assert "stream_bytes" not in seen


@pytest.mark.parametrize("handover", [False, True])
async def test_cancel_after_eof(tmp_path, handover):
    """Cancel while waiting for the acknowledgement: with x-handover the
    destination cannot run without GO, so the source resumes (and says NOGO);
    without it the destination may be running, so the source stays paused."""
    def prepare(vm, mig):
        real = mig._handover

        async def cancel_then_wait():
            mig.cancel()
            await real()
        mig._handover = cancel_then_wait

    async with _migrate(tmp_path, "loaded-silent" if handover else "silent",
                        handover=handover, prepare=prepare) as (vm, mig, seen):
        if handover:
            assert vm.state.status is S.CANCELLED and vm.vcpus.running and seen["word"] == "nogo"
        else:
            assert vm.state.status is S.FAILED and not vm.vcpus.running and vm.runstate == "postmigrate"
            assert "the destination may be running" in mig.counters.error_desc


async def test_cancel_after_commit_changes_nothing(tmp_path):
    def prepare(vm, mig):
        orig_handover = mig._handover

        async def handover():
            await orig_handover()
            mig.cancel()  # after GO: a no-op
        mig._handover = handover

    async with _migrate(tmp_path, "loaded", handover=True, prepare=prepare) as (vm, mig, seen):
        assert vm.state.status is S.COMPLETED and not vm.vcpus.running and seen["word"] == "go"


# -- argument validation ------------------------------------------------------------
@pytest.mark.parametrize(("uri", "desc"), [
    ("bogus:thing", "Parameter 'uri' expects a valid migration protocol"),
    ("nocolon", "Parameter 'uri' expects a valid migration protocol"),
    ("tcp::4444", "address resolution failed for :4444: Name or service not known"),
    ("tcp:127.0.0.1:99999", "address resolution failed for 127.0.0.1:99999: Servname not supported"),
    ("tcp:127.0.0.1:0", "Failed to connect to '127.0.0.1:0'"),
    ("tcp:127.0.0.1", "missing ':PORT'"),
    ("unix:", "missing socket path"),
])
async def test_migrate_rejects_bad_uris_synchronously(uri, desc):
    from migrator.errors import QMPError

    vm = source_vm()
    with pytest.raises(QMPError, match=desc.replace("(", r"\(").replace(".", r"\.")):
        await vm.qmp_migrate(uri)
    assert vm.outgoing is None and vm.state.status is S.NONE


async def test_migrate_incoming_rejects_unknown_protocols():
    from migrator.errors import QMPError

    vm = destination_vm(uri="defer")
    with pytest.raises(QMPError, match="unknown migration protocol: bogus:x"):
        await vm.qmp_migrate_incoming("bogus:x")
    with pytest.raises(QMPError, match="Servname not supported"):
        await vm.qmp_migrate_incoming("tcp:127.0.0.1:70000")


@pytest.mark.parametrize(("qmp", "why"), [
    ("tcp:127.0.0.1:99999", "out of range"),
    ("tcp:127.0.0.1:0", "out of range"),
    ("tcp:127.0.0.1:-1", "invalid tcp address"),
    ("unix:/" + "x" * 120, "too long"),
])
def test_cli_rejects_bad_qmp_addresses(qmp, why, capsys):
    from migrator.cli._cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "--accel", "sim", "--memory", "16M", "--qmp", qmp])
    assert info.value.code == 2
    assert why in capsys.readouterr().err
