"""Benchmark: dirty log with per-page write protection vs the 2017 "fast
write protect" series, on the simulated KVM (seed case 1).

Scenario, per slot size, each variant on its own fresh VM:

1. one memslot of SIZE with KVM_MEM_LOG_DIRTY_PAGES; the guest writes all of
   it (every page mapped and dirty);
2. the dirty log of the whole slot, timed:
   * legacy: KVM_GET_DIRTY_LOG flags=0 (take the bits, write-protect every
     dirty page through the rmap under mmu_lock);
   * fast: KVM_GET_DIRTY_LOG with KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT, then
     KVM_WRITE_PROTECT_ALL_MEM(1); both are counted in fast_ns, and
     wp_all_ns is the ioctl alone;
3. the guest writes all memory once more (same batches for both), timed:
   after legacy every page takes a fast page fault; after write-protect-all
   the protection is pushed down on demand.

The median of ``--repeats`` runs is reported.  Host memory is one RAMBlock
(anonymous MAP_NORESERVE mapping) that the simulation never touches here, so
30 GiB costs the MMU's arrays only (about 2 bytes per gfn).  Python 3.11's
``mmap`` module lacks MAP_NORESERVE, so RAMBlock maps without it and a block
larger than the overcommit heuristic allows fails with ENOMEM; the tool
then maps the memory itself with the flag's Linux value.  The seed's
figures (3 GiB, 12 vCPUs, real KVM, 2017) are printed beside ours.

    python tools/bench_write_protect.py [--json] [--sizes 1G,3G,30G] [--repeats 7]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import mmap
import statistics
import sys
import time

import numpy as np

from memory import RAMBlock
from memory.kvm import SimKVM, UserMemoryRegion
from memory.kvm import linux_kvm as K
from migrator.engine import parse_size

#: seed case 1 (3 GiB, 12 vCPUs): PATCH 0/7 "Performance Data"
SEED = {
    "seed_size_bytes": 3 << 30,
    "seed_legacy_ns": 64_289_121,
    "seed_fast_ns": 137_654,
    "seed_ratio": round(64_289_121 / 137_654, 1),
    "seed_write_all_after_legacy_ns": 281_735_017,
    "seed_write_all_after_fast_ns": 291_150_923,
    "seed_write_after_change_pct": round((291_150_923 / 281_735_017 - 1) * 100, 1),
}
def steady_malloc() -> bool:
    """Keep freed memory in the heap (glibc mallopt), for both variants.

    First touch of fresh memory costs ~2 us per 4 KiB page on this host;
    with glibc's defaults, large numpy temporaries are mmap'ed/trimmed and
    faulted in again on every call, and which variant pays depends on what
    ran before (seen as +-50% swings of "write all after").  The kernel's
    paths allocate nothing, so neither variant should pay page faults.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def write_all(vm: SimKVM, npages: int, batch: int) -> int:
    t0 = time.perf_counter_ns()
    for s in range(0, npages, batch):
        vm.vcpu_write(np.arange(s, min(npages, s + batch), dtype=np.int64))
    return time.perf_counter_ns() - t0


def one_run(block: RAMBlock | _NoReserveMemory, size: int, variant: str, batch: int) -> dict[str, int]:
    npages = size >> 12
    vm = SimKVM()
    vm.set_user_memory_region(UserMemoryRegion(0, K.KVM_MEM_LOG_DIRTY_PAGES, 0, size, block.host))
    out = {"write_all_first_ns": write_all(vm, npages, batch)}
    bm = np.zeros((npages + 63) // 64, dtype=np.uint64)
    before = vm.statistics()
    if variant == "legacy":
        t0 = time.perf_counter_ns()
        vm.get_dirty_log(0, bm)
        t1 = time.perf_counter_ns()
        out |= {"dirty_log_ns": t1 - t0, "get_log_ns": t1 - t0, "wp_all_ns": 0}
    else:
        t0 = time.perf_counter_ns()
        vm.get_dirty_log(0, bm, K.KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT)
        tm = time.perf_counter_ns()
        vm.write_protect_all(True)
        t1 = time.perf_counter_ns()
        out |= {"dirty_log_ns": t1 - t0, "get_log_ns": tm - t0, "wp_all_ns": t1 - tm}
    st = vm.statistics()
    out["sptes_protected_in_dirty_log"] = st["sptes_write_protected"] - before["sptes_write_protected"]
    reported = int(np.unpackbits(bm.view(np.uint8)).sum())
    if reported != npages:
        raise SystemExit(f"{variant}: dirty log reported {reported} pages, expected {npages}")
    vm.reset_statistics()
    out["write_all_after_ns"] = write_all(vm, npages, batch)
    st = vm.statistics()
    out |= {
        "after_faults_fast": st["faults_fast"],
        "after_faults_map": st["faults_map"],
        "after_faults_push_down": st["faults_push_down"],
        "after_sptes_protected": st["sptes_write_protected"],
        "after_tlb_flushes": st["tlb_flushes"],
        "after_mmu_lock_acquisitions": st["mmu_lock_acquisitions"],
    }
    # correctness: every write after the dirty log was logged again
    vm.get_dirty_log(0, bm)
    if int(np.unpackbits(bm.view(np.uint8)).sum()) != npages:
        raise SystemExit(f"{variant}: writes after the dirty log were not all logged")
    del vm
    gc.collect()
    return out


#: MAP_NORESERVE on Linux (mmap.MAP_NORESERVE exists only from Python 3.13)
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class _NoReserveMemory:
    """Host memory like RAMBlock's, with MAP_NORESERVE for sure."""

    def __init__(self, size: int) -> None:
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        self.host = np.frombuffer(self._mmap, dtype=np.uint8)

    def close(self) -> None:
        self.host = None  # type: ignore[assignment]
        try:
            self._mmap.close()
        except BufferError:
            pass


def bench_size(size: int, repeats: int, batch: int) -> dict[str, object]:
    try:
        block: RAMBlock | _NoReserveMemory = RAMBlock(f"bench-{size}", size)
    except OSError:
        block = _NoReserveMemory(size)
    runs: dict[str, list[dict[str, int]]] = {"legacy": [], "fast": []}
    for _ in range(repeats):
        for variant in ("legacy", "fast"):
            runs[variant].append(one_run(block, size, variant, batch))
    block.close()

    def med(variant: str, key: str) -> int:
        return int(statistics.median(r[key] for r in runs[variant]))

    legacy_ns, fast_ns = med("legacy", "dirty_log_ns"), med("fast", "dirty_log_ns")
    after_l, after_f = med("legacy", "write_all_after_ns"), med("fast", "write_all_after_ns")
    res: dict[str, object] = {
        "size_bytes": size,
        "npages": size >> 12,
        "legacy_ns": legacy_ns,
        "fast_ns": fast_ns,
        "ratio": round(legacy_ns / fast_ns, 1),
        "get_log_ns": med("fast", "get_log_ns"),
        "wp_all_ns": med("fast", "wp_all_ns"),
        "legacy_sptes_protected": med("legacy", "sptes_protected_in_dirty_log"),
        "fast_sptes_protected": med("fast", "sptes_protected_in_dirty_log"),
        "write_all_after_legacy_ns": after_l,
        "write_all_after_fast_ns": after_f,
        "write_after_change_pct": round((after_f / after_l - 1) * 100, 1),
        "write_all_first_ns": med("legacy", "write_all_first_ns"),
        "repeats": repeats,
        "batch_pages": batch,
    }
    for variant in ("legacy", "fast"):
        for key in runs[variant][0]:
            if key.startswith("after_"):
                res[f"{variant}_{key}"] = med(variant, key)
    if size == SEED["seed_size_bytes"]:
        res |= SEED
    return res


def _fmt_ns(ns: float) -> str:
    for unit, div in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= div:
            return f"{ns / div:.3g} {unit}"
    return f"{ns:.0f} ns"


def print_table(results: list[dict[str, object]]) -> None:
    rows = [
        ("dirty log, legacy (GET flags=0)", "legacy_ns", _fmt_ns),
        ("dirty log, fast (GET w/o WP + WP-all)", "fast_ns", _fmt_ns),
        ("  of which GET w/o write protect", "get_log_ns", _fmt_ns),
        ("  of which KVM_WRITE_PROTECT_ALL_MEM", "wp_all_ns", _fmt_ns),
        ("ratio legacy / fast", "ratio", lambda v: f"{v}x"),
        ("sptes protected by the dirty log, legacy", "legacy_sptes_protected", str),
        ("sptes protected by the dirty log, fast", "fast_sptes_protected", str),
        ("write all after, legacy", "write_all_after_legacy_ns", _fmt_ns),
        ("write all after, fast", "write_all_after_fast_ns", _fmt_ns),
        ("write-after change", "write_after_change_pct", lambda v: f"{v:+}%"),
        ("  after legacy: fast / slow faults", None, lambda r: f"{r['legacy_after_faults_fast']} / {r['legacy_after_faults_map']}"),
        ("  after fast: fast / slow faults", None, lambda r: f"{r['fast_after_faults_fast']} / {r['fast_after_faults_map']}"),
        ("  after fast: push-downs, sptes protected", None,
         lambda r: f"{r['fast_after_faults_push_down']}, {r['fast_after_sptes_protected']}"),
    ]
    heads = [f"{r['size_bytes'] / (1 << 30):g} GiB" for r in results]
    seed = SEED if any("seed_ratio" in r for r in results) else None
    if seed:
        heads.append("seed 3 GiB (2017)")
    w0 = max(len(r[0]) for r in rows) + 2
    print("simulated KVM, seed case 1: one logged slot, all memory written, then the dirty log")
    print("".ljust(w0) + "".join(h.rjust(18) for h in heads))
    seed_vals = {
        "legacy_ns": _fmt_ns(SEED["seed_legacy_ns"]),
        "fast_ns": _fmt_ns(SEED["seed_fast_ns"]),
        "ratio": f"{SEED['seed_ratio']}x",
        "write_all_after_legacy_ns": _fmt_ns(SEED["seed_write_all_after_legacy_ns"]),
        "write_all_after_fast_ns": _fmt_ns(SEED["seed_write_all_after_fast_ns"]),
        "write_after_change_pct": f"{SEED['seed_write_after_change_pct']:+}%",
    }
    for label, key, fmt in rows:
        cells = [fmt(r[key]) if key else fmt(r) for r in results]
        if seed:
            cells.append(seed_vals.get(key, "") if key else "")
        print(label.ljust(w0) + "".join(c.rjust(18) for c in cells))
    print(
        "notes: the seed measured real KVM with 12 vCPUs and real guest stores; here the MMU is numpy,\n"
        "'write all' is the fault path only (no stores), and GET w/o write protect copies 1 bit per page."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per line per size")
    ap.add_argument("--sizes", default="1G,3G",
                    help="comma-separated slot sizes, QEMU -m syntax (a bare number is MiB; default 1G,3G)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch-pages", type=int, default=65536, help="pages per vcpu_write batch")
    ap.add_argument("--default-malloc", action="store_true", help="keep glibc's trimming (noisier)")
    args = ap.parse_args(argv)
    tuned = False if args.default_malloc else steady_malloc()
    results = []
    for text in args.sizes.split(","):
        res = bench_size(parse_size(text, default_suffix="M"), args.repeats, args.batch_pages)
        res["steady_malloc"] = tuned
        results.append(res)
        if args.json:
            print(json.dumps(res), flush=True)
    if not args.json:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
