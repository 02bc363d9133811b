"""Multi-process stress: two simulated vCPU processes write random and
hot-set pages while this process (the VMM) runs migration syncs in every
dirty-log mode, display syncs, clears, write-protect-all (the wp-all
mode's syncs) and memslot moves.  After a final, stopped sync a shadow copy
built only from what the MIGRATION client reported must equal guest
memory.

The broken variants run the same real code paths (the vCPU processes'
fault path, the listener's syncs) with one ordering rule reversed and must
lose pages here: the fast page fault setting the dirty bit before the spte
is writable (rule 1: the migration copy loses), and a display sync that
does not re-protect what it fetched (the display copy loses).  Reversing rule 2 (rmap after the dirty bit) cannot lose pages
here: every rmap walker (legacy GET, CLEAR, memslot changes) takes
mmu_lock, as does the mapping fault, so they never interleave; that rule is
shown by the interleaving model (tests/unit/test_sim_ordering.py), which
lets the rmap walk run lockless as the 2013 lockless write protection did.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import trio

from memory import DIRTY_MEMORY_MIGRATION, DIRTY_MEMORY_VGA, GLOBAL_DIRTY_MIGRATION, TARGET_PAGE_SIZE
from memory.kvm._listener import RegionSyncRule
from memory.kvm.sim.workloads import HotsetWorkload, RandomWorkload
from migrator.engine._machine import AccelConfig, Machine

P = TARGET_PAGE_SIZE
CHUNK = 64
NPAGES = 1024  # 4 MiB of guest RAM, split between the two vCPUs
MID_ADDRS = (64 << 20, 80 << 20)

MODES = {
    "legacy": dict(write_protect_all=False, manual_protect=False),
    "manual": dict(manual_protect=True),
    "wp_all": dict(write_protect_all=True),
    "pml": dict(pml=True),
    "ring": dict(dirty_log="ring", dirty_ring_size=4096),
}


class Stress:
    def __init__(self, mode: str, *, fault_order: str = "spte_first",
                 region_rule: RegionSyncRule = RegionSyncRule.PROTECTING_FETCH) -> None:
        accel = AccelConfig(kind="sim", smp=2, fault_cost=(0, 0), **MODES[mode])
        self.m = m = Machine(memory_bytes=NPAGES * P, accel=accel, workload="random")
        self.ms, self.kvm, self.vcpus = m.ms, m.kvm, m.vcpus
        self.kvm.fault_order = fault_order
        m.kvm_listener.region_sync_rule = region_rule
        self.vcpus.set_workloads(lambda pages, base: (RandomWorkload if base == 0 else HotsetWorkload)(
            pages, seed=7, gfn_base=base))
        self.ram = m.ram_mr
        # a second, logged RAM region that moves (its slot is zapped and re-based
        # while the vCPUs run: invalidate, synchronize_srcu, zap under mmu_lock)
        self.mid = self.ms.memory_region_init_ram("mid", 64 * P)
        self.mid_at = 0
        with self.ms.transaction():
            self.ms.system_memory.add_subregion(MID_ADDRS[0], self.mid)
        n = self.ram.ram_block.npages
        self.shadow = np.zeros((n, P), np.uint8)
        self.bmap = np.zeros(n, bool)
        self.clear_pending = np.zeros(-(-n // CHUNK), bool)
        self.display = np.zeros((n, P), np.uint8)
        self.ops = dict.fromkeys(("sync", "send", "display", "move"), 0)

    # -- migration consumer (QEMU's bmap + clear_bmap) ---------------------------
    def start(self) -> None:
        self.ms.memory_global_dirty_log_start(GLOBAL_DIRTY_MIGRATION)
        self.shadow.fill(0xA5)
        self.bmap.fill(True)
        self.sync()
        self.ram.set_log(True, DIRTY_MEMORY_VGA)
        self.display[:] = self.ram.ram_block.pages

    def sync(self, last_stage: bool = False) -> None:
        self.ms.memory_global_dirty_log_sync(last_stage)
        words = self.ms.dirty_memory.xchg_words(DIRTY_MEMORY_MIGRATION, *self.ms.migration_dirty_words(self.ram))
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.bmap.size].astype(bool)
        self.bmap |= bits
        if not last_stage:
            self.clear_pending[np.unique(np.flatnonzero(bits) // CHUNK)] = True
        self.ms.memory_global_after_dirty_log_sync()
        self.ops["sync"] += 1

    def send(self, pages: np.ndarray, last_stage: bool = False) -> None:
        if not last_stage:
            for c in np.unique(pages // CHUNK).tolist():
                if self.clear_pending[c]:
                    self.clear_pending[c] = False
                    n = min(CHUNK, self.bmap.size - c * CHUNK)
                    self.ms.memory_region_clear_dirty_bitmap(self.ram, c * CHUNK * P, n * P)
        self.bmap[pages] = False
        self.shadow[pages] = self.ram.ram_block.pages[pages]
        self.ops["send"] += 1

    def display_refresh(self) -> None:
        snap = self.ms.memory_region_snapshot_and_clear_dirty(self.ram, 0, self.ram.size, DIRTY_MEMORY_VGA)
        pages = snap.dirty_pages() - (self.ram.ram_addr // P)
        pages = pages[(pages >= 0) & (pages < self.bmap.size)]
        self.display[pages] = self.ram.ram_block.pages[pages]
        self.ops["display"] += 1

    def move_mid(self) -> None:
        self.mid_at ^= 1
        with self.ms.transaction():
            self.mid.set_address(MID_ADDRS[self.mid_at])
        self.ops["move"] += 1

    def lost(self) -> tuple[np.ndarray, np.ndarray]:
        """Guest stopped: final sync, send the rest; pages that differ (migration, display)."""
        self.sync(last_stage=True)
        self.send(np.flatnonzero(self.bmap), last_stage=True)
        self.display_refresh()
        pages = self.ram.ram_block.pages
        return (np.flatnonzero((self.shadow != pages).any(axis=1)),
                np.flatnonzero((self.display != pages).any(axis=1)))

    async def run(self, seconds: float, *, stop_on_loss: bool = False) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(1)
        async with trio.open_nursery() as nursery:
            await nursery.start(self.vcpus.run)
            self.start()
            await self.vcpus.vm_start()
            end = time.monotonic() + seconds
            lost = (np.empty(0, np.int64), np.empty(0, np.int64))
            rounds = 0
            while time.monotonic() < end:
                op = rng.integers(0, 10)
                if op < 3:
                    self.sync()
                elif op < 6:
                    pending = np.flatnonzero(self.bmap)
                    if pending.size:
                        s = int(rng.integers(0, pending.size))
                        self.send(pending[s : s + 128])
                elif op < 8:
                    self.display_refresh()
                else:
                    self.move_mid()
                await trio.sleep(0.001)
                rounds += 1
                if stop_on_loss and rounds % 50 == 0:
                    # a checkpoint: stop, check, go on
                    await self.vcpus.vm_stop()
                    lost = self.lost()
                    if lost[0].size or lost[1].size:
                        break
                    await self.vcpus.vm_start()
            if self.vcpus.running:
                await self.vcpus.vm_stop()
                lost = self.lost()
            self.stats = self.vcpus.statistics()
            nursery.cancel_scope.cancel()
        return lost


@pytest.mark.parametrize("mode", list(MODES))
async def test_two_vcpu_processes_lose_nothing(mode):
    st = Stress(mode)
    lost_mig, lost_disp = await st.run(2.5)
    assert lost_mig.size == 0, f"{mode}: migration lost pages {lost_mig[:20].tolist()} ops={st.ops}"
    assert lost_disp.size == 0, f"{mode}: display lost pages {lost_disp[:20].tolist()}"
    # it was a real race: both vCPUs wrote and faulted while the VMM synced
    for v in st.stats.vcpus:
        assert v.pages_written is not None and v.pages_written > 10 * NPAGES, st.stats
        assert v.faults["fast"] + v.faults["map"] + v.counters["pml_logged"] > NPAGES // 4, st.stats
    assert st.ops["sync"] > 20 and st.ops["move"] > 5 and st.ops["display"] > 10, st.ops


async def test_broken_dirty_bit_before_writable_loses_pages():
    st = Stress("legacy", fault_order="dirty_first")
    lost_mig, _ = await st.run(20.0, stop_on_loss=True)
    assert lost_mig.size > 0, f"rule 1 reversed in the fast page fault went unnoticed (ops {st.ops})"


async def test_broken_display_sync_without_reprotect_loses_pages():
    # The display client is the one that loses: the pages its sync fetched
    # stay writable, later writes set no bit, and its next refresh misses
    # them.  (The migration copy survives here: the fetched bits also reach
    # the MIGRATION bitmap, so those pages are sent again after the next
    # global sync, whose write-protect-all re-arms tracking.)
    st = Stress("wp_all", region_rule=RegionSyncRule.NAIVE)
    _, lost_disp = await st.run(20.0, stop_on_loss=True)
    assert lost_disp.size > 0, f"a display sync that leaves its pages writable went unnoticed (ops {st.ops})"


# ---------------------------------------------------------------------------
# -smp 2 end to end (migrator run processes) and convergence at QEMU defaults
# ---------------------------------------------------------------------------
def _ranges_ok(ram: bytes, npages: int, smp: int) -> list[int]:
    """Bad pages of QEMU's check_guests_ram, per vCPU range (each vCPU's ab program)."""
    from memory.kvm.sim.sim_vcpu import vcpu_range
    from memory.kvm.sim.workloads import AB_START, check_guests_ram

    mem = np.frombuffer(ram, np.uint8)
    out = []
    for v in range(smp):
        lo, hi = vcpu_range(npages, smp, v)
        out.append(check_guests_ram(mem, max(lo * P, AB_START), hi * P))
    return out


@pytest.mark.trio_timeout(120)
@pytest.mark.parametrize("kind", ["tcp", "unix"])
async def test_smp2_migration_resumes_every_vcpu(tmp_path, kind, trio_timeout):
    from .harness import free_port, pmem, vm_process

    mem = 32 << 20
    uri = f"tcp:127.0.0.1:{free_port()}" if kind == "tcp" else f"unix:{tmp_path / 'mig.sock'}"
    async with vm_process(tmp_path, "dst", "--smp", "2", "--incoming", uri, "-S", memory="32M") as dst, \
            vm_process(tmp_path, "src", "--smp", "2", memory="32M", workload="ab,rate=20000") as src:
        await src.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 30})
        await trio.sleep(0.3)
        before = (await src.qmp.execute("x-query-accel-stats"))["vcpus"]
        assert [v["cpu-index"] for v in before] == [0, 1] and all(v["pages-written"] > 0 for v in before)
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration()
        assert info["status"] == "completed", (info, src.log())
        assert (await dst.qmp.wait_migration())["status"] == "completed", dst.log()
        a = await pmem(src, tmp_path, mem, "src.ram")
        b = await pmem(dst, tmp_path, mem, "dst.ram")
        assert a == b
        assert _ranges_ok(a, mem // P, 2) == [0, 0]
        # both vCPUs resume where the source's stopped: each range keeps the ab pattern
        await dst.qmp.execute("cont")
        await trio.sleep(0.4)
        await dst.qmp.execute("stop")
        c = await pmem(dst, tmp_path, mem, "dst2.ram")
        after = (await dst.qmp.execute("x-query-accel-stats"))["vcpus"]
        assert len(after) == 2 and all(v["pages-written"] > 0 for v in after), after
        assert _ranges_ok(c, mem // P, 2) == [0, 0]
        half = (mem // P // 2) * P
        assert c[:half] != b[:half] and c[half:] != b[half:]  # each vCPU ran on


@pytest.mark.trio_timeout(150)
async def test_greedy_ab_converges_at_qemu_defaults_with_auto_converge(tmp_path, trio_timeout):
    """QEMU's defaults (128 MiB/s, 300 ms, throttle 20 % + 10 %), auto-converge,
    a greedy ab guest: with the per-fault cost of this host it converges,
    as it does on real KVM here (the issue: still running after 70 s)."""
    from .harness import vm_process

    uri = f"unix:{tmp_path / 'mig.sock'}"
    async with vm_process(tmp_path, "dst", "--incoming", uri, "-S", memory="128M") as dst, \
            vm_process(tmp_path, "src", memory="128M", workload="ab") as src:
        await src.qmp.execute("migrate-set-capabilities",
                              {"capabilities": [{"capability": "auto-converge", "state": True}]})
        await trio.sleep(0.3)
        await src.qmp.execute("migrate", {"uri": uri})
        info = await src.qmp.wait_migration(timeout=120)
        assert info["status"] == "completed", (info, src.log())
        assert (await dst.qmp.wait_migration())["status"] == "completed"


async def test_a_vcpu_writing_outside_ram_exits_and_goes_on():
    """The guest's pages lose their memslot (the RAM region is removed):
    the vCPU's faults fail like an MMIO exit, it keeps running, and its
    pages are not written; once the RAM is back it writes again."""
    m = Machine(memory_bytes=NPAGES * P, accel=AccelConfig(kind="sim", smp=1, fault_cost=(0, 0)),
                workload="random")
    async with trio.open_nursery() as nursery:
        await nursery.start(m.vcpus.run)
        await m.vcpus.vm_start()
        await trio.sleep(0.2)
        with m.ms.transaction():
            m.ms.system_memory.del_subregion(m.ram_mr)
        await trio.sleep(0.05)
        await m.vcpus.vm_stop()
        before = bytes(m.ram_block.host)
        await m.vcpus.vm_start()
        await trio.sleep(0.2)
        await m.vcpus.vm_stop()
        assert bytes(m.ram_block.host) == before  # no store without a mapping
        st = m.vcpus.statistics().vcpus[0]
        assert st.exits["mmio"] > 0
        with m.ms.transaction():
            m.ms.system_memory.add_subregion(0, m.ram_mr)
        w0 = m.vcpus.statistics().vcpus[0].pages_written
        await m.vcpus.vm_start()
        await trio.sleep(0.2)
        await m.vcpus.vm_stop()
        w1 = m.vcpus.statistics().vcpus[0].pages_written
        assert w0 is not None and w1 is not None and w1 > w0
        assert all(m.vcpus._alive(v) for v in range(1))
        nursery.cancel_scope.cancel()
