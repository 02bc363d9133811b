"""Live migration of a real guest on real KVM between two processes.

QEMU's migration-test flow (tests/qtest/migration): start non-converging
(tiny bandwidth and downtime-limit) so the guest keeps dirtying pages that
were already sent, then let it converge; on the destination
``check_guests_ram`` must find 0 bad pages, and after ``cont`` the guest
keeps running there (its memory keeps changing, still 0 bad pages).
"""

from __future__ import annotations

import numpy as np
import pytest
import trio

from memory.kvm import kvm_usable
from memory.kvm.sim.workloads import AB_START, check_guests_ram

from tests.integration.harness import free_port, migrate_live_then_converge, pmem, vm_process, wait_serial

_ok, _why = kvm_usable()
pytestmark = [pytest.mark.skipif(not _ok, reason=f"real KVM unusable: {_why}"),
              pytest.mark.trio_timeout(150)]

MiB = 1 << 20


@pytest.mark.parametrize("mode", ["bitmap", "clear", "ring"])
async def test_live_migrate_running_ab_guest(tmp_path, mode, trio_timeout):
    mem = 256 * MiB
    accel = f"kvm,dirty-log={mode}"
    uri = f"tcp:127.0.0.1:{free_port()}"
    serial = tmp_path / "src.serial"
    async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", memory="256M", accel=accel) as dst, \
            vm_process(tmp_path, "src", "--serial", f"file:{serial}", memory="256M", accel=accel,
                       workload="ab") as src:
        await wait_serial(serial)  # the guest's first 'B' (64 passes), as QEMU's test does
        info = await migrate_live_then_converge(src, uri)
        assert info["status"] == "completed", (info, src.log())
        assert info["ram"]["dirty-sync-count"] >= 2
        dinfo = await dst.qmp.wait_migration()
        assert dinfo["status"] == "completed", dst.log()
        a = await pmem(src, tmp_path, mem, "src.ram")
        b = await pmem(dst, tmp_path, mem, "dst.ram")
        assert check_guests_ram(np.frombuffer(b, np.uint8), AB_START) == 0
        assert a == b
        # the guest keeps running on the destination, from where it stopped
        await dst.qmp.execute("cont")
        await trio.sleep(0.5)
        await dst.qmp.execute("stop")
        c = await pmem(dst, tmp_path, mem, "dst2.ram")
        assert c != b
        assert check_guests_ram(np.frombuffer(c, np.uint8), AB_START) == 0
        history = await src.qmp.execute("x-query-migration-history")
        assert history["status"] == "completed" and history["setup"]["accel"].startswith(accel)
