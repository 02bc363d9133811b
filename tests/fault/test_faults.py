"""The fault-injection suite: two ``migrator run`` processes, a proxy between
them, and a representative subset of the matrix (``tools/fault_matrix.py``
runs all of it).  After every case: at most one running copy at every 20 ms
sample, each side's state as the ownership rule says, the source's RAM
intact, and a successful retry from the owner with both RAMs equal.
"""

from __future__ import annotations

import json

import pytest
import trio

from transport import MIG_RP_MSG_SHUT, NEED_DATA, Message, MessageDecoder

from .faultkit import Chain, header, matrix, run_case, summary
from .streams import build_stream, device_payload, sim_state
from ..integration.harness import free_port, vm_process

pytestmark = pytest.mark.trio_timeout(400)

MEMORY = "32M"
WORKLOAD = "ab,rate=20000"


async def test_fault_matrix_subset(tmp_path):
    cases = matrix(full=False)
    results = []
    async with Chain(tmp_path, memory=MEMORY, accel="sim", workload=WORKLOAD) as chain:
        for fault, handover in cases:
            results.append(await run_case(chain, fault, handover=handover))
    table = "\n".join([header()] + [r.row() + ("" if r.fired else "  (fault not reached)") for r in results])
    print(table)
    print(json.dumps(summary(results)))
    assert all(r.max_running <= 1 for r in results), table
    assert all(r.fired for r in results), table  # every cut point of the subset is reachable
    assert all(r.src_ram_ok is not False for r in results), table
    assert all(r.retry_ok for r in results), table
    by = {(r.case, r.handover): r for r in results}
    # The rule, case by case where it is decisive:
    # the whole stream arrived but the acknowledgement did not: without
    # x-handover the source never resumes (outcome unknown) ...
    assert by["rev:ack:cut", False].src_state == "failed/postmigrate"
    assert by["rev:ack:delay:2.5s", False].src_state == "failed/postmigrate"
    assert by["fwd:after-eof:cut", False].src_state == "failed/postmigrate"
    # ... with it, the destination cannot run without GO, so the source resumes
    assert by["rev:ack:cut", True].src_state == "failed/running"
    assert by["rev:ack:delay:2.5s", True].src_state == "failed/running"
    # a cut before the EOF byte: the destination never runs; the source
    # resumes when its own send failed (early cuts always do), or with
    # x-handover; without it, once the whole stream left the source, it
    # cannot know and stays paused (the proxy swallowed the last bytes)
    for case in ("fwd:header+3:cut", "fwd:mid-page:reset", "fwd:final-ram:cut", "fwd:device+7:cut", "fwd:eof:cut"):
        for h in (False, True):
            r = by[case, h]
            assert r.dst_state.endswith("/inmigrate"), r
            early = case in ("fwd:header+3:cut", "fwd:mid-page:reset")
            allowed = {"failed/running"} if (h or early) else {"failed/running", "failed/postmigrate"}
            assert r.src_state in allowed, r
    # GO sent, its fate unknown: the only zero-copies outcome, the operator decides
    half_go = by["fwd:after-eof+3:cut", True]
    assert half_go.src_state == "completed/postmigrate" and half_go.dst_state == "failed/paused"
    assert half_go.final_running == 0 and half_go.owner == "dst"


async def _send_stream(port: int, stream: bytes) -> bytes:
    s = await trio.open_tcp_stream("127.0.0.1", port)
    async with s:
        await s.send_all(stream)
        dec = MessageDecoder({MIG_RP_MSG_SHUT})
        with trio.fail_after(20):
            while True:
                msg = dec.next_message()
                if isinstance(msg, Message):
                    return msg
                if msg is not NEED_DATA:
                    return None
                dec.receive_data(await s.receive_some(64))


@pytest.mark.parametrize("case", ["rate-fast", "rate-nan", "cursor-1e30", "wrong-accel-kind", "oversized"])
async def test_hostile_device_section_to_a_destination_process(tmp_path, case):
    """The process survives, answers QMP, reports failed with the offset, never runs."""
    from .test_device_state import NAMED

    payload = NAMED[case](sim_state("ab", memory=32 << 20))
    stream, regions = build_stream(payload, memory=32 << 20)
    port = free_port()
    async with vm_process(tmp_path, "dst", "--incoming", f"tcp:127.0.0.1:{port}", memory=MEMORY) as dst:
        msg = await _send_stream(port, stream)
        assert msg == Message(MIG_RP_MSG_SHUT, 1)
        info = await dst.qmp.wait_migration(("failed",), timeout=20)
        offset = regions["device-footer"] - len(payload)
        assert info["error-desc"].startswith("invalid device state")
        assert info["error-desc"].endswith(f"(at stream offset {offset})")
        await trio.sleep(0.3)
        assert dst.proc.poll() is None
        st = await dst.qmp.execute("query-status")
        assert st == {"running": False, "singlestep": False, "status": "inmigrate"}
        await dst.qmp.execute("cont")  # sets autostart only: nothing was loaded
        assert (await dst.qmp.execute("query-status"))["running"] is False


async def test_a_valid_stream_to_a_destination_process_runs(tmp_path):
    """The counterpart: the same path with a genuine state completes and runs."""
    stream, _ = build_stream(device_payload(sim_state("ab", memory=32 << 20)), memory=32 << 20)
    port = free_port()
    async with vm_process(tmp_path, "dst", "--incoming", f"tcp:127.0.0.1:{port}", memory=MEMORY) as dst:
        assert await _send_stream(port, stream) == Message(MIG_RP_MSG_SHUT, 0)
        await dst.qmp.wait_migration(("completed",), timeout=20)
        assert (await dst.qmp.execute("query-status"))["running"] is True


@pytest.mark.parametrize("handover", [False, True])
async def test_real_source_to_a_destination_that_rejects_its_device_section(tmp_path, handover):
    """A sim guest sent to a kvm destination: the destination rejects the
    vCPU state (wrong accelerator kind) before running anything, the source
    gets SHUT(1) and resumes with its RAM intact."""
    from memory.kvm import kvm_usable

    ok, why = kvm_usable()
    if not ok:
        pytest.skip(f"needs /dev/kvm for the destination: {why}")
    from .faultkit import _ab_ok, _set_up
    from ..integration.harness import pmem

    port = free_port()
    async with vm_process(tmp_path, "src", memory=MEMORY, workload=WORKLOAD) as src, \
            vm_process(tmp_path, "dst", "--incoming", f"tcp:127.0.0.1:{port}", memory=MEMORY, accel="kvm") as dst:
        for vm in (src, dst):
            await _set_up(vm, handover)
        await src.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await src.qmp.wait_migration(timeout=60)
        dinfo = await dst.qmp.wait_migration(("failed",), timeout=30)
        assert info["status"] == "failed" and "status 1" in info["error-desc"], info
        assert "is for a sim accelerator, this VM uses kvm" in dinfo["error-desc"]
        assert (await src.qmp.execute("query-status"))["running"] is True
        assert (await dst.qmp.execute("query-status"))["running"] is False
        await src.qmp.execute("stop")
        assert _ab_ok(await pmem(src, tmp_path, 32 << 20, "src.ram"))
