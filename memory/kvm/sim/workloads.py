"""Simulated guest workloads: deterministic, seeded page writers.

A workload decides which guest pages a vCPU writes next and what it writes;
the vCPU runner (``memory.kvm.sim.sim_vcpu``) first runs the simulated MMU fault
path for the batch (``SimKVM.vcpu_write``) and only then lets the workload
store into guest RAM, which is the order real hardware follows: the write
fault is resolved (spte writable, page logged) before the store retires.

Workloads (``--workload NAME[,rate=PAGES_PER_S][,seed=N]``):

``idle``     writes nothing.
``ab``       QEMU's migration test guest: byte 0 of every page in
             [1 MiB, end) is incremented in ascending order, forever (after
             zeroing them once, as the boot block does).  Checked with
             :func:`check_guests_ram`, QEMU's rule.
``random``   uniformly random pages; each write stores a fresh sequence
             number in the page's first 8 bytes.
``hotset``   skewed: 90 % of the writes go to a hot 10 % of the pages.
``fill``     at boot, fills every page with non-zero pseudo-random data
             (a guest "full of non-zero data", for throughput benchmarks);
             then idle.
``stream``   greedily and repeatedly writes a working set, pages
             [0, working_set) in ascending order, pass after pass (the
             2017 fast-write-protect series' test case); 75 % of RAM
             unless constructed with ``working_set=`` (pages).  Each write
             stores a fresh sequence number in the page's first 8 bytes.

All are vectorised: one batch of N pages is a handful of numpy operations.
State (cursor, pass value, RNG state) is JSON-able, so it migrates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..._ramblock import TARGET_PAGE_SIZE

#: QEMU's test guest works on [1 MiB, end) of RAM.
AB_START = 1 << 20

WORKLOADS = ("idle", "ab", "random", "hotset", "fill", "stream")


class Workload:
    """Base class.  ``pages`` is the RAM as ``(npages, 4096)`` uint8 (gfn = index + gfn_base)."""

    name = "workload"

    def __init__(self, pages: np.ndarray, *, seed: int = 0, gfn_base: int = 0) -> None:
        self.pages = pages
        self.npages = pages.shape[0]
        self.gfn_base = gfn_base
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.pages_written = 0

    def boot(self, mmu: Callable[[np.ndarray], None]) -> None:
        """Whatever the guest does once at boot (before migration starts)."""

    def next_pages(self, n: int) -> np.ndarray:
        """Page indices (relative to ``pages``) of the next ``n`` writes."""
        raise NotImplementedError

    def store(self, idx: np.ndarray) -> None:
        """Store into the pages (the MMU already made them writable)."""
        raise NotImplementedError

    def step(self, n: int, mmu: Callable[[np.ndarray], None]) -> int:
        """Run ``n`` page writes: fault path for the batch, then the stores."""
        if n <= 0:
            return 0
        idx = self.next_pages(n)
        if idx.size == 0:
            return 0
        mmu(idx + self.gfn_base)
        self.store(idx)
        self.pages_written += int(idx.size)
        return int(idx.size)

    # -- migration of the workload's own state (vCPU "registers") ----------
    def get_state(self) -> dict[str, Any]:
        return {"name": self.name, "rng": self.rng.bit_generator.state, "pages_written": self.pages_written}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"workload state is for {state.get('name')!r}, not {self.name!r}")
        self.rng.bit_generator.state = state["rng"]
        self.pages_written = int(state.get("pages_written", 0))


class IdleWorkload(Workload):
    name = "idle"

    def next_pages(self, n: int) -> np.ndarray:
        return np.empty(0, dtype=np.int64)

    def store(self, idx: np.ndarray) -> None:  # pragma: no cover - never called
        pass


class ABWorkload(Workload):
    """QEMU's a-b-bootblock: increment byte 0 of each page of [1 MiB, end)."""

    name = "ab"

    def __init__(self, pages: np.ndarray, *, seed: int = 0, gfn_base: int = 0) -> None:
        super().__init__(pages, seed=seed, gfn_base=gfn_base)
        # [1 MiB, end) of guest RAM: a vCPU's range past 1 MiB is all its own
        self.first = max(0, AB_START // TARGET_PAGE_SIZE - gfn_base)
        if self.npages <= self.first:
            raise ValueError("the ab workload needs more than 1 MiB of RAM")
        self.cursor = self.first  # next page to increment
        self.passes = 0  # completed passes

    def boot(self, mmu: Callable[[np.ndarray], None]) -> None:
        idx = np.arange(self.first, self.npages, dtype=np.int64)
        mmu(idx + self.gfn_base)
        self.pages[self.first:, 0] = 0

    def next_pages(self, n: int) -> np.ndarray:
        span = self.npages - self.first
        n = min(n, span)  # never wrap onto the same page twice in one batch
        start = self.cursor - self.first
        idx: np.ndarray = (np.arange(start, start + n, dtype=np.int64) % span) + self.first
        return idx

    def store(self, idx: np.ndarray) -> None:
        # idx is one or two ascending runs (a wrap): slice stores, no fancy index.
        first, last = int(idx[0]), int(idx[-1])
        if last >= first:
            self.pages[first:last + 1, 0] += 1
        else:
            self.pages[first:, 0] += 1
            self.pages[self.first:last + 1, 0] += 1
        end = last + 1
        if end >= self.npages or last < first:
            self.passes += 1
        self.cursor = self.first if end >= self.npages else end

    def get_state(self) -> dict[str, Any]:
        return super().get_state() | {"cursor": self.cursor, "passes": self.passes}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.cursor = int(state["cursor"])
        self.passes = int(state["passes"])


class RandomWorkload(Workload):
    """Uniformly random pages; stores a sequence number (never repeats)."""

    name = "random"

    def __init__(self, pages: np.ndarray, *, seed: int = 0, gfn_base: int = 0) -> None:
        super().__init__(pages, seed=seed, gfn_base=gfn_base)
        self.seq = 0
        self._words = pages.view(np.uint64)  # (npages, 512)

    def next_pages(self, n: int) -> np.ndarray:
        return self._pick(n)

    def _pick(self, n: int) -> np.ndarray:
        return self.rng.integers(0, self.npages, size=n, dtype=np.int64)

    def store(self, idx: np.ndarray) -> None:
        # Duplicate pages in one batch: numpy keeps the last assignment, fine.
        self._words[idx, 0] = np.arange(self.seq + 1, self.seq + 1 + idx.size, dtype=np.uint64)
        self.seq += int(idx.size)

    def get_state(self) -> dict[str, Any]:
        return super().get_state() | {"seq": self.seq}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        self.seq = int(state["seq"])


class HotsetWorkload(RandomWorkload):
    """90 % of the writes hit a hot set of 10 % of the pages."""

    name = "hotset"
    hot_fraction = 0.10
    hot_probability = 0.90

    def _pick(self, n: int) -> np.ndarray:
        hot = max(1, int(self.npages * self.hot_fraction))
        in_hot = self.rng.random(n) < self.hot_probability
        idx = self.rng.integers(0, self.npages, size=n, dtype=np.int64)
        idx[in_hot] = self.rng.integers(0, hot, size=int(in_hot.sum()), dtype=np.int64)
        return idx


class FillWorkload(IdleWorkload):
    """Boot fills all of RAM with non-zero data, then the guest idles."""

    name = "fill"

    def boot(self, mmu: Callable[[np.ndarray], None]) -> None:
        step = 4096  # pages per chunk (16 MiB of random data, reused)
        words = self.pages.view(np.uint64)
        base = self.rng.integers(1, 1 << 63, size=(min(step, self.npages), 512), dtype=np.int64).view(np.uint64)
        for start in range(0, self.npages, step):
            idx = np.arange(start, min(start + step, self.npages), dtype=np.int64)
            mmu(idx + self.gfn_base)
            chunk = words[start:start + idx.size]
            chunk[:] = base[:idx.size]
            chunk[:, 0] = idx.astype(np.uint64) + np.uint64(1)  # distinct, never zero


class StreamWorkload(Workload):
    """Repeated ascending passes over a working set of ``working_set`` pages.

    ``working_set`` defaults to :attr:`DEFAULT_FRACTION` of RAM; it travels
    in the state, so a destination that only knows the name resumes the
    same guest program.
    """

    name = "stream"
    DEFAULT_FRACTION = 0.75

    def __init__(self, pages: np.ndarray, *, seed: int = 0, gfn_base: int = 0,
                 working_set: int | None = None) -> None:
        super().__init__(pages, seed=seed, gfn_base=gfn_base)
        if working_set is None:
            working_set = max(1, int(self.npages * self.DEFAULT_FRACTION))
        if not 1 <= working_set <= self.npages:
            raise ValueError(f"stream working set {working_set} pages not in 1..{self.npages}")
        self.working_set = int(working_set)
        self.cursor = 0  # next page to write
        self.passes = 0  # completed passes over the working set
        self.seq = 0
        self._words = pages.view(np.uint64)  # (npages, 512)

    def next_pages(self, n: int) -> np.ndarray:
        n = min(n, self.working_set)  # never the same page twice in one batch
        return (np.arange(self.cursor, self.cursor + n, dtype=np.int64) % self.working_set)

    def store(self, idx: np.ndarray) -> None:
        # idx is one or two ascending runs (a wrap): slice stores.
        first, last, n = int(idx[0]), int(idx[-1]), int(idx.size)
        seqs = np.arange(self.seq + 1, self.seq + 1 + n, dtype=np.uint64)
        if last >= first:
            self._words[first:last + 1, 0] = seqs
        else:
            k = self.working_set - first
            self._words[first:self.working_set, 0] = seqs[:k]
            self._words[:last + 1, 0] = seqs[k:]
        self.seq += n
        end = self.cursor + n
        self.passes += end // self.working_set
        self.cursor = end % self.working_set

    def get_state(self) -> dict[str, Any]:
        return super().get_state() | {"cursor": self.cursor, "passes": self.passes, "seq": self.seq,
                                      "working_set": self.working_set}

    def set_state(self, state: dict[str, Any]) -> None:
        super().set_state(state)
        ws = int(state["working_set"])
        if not 1 <= ws <= self.npages:
            raise ValueError(f"stream working set {ws} pages does not fit in {self.npages} pages")
        self.working_set = ws
        self.cursor = int(state["cursor"])
        self.passes = int(state["passes"])
        self.seq = int(state["seq"])


_CLASSES: dict[str, type[Workload]] = {"stream": StreamWorkload, "fill": FillWorkload, "idle": IdleWorkload, "ab": ABWorkload, "random": RandomWorkload, "hotset": HotsetWorkload}


def parse_workload(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[,rate=PAGES_PER_S][,seed=N]`` -> (name, options)."""
    name, *opts = spec.split(",")
    if name not in _CLASSES:
        raise ValueError(f"unknown workload {name!r} (choose from {', '.join(WORKLOADS)})")
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep:
            raise ValueError(f"workload option {opt!r} is not KEY=VALUE")
        if key == "rate":
            options["rate"] = float(value)
            if options["rate"] <= 0:
                raise ValueError("workload rate must be > 0 pages/s")
        elif key == "seed":
            options["seed"] = int(value)
        else:
            raise ValueError(f"unknown workload option {key!r} (rate, seed)")
    return name, options


def make_workload(name: str, pages: np.ndarray, *, seed: int = 0, gfn_base: int = 0) -> Workload:
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}") from None
    return cls(pages, seed=seed, gfn_base=gfn_base)


def check_guests_ram(ram: np.ndarray, start: int = AB_START, end: int | None = None) -> int:
    """QEMU's ``check_guests_ram`` for the a-b test guest: the number of bad pages.

    ``ram`` is guest memory as uint8 (guest-physical address = index).  The
    one implementation (vectorised, with QEMU's loop beside it as the
    reference) lives with the real guest programs in
    :mod:`memory.kvm.real.guests.check`; the simulated ``ab`` workload writes the
    same pattern, so both are checked by the same rule.
    """
    from ..real.guests.check import check_guests_ram as _check

    return _check(ram, start, ram.size if end is None else end).bad
