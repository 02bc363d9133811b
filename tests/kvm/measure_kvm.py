"""Measure the real-KVM backend on this host (not a test: no assertions).

    python tests/kvm/measure_kvm.py [--mib 256]

Prints: guest dirty rate while tracked under each mode, fetch/clear/harvest
cost scaled to 1 GiB, exit round trip, stop latency.  Numbers vary 2-5x on a
shared nested host; run it when the machine is otherwise quiet.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import trio

from memory.kvm import linux_kvm as K
from memory.kvm.real.guests import LAYOUT, load_guest_image
from memory.kvm.real import RealKVM, kvm_usable
from memory.kvm.real.vcpu import RealMachine, RealVCPU

GIB_PAGES = 1 << 18


def _med_us(ns: list[int]) -> str:
    return f"{statistics.median(ns) / 1e3:.1f} us"


async def dirty_rate(mode: str, mib: int, seconds: float = 1.0, period: float = 0.02) -> dict:
    size = mib << 20
    npages = size // 4096
    with RealMachine("ab", size, dirty_log=mode, ring_size=16384) as m:
        vm = m.vm
        bitmap = np.zeros((npages + 63) // 64, np.uint64)

        def sync() -> int:
            if mode == "ring":
                return len(vm.reap_dirty_rings()[1])
            vm.get_dirty_log(0, bitmap)
            if mode == "clear":
                vm.clear_dirty_log(0, 0, npages, bitmap)
            return int(np.bitwise_count(bitmap).sum())

        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            while m.ctrl["pass"] < 2:  # first touch done
                await trio.sleep(0.01)
            sync()
            pf0, pass0, t0 = vm.statistics()["pf_fixed"], m.ctrl["pass"], time.perf_counter()
            reported = 0
            while time.perf_counter() - t0 < seconds:
                await trio.sleep(period)
                reported += sync()
            dt = time.perf_counter() - t0
            pf1, pass1 = vm.statistics()["pf_fixed"], m.ctrl["pass"]
            await m.vcpus.vm_stop()
            nursery.cancel_scope.cancel()
        data_pages = (size - LAYOUT["DATA_START"]) // 4096
        return {
            "mode": mode,
            "reported_pages_per_s": reported / dt,
            "faults_per_s": (pf1 - pf0) / dt,
            "guest_page_writes_per_s": (pass1 - pass0) * data_pages / dt,
        }


async def untracked_rate(mib: int) -> float:
    size = mib << 20
    with RealMachine("ab", size, log_dirty=False) as m:
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            await m.vcpus.vm_start()
            while m.ctrl["pass"] < 2:
                await trio.sleep(0.01)
            p0, t0 = m.ctrl["pass"], time.perf_counter()
            await trio.sleep(0.5)
            p1, dt = m.ctrl["pass"], time.perf_counter() - t0
            await m.vcpus.vm_stop()
            nursery.cancel_scope.cancel()
    return (p1 - p0) * ((size - LAYOUT["DATA_START"]) // 4096) / dt


async def _all_dirty_machine(mode: str, size: int):
    """A stopped machine in which every data page was written exactly once
    since the last re-protect (one full ab pass between two hlts)."""
    npages = size // 4096
    m = RealMachine("ab", size, dirty_log=mode, ring_size=min(65536, 1 << (npages - 1).bit_length()))
    bm = np.zeros((npages + 63) // 64, np.uint64)
    async with trio.open_nursery() as nursery:
        await nursery.start(m.vcpus.run)
        await m.vcpus.vm_start()
        while m.ctrl["pass"] < 2:
            await trio.sleep(0.01)
        m.ctrl["halt_req"] = 1  # halt at the next pass boundary
        while not m.vcpus.halted():
            await trio.sleep(0.002)
        await m.vcpus.vm_stop()
        if mode == "ring":
            m.vm.reap_dirty_rings()
        else:
            m.vm.get_dirty_log(0, bm)
            if mode == "clear":
                m.vm.clear_dirty_log(0, 0, npages, bm)
        await m.vcpus.vm_start()
        m.vcpus.wake()  # one full pass, then hlt again
        while not (m.ctrl["halts"] >= 2 and m.vcpus.halted()):
            await trio.sleep(0.002)
        await m.vcpus.vm_stop()
        nursery.cancel_scope.cancel()
    return m, bm


async def sync_costs(mib: int) -> dict:
    """Every data page dirty, vCPU stopped; time each mode's fetch and
    re-protect, scaled to 1 GiB of pages."""
    size = mib << 20
    npages = size // 4096
    scale = GIB_PAGES / npages
    out: dict = {}
    m, bm = await _all_dirty_machine("bitmap", size)
    with m:
        t0 = time.perf_counter_ns()
        m.vm.get_dirty_log(0, bm)
        t1 = time.perf_counter_ns()
        idx = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
        t2 = time.perf_counter_ns()
        out["dirty_pages"] = len(idx)
        out["bitmap GET (fetch+protect) ms/GiB"] = (t1 - t0) / 1e6 * scale
        out["bitmap -> page list ms/GiB"] = (t2 - t1) / 1e6 * scale
        t0 = time.perf_counter_ns()
        m.vm.get_dirty_log(0, bm)
        out["bitmap GET clean ms/GiB"] = (time.perf_counter_ns() - t0) / 1e6 * scale
    for chunk in (64, 4096, npages):
        m, bm = await _all_dirty_machine("clear", size)
        with m:
            t0 = time.perf_counter_ns()
            m.vm.get_dirty_log(0, bm)
            t1 = time.perf_counter_ns()
            for first in range(0, npages, chunk):
                m.vm.clear_dirty_log(0, first, min(chunk, npages - first), bm[first // 64 :])
            t2 = time.perf_counter_ns()
            out["clear GET (no protect) ms/GiB"] = (t1 - t0) / 1e6 * scale
            out[f"CLEAR chunk {chunk} pages ms/GiB"] = (t2 - t1) / 1e6 * scale
    m, _ = await _all_dirty_machine("ring", size)
    with m:
        t0 = time.perf_counter_ns()
        slots, offsets = m.vm.harvest_dirty_rings()
        t1 = time.perf_counter_ns()
        n = m.vm.reset_dirty_rings()
        t2 = time.perf_counter_ns()
        out["ring entries"] = n
        out["ring harvest ms/GiB"] = (t1 - t0) / 1e6 * GIB_PAGES / max(n, 1)
        out["ring reset ms/GiB"] = (t2 - t1) / 1e6 * GIB_PAGES / max(n, 1)
    return out


def exit_round_trip(n: int = 3000) -> dict:
    """KVM_RUN -> one page write -> out -> back in Python (selftest guest, 1 write/loop)."""
    from memory import RAMBlock
    from memory.kvm import UserMemoryRegion

    ram = RAMBlock("rt", 2 << 20)
    with RealKVM() as vm:
        entry = load_guest_image(ram, "selftest", per_loop=1, end=LAYOUT["DATA_START"] + 4096)
        vm.set_user_memory_region(UserMemoryRegion(0, 0, 0, ram.used_length, ram.host))
        v = RealVCPU(vm, 0)
        v.apply_entry(entry)
        for _ in range(10):
            v.run_once()
        t0 = time.perf_counter_ns()
        for _ in range(n):
            if v.run_once() != K.KVM_EXIT_IO:
                raise RuntimeError("unexpected exit")
        dt = time.perf_counter_ns() - t0
    ram.close()
    return {"exit_round_trip_us": dt / n / 1e3}


async def stop_latency(cycles: int = 50) -> dict:
    with RealMachine("ab", 8 << 20, log_dirty=False) as m:
        lat = []
        async with trio.open_nursery() as nursery:
            await nursery.start(m.vcpus.run)
            for _ in range(cycles):
                await m.vcpus.vm_start()
                await trio.sleep(0.005)
                await m.vcpus.vm_stop()
                lat.append(m.vcpus.statistics().counters["stop_ns_last"])
            nursery.cancel_scope.cancel()
    return {"stop_median_us": statistics.median(lat) / 1e3, "stop_max_us": max(lat) / 1e3}


async def main(mib: int) -> None:
    ok, why = kvm_usable()
    if not ok:
        print("KVM unusable:", why)
        return
    print(f"guest RAM {mib} MiB")
    print(f"untracked ab page writes/s: {await untracked_rate(mib):.3g}")
    for mode in ("bitmap", "clear", "ring"):
        r = await dirty_rate(mode, mib)
        print(f"tracked {mode:6s}: reported {r['reported_pages_per_s']:.3g} pages/s, "
              f"write faults {r['faults_per_s']:.3g}/s, guest page writes {r['guest_page_writes_per_s']:.3g}/s")
    for k, v in (await sync_costs(mib)).items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    print(exit_round_trip())
    print(await stop_latency())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    trio.run(main, ap.parse_args().mib)
