"""vCPU state save/load: the source VM stops, its RAM and vCPU state go to a
new VM in a fresh process, and the ab guest carries on from where it was."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import trio

from memory.kvm.real.guests import LAYOUT, check_guests_ram
from memory.kvm.real.vcpu import STATE_MAGIC, RealMachine

pytestmark = pytest.mark.kvm
CHILD = Path(__file__).with_name("kvm_dest_child.py")
ROOT = Path(__file__).resolve().parents[2]


async def test_state_roundtrip_to_a_fresh_process(require_kvm, tmp_path):
    size = 8 << 20
    with RealMachine("ab", size, log_dirty=False) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            with trio.fail_after(20):
                while m.ctrl["pass"] < 100:
                    await trio.sleep(0.005)
            await m.vcpus.vm_stop()
            await m.vcpus.vm_start()
            with pytest.raises(RuntimeError):
                m.vcpus.save_state()  # running: refused
            await m.vcpus.vm_stop()
            state = m.vcpus.save_state()
            nursery.cancel_scope.cancel()
        src_pass = m.ctrl["pass"]
        src_regs = m.vcpu.get_regs()
        assert check_guests_ram(m.ram.host, LAYOUT["DATA_START"], size).bad == 0
        (tmp_path / "ram").write_bytes(m.ram.host.tobytes())
    (tmp_path / "state").write_bytes(state)

    # self-describing: JSON header naming every section
    assert state[:8] == STATE_MAGIC
    (hlen,) = struct.unpack_from("<I", state, 8)
    header = json.loads(state[12 : 12 + hlen])
    (v0,) = header["vcpus"]
    assert set(v0["sections"]) == {"regs", "sregs", "fpu", "events", "mp_state"}
    assert len(v0["msrs"]) >= 10 and v0["regs"]["rip"] == src_regs.rip and header["program"] == "ab"

    proc = await trio.run_process(
        [sys.executable, str(CHILD), str(tmp_path / "ram"), str(tmp_path / "state"), str(size), "5"],
        capture_stdout=True, capture_stderr=True, check=False, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    out = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    assert out["pass0"] == src_pass and out["bad_before"] == 0
    # registers arrived: rbx is the guest's pass counter, rip where it stopped
    assert out["rbx"] == src_regs.rbx and out["rip"] == src_regs.rip
    # the guest continued counting from the source's pass (not from 1)
    assert out["pass_after"] >= src_pass + 5
    assert out["bad_after"] == 0
    assert "A" not in out["serial"]  # it resumed, it did not reboot
    # MSR_STAR was set by the image and restored; at most a few KVM PV MSRs are
    # refused (MSR_KVM_ASYNC_PF_INT 0x4b564d06 on this host)
    assert 0xC0000081 not in out["msr_rejected"] and len(out["msr_rejected"]) <= 2, out["msr_rejected"]


async def test_load_state_rejects_garbage(require_kvm):
    with RealMachine("ab", 2 << 20, log_dirty=False) as m:
        with pytest.raises(ValueError):
            m.vcpus.load_state(b"not a state blob")
