"""Migration destination for test_vcpu_state.py, run as a *fresh* process
(KVM fds are bound to the mm that created them: a forked child gets EIO).

argv: RAM_FILE STATE_FILE MEMORY_BYTES MIN_PASSES.  Loads RAM and vCPU state
into a new VM, runs the ab guest for MIN_PASSES more passes, stops it and
prints one JSON line with what the parent checks.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import trio

from memory.kvm.real.guests import LAYOUT, check_guests_ram
from memory.kvm.real.vcpu import RealMachine


async def main(ram_file: str, state_file: str, size: int, min_passes: int) -> dict:
    with RealMachine("ab", size, load_image=False, log_dirty=False) as m:
        m.ram.host[:] = np.fromfile(ram_file, dtype=np.uint8)
        m.vcpus.load_state(open(state_file, "rb").read())
        pass0 = m.ctrl["pass"]
        check0 = check_guests_ram(m.ram.host, LAYOUT["DATA_START"], size).bad
        regs = m.vcpu.get_regs()
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            with trio.fail_after(20):
                while m.ctrl["pass"] < pass0 + min_passes:
                    await trio.sleep(0.005)
            await m.vcpus.vm_stop()
            nursery.cancel_scope.cancel()
        return {
            "pass0": pass0,
            "pass_after": m.ctrl["pass"],
            "bad_before": check0,
            "bad_after": check_guests_ram(m.ram.host, LAYOUT["DATA_START"], size).bad,
            "rip": regs.rip,
            "rbx": regs.rbx,
            "serial": m.vcpus.serial_output.decode(),
            "msr_rejected": list(m.vcpus.statistics().msr_rejected),
        }


if __name__ == "__main__":
    ram_file, state_file, size, min_passes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(trio.run(main, ram_file, state_file, size, min_passes)))
