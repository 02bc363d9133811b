"""The one owner of the simulated KVM's shared-memory layout, its atomics and
its locks.

Why shared memory
=================

The simulated vCPUs are processes (:mod:`memory.kvm.sim._sim_vcpu_proc`): a
vCPU stores into guest RAM while the VMM process syncs dirty logs, exactly
as a KVM vCPU thread runs while QEMU's migration thread does.  So every
piece of state both sides touch lives in one ``memfd`` mapping
(``MAP_SHARED``) whose layout is described here and nowhere else: the
header (write-protect-all indicator, generations, ``mmu_lock``, the
memslot generation), the memslot table, the MMU tables of both address
spaces (sptes, per-table generation, ``possiable_writable_sptes``, table
ids and the sorted directory), per-vCPU control blocks (guest-mode
sequence, run/ack handshake, root-reload requests, SRCU read-side marker,
a state mailbox), per-actor statistics rows, and an arena from which each
memslot gets its rmap and dirty bitmap.  Guest RAM is not in this mapping:
it is the RAMBlock's own memfd (:class:`memory.RAMBlock`), mapped by the
vCPU processes at the same file offsets.

:func:`sim_layout` computes the same offsets from the same parameters in
every process; :class:`SharedState` creates the memfd (VMM) or maps an
inherited one (vCPU process) and hands out numpy views.  Nothing is ever
copied; the views alias the mapping.

Atomics: why libatomic through ctypes
=====================================

The kernel's lockless paths need three primitives on the shared mapping:
compare-and-exchange of an spte (``fast_pf_fix_direct_spte``), atomic OR
of a dirty-bitmap word (``set_bit_le``) and exchange of a word
(``xchg`` in ``kvm_get_dirty_log_protect``), plus fetch-and-not for
``KVM_CLEAR_DIRTY_LOG`` and fetch-add for sequence counters.  numpy has no
atomic read-modify-write; the standard library has none either.  GCC's
``libatomic.so.1`` (always present where GCC's runtime is; the lock-free
``__atomic_*_{1,8}`` entry points compile to ``lock cmpxchg`` / ``lock
or`` / ``xchg`` on x86-64) is reachable from :mod:`ctypes` with no build
step and no new dependency.  The PyPI package ``atomics`` wraps the same
kind of operations but is not installed here and would add a dependency
for four functions.  Cost, measured by ``tools/bench_vcpu.py --atomics``:
about 0.5-0.8 us per call on this host (ctypes call overhead dominates),
i.e. below the 1-2 us a hardware VM exit costs and far below the 35-90 us
of this nested host, so a per-fault Python step with one or two atomics is
still cheaper than the exit it models.  Bulk operations stay numpy; only
the words and sptes a lockless path may race on go through atomics.

Every atomic here is sequentially consistent (``__ATOMIC_SEQ_CST``); on
x86 a locked instruction is a full barrier, which the Dekker-style
handshakes below (guest mode vs TLB flush, SRCU marker vs memslot update)
rely on.

mmu_lock
========

A test-and-test-and-set spinlock on one shared word, with
``sched_yield`` between attempts (two cores are shared by everything
here: burning a core while the holder is descheduled would only measure
the scheduler).  The kernel's ``mmu_lock`` of 2017 was a spinlock too.
Waiters account the time they waited (``mmu_lock_wait_ns`` in their own
statistics row); holders account the hold time (``mmu_lock_hold_ns``).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

# ---------------------------------------------------------------------------
# atomics (libatomic through ctypes)
# ---------------------------------------------------------------------------
_SEQ_CST = 5
_lib = ctypes.CDLL("libatomic.so.1", use_errno=True)


def _fn(name: str, restype: type[Any] | None, *argtypes: type[Any]) -> Callable[..., Any]:
    f = _lib[name]
    f.restype = restype
    f.argtypes = argtypes
    return f


_vp, _u64, _u8, _int, _bool = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint8, ctypes.c_int, ctypes.c_bool
_cas1 = _fn("__atomic_compare_exchange_1", _bool, _vp, _vp, _u8, _bool, _int, _int)
_cas8 = _fn("__atomic_compare_exchange_8", _bool, _vp, _vp, _u64, _bool, _int, _int)
_or8 = _fn("__atomic_fetch_or_8", _u64, _vp, _u64, _int)
_and8 = _fn("__atomic_fetch_and_8", _u64, _vp, _u64, _int)
_add8 = _fn("__atomic_fetch_add_8", _u64, _vp, _u64, _int)
_xchg8 = _fn("__atomic_exchange_8", _u64, _vp, _u64, _int)
_load8 = _fn("__atomic_load_8", _u64, _vp, _int)
_store8 = _fn("__atomic_store_8", None, _vp, _u64, _int)
_MASK64 = (1 << 64) - 1


class _Expected(ctypes.Structure):
    _fields_ = [("v8", ctypes.c_uint64)]


_exp = _Expected()
_exp_addr = ctypes.addressof(_exp)


def cas1(addr: int, expected: int, desired: int) -> bool:
    """``cmpxchg`` of one byte at ``addr``: True if it held ``expected``."""
    _exp.v8 = expected
    return bool(_cas1(addr, _exp_addr, desired, False, _SEQ_CST, _SEQ_CST))


def cas8(addr: int, expected: int, desired: int) -> bool:
    _exp.v8 = expected & _MASK64
    return bool(_cas8(addr, _exp_addr, desired & _MASK64, False, _SEQ_CST, _SEQ_CST))


def fetch_or8(addr: int, value: int) -> int:
    return int(_or8(addr, value & _MASK64, _SEQ_CST))


def fetch_and8(addr: int, value: int) -> int:
    return int(_and8(addr, value & _MASK64, _SEQ_CST))


def fetch_add8(addr: int, value: int) -> int:
    return int(_add8(addr, value & _MASK64, _SEQ_CST))


def xchg8(addr: int, value: int) -> int:
    return int(_xchg8(addr, value & _MASK64, _SEQ_CST))


def load8(addr: int) -> int:
    return int(_load8(addr, _SEQ_CST))


def store8(addr: int, value: int) -> None:
    _store8(addr, value & _MASK64, _SEQ_CST)


def full_fence() -> None:
    """A locked instruction on a private word: a full barrier on x86."""
    _add8(_exp_addr, 0, _SEQ_CST)


# --- futex (FUTEX_WAIT / FUTEX_WAKE on a shared word) -----------------------
_libc = ctypes.CDLL(None, use_errno=True)
_SYS_futex = 202  # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout_s: float) -> None:
    """Sleep while the (low 32 bits of the) word at ``addr`` equals ``expected``
    (at most ``timeout_s``).  Returns at once if it no longer does: the
    kernel compares the word and queues the waiter atomically with respect
    to :func:`futex_wake`, so a change made after the caller read
    ``expected`` is never slept through, as long as the changer changes
    *this* word before waking it."""
    ts = _Timespec(int(timeout_s), int((timeout_s % 1) * 1e9))
    _libc.syscall(_SYS_futex, ctypes.c_void_p(addr), _FUTEX_WAIT, ctypes.c_uint32(expected & 0xFFFFFFFF),
                  ctypes.byref(ts), None, 0)


def futex_wake(addr: int) -> None:
    _libc.syscall(_SYS_futex, ctypes.c_void_p(addr), _FUTEX_WAKE, 0x7FFFFFFF, None, None, 0)


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------
#: header words (int64)
H_INDICATOR, H_WP_EPOCH, H_MANUAL, H_SLOTS_GEN, H_MMU_LOCK, H_DIR_SEQ, H_ARENA_TOP, H_SERIAL = range(8)
H_COST_FAST, H_COST_MAP, H_COST_PUSH, H_VMM_PID, H_PML, H_NR_MEMSLOTS, H_FAULT_ORDER, H_RING_SIZE = range(8, 16)
#: H_FAULT_ORDER values: the correct order of the fault paths, and the
#: broken ones the ordering rules forbid (mutations for the tests, shared
#: so the vCPU processes run them too): the dirty bit before the spte is
#: writable (rule 1), the dirty bit before the rmap add (rule 2), a
#: push-down that makes the upper entry writable before it protects the
#: child table (rule 6)
FAULT_ORDERS = ("spte_first", "dirty_first", "dirty_before_rmap", "upper_first")
H_WORDS = 32

#: memslot table columns (int64)
(S_USED, S_SLOT, S_BASE, S_NPAGES, S_FLAGS, S_LOGGING, S_HOST_BUF, S_HOST_OFF, S_RMAP_OFF, S_DIRTY_OFF,
 S_SNAPSHOT_AT, S_SERIAL, S_HVA) = range(13)
S_COLS = 16
MAX_SLOT_ENTRIES = 512
#: S_USED values: free, valid, invalid (being moved or deleted: accesses retry)
SLOT_FREE, SLOT_VALID, SLOT_INVALID = 0, 1, 2
#: host buffer table columns: fd (in the VMM, inherited at the same number), size
B_FD, B_SIZE = range(2)
MAX_HOST_BUFS = 16

#: per-vCPU control words (int64)
#: C_GUEST_SEQ: odd while the vCPU is in guest mode (may store to RAM)
#: C_RUN: what the VMM wants, an epoch (odd: run, even: stop); C_ACK: the
#: vCPU's answer (the C_RUN epoch it has obeyed; even: stopped, nothing in flight)
#: C_CMD / C_CMD_ACK: mailbox commands while stopped; C_MBOX_LEN: bytes
#: C_SRCU: memslot generation the vCPU's current access uses (0: none)
#: C_DOORBELL: bumped by the VMM after every change of C_RUN or C_CMD; the
#: one word every vCPU wait sleeps on (see :mod:`._sim_vcpu_proc`)
(C_GUEST_SEQ, C_RUN, C_ACK, C_CMD, C_CMD_ACK, C_MBOX_LEN, C_SRCU, C_THROTTLE, C_RELOAD, C_PID, C_ALIVE,
 C_ERROR, C_RING_PUSH, C_RING_RESET, C_RING_FETCH, C_RING_FULL, C_DOORBELL) = range(17)
#: the dirty ring (per vCPU): C_RING_PUSH = entries the vCPU published
#: (dirty_index), C_RING_RESET = entries KVM_RESET_DIRTY_RINGS recycled
#: (reset_index), C_RING_FETCH = entries userspace harvested, C_RING_FULL =
#: 1 while the vCPU waits in a KVM_EXIT_DIRTY_RING_FULL exit
#: ring entry columns: flags (KVM_DIRTY_GFN_F_*), slot, offset
R_FLAGS, R_SLOT, R_OFFSET = range(3)
#: KVM_DIRTY_RING_RSVD_ENTRIES: a ring this close to full is "soft full"
RING_RSVD_ENTRIES = 64
C_WORDS = 32
MBOX_BYTES = 1 << 16

#: statistics of one actor (a vCPU, or the VMM in the last row)
STAT_NAMES = (
    "sptes_write_protected",
    "sptes_dirty_cleared",
    "sptes_zapped",
    "faults_fast",
    "faults_push_down",
    "faults_map",
    "pml_logged",
    "pages_marked_dirty",
    "tables_created",
    "tlb_flushes",
    "mmu_lock_acquisitions",
    "mmu_lock_hold_ns",
    "root_reloads",
    "dirty_log_calls",
    "clear_dirty_log_calls",
    "write_protect_all_calls",
)
#: per-vCPU extras (not part of the VM's statistics())
VCPU_STAT_NAMES = (
    "pages_written",
    "mmu_lock_wait_ns",
    "fault_cost_ns",
    "fast_pf_cas_failed",
    "guest_entries",
    "store_retries",
    "batches",
    "run_ns",
    "throttle_sleep_ns",
    "tlb_flush_wait_ns",
    "mmio_exits",
    "ring_full_exits",
)
ALL_STATS = STAT_NAMES + VCPU_STAT_NAMES
STAT_INDEX = {n: i for i, n in enumerate(ALL_STATS)}

SPTE_ENT_NR = 512
ADDRESS_SPACES = 2


@dataclass(frozen=True)
class Params:
    """What determines the layout (sent to every vCPU process)."""

    nr_vcpus: int = 1
    l1_rows: int = 1 << 14
    l2_rows: int = 1 << 10
    l3_rows: int = 64
    arena_bytes: int = 1 << 30
    #: largest dirty ring (entries per vCPU) the VM may enable; 0: none
    ring_entries: int = 0

    def rows(self, level: int) -> int:
        return {1: self.l1_rows, 2: self.l2_rows, 3: self.l3_rows, 4: 1}[level]


@dataclass(frozen=True)
class Field:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def sim_layout(p: Params) -> tuple[dict[str, Field], int]:
    """Every shared array: name -> (dtype, shape, offset); total size."""
    fields: dict[str, Field] = {}
    off = 0

    def add(name: str, dtype: str, shape: tuple[int, ...]) -> None:
        nonlocal off
        f = Field(name, dtype, shape, off)
        fields[name] = f
        off = (off + f.nbytes + 4095) & ~4095  # page aligned: sparse, no false sharing

    add("hdr", "int64", (H_WORDS,))
    add("slots", "int64", (MAX_SLOT_ENTRIES, S_COLS))
    add("bufs", "int64", (MAX_HOST_BUFS, 2))
    add("level_n", "int64", (ADDRESS_SPACES, 5))
    add("vcpu_ctl", "int64", (p.nr_vcpus, C_WORDS))
    add("reload", "int64", (p.nr_vcpus,))
    add("mbox", "uint8", (p.nr_vcpus, MBOX_BYTES))
    add("ring", "int64", (p.nr_vcpus, max(p.ring_entries, 1), 3))
    # one row per vCPU + one for the VMM (each process writes its own rows)
    add("stats", "int64", (p.nr_vcpus + 1, len(ALL_STATS)))
    for as_id in range(ADDRESS_SPACES):
        for level in range(1, 5):
            rows = p.rows(level)
            pre = f"mmu{as_id}_l{level}_"
            add(pre + "ent", "uint8", (rows, SPTE_ENT_NR))
            for col in ("gen", "pwc", "tid", "ids", "rows_of"):
                add(pre + col, "int64", (rows,))
    add("arena", "uint8", (p.arena_bytes,))
    return fields, off


class SharedState:
    """The mapping plus named numpy views of it.  ``create`` in the VMM,
    ``attach`` in a vCPU process (the memfd inherited at the same fd)."""

    def __init__(self, params: Params, fd: int, *, owner: bool) -> None:
        self.params = params
        self.fields, self.size = sim_layout(params)
        self.fd = fd
        self.owner = owner
        self._mmap = mmap.mmap(fd, self.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.base = np.frombuffer(self._mmap, dtype=np.uint8)
        self.addr0 = int(self.base.ctypes.data)
        self.views: dict[str, np.ndarray] = {}
        for f in self.fields.values():
            self.views[f.name] = self.base[f.offset : f.offset + f.nbytes].view(f.dtype).reshape(f.shape)

    @classmethod
    def create(cls, params: Params) -> SharedState:
        fd = os.memfd_create("migrator-simkvm", 0)  # inheritable only through pass_fds
        _, size = sim_layout(params)
        os.ftruncate(fd, size)
        st = cls(params, fd, owner=True)
        import weakref

        weakref.finalize(st, os.close, fd)
        return st

    @classmethod
    def attach(cls, params: Params, fd: int) -> SharedState:
        return cls(params, fd, owner=False)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]

    def addr(self, name: str, index: int = 0) -> int:
        """Address of element ``index`` (flat) of the array ``name``."""
        v = self.views[name]
        return self.addr0 + self.fields[name].offset + index * v.itemsize

    def arena_alloc(self, nbytes: int) -> int:
        """Bump-allocate ``nbytes`` (64-byte aligned, zeroed) from the arena;
        returns the offset.  Caller serialises (memslot changes)."""
        hdr = self.views["hdr"]
        top = int(hdr[H_ARENA_TOP])
        need = (int(nbytes) + 63) & ~63
        if top + need > self.params.arena_bytes:
            import errno

            raise OSError(errno.ENOMEM, f"ENOMEM: simulated KVM arena exhausted ({self.params.arena_bytes} bytes)")
        hdr[H_ARENA_TOP] = top + need
        return top

    def arena_view(self, off: int, dtype: str, count: int) -> np.ndarray:
        a = self.views["arena"]
        n = count * np.dtype(dtype).itemsize
        return a[off : off + n].view(dtype)


class SharedWord:
    """A property backed by one int64 word of a shared array that the
    owning object holds in attribute ``array`` (``self.row[S_BASE]``...)."""

    def __init__(self, array: str, index: int, doc: str = "") -> None:
        self.array = array
        self.index = index
        self.__doc__ = doc

    @overload
    def __get__(self, obj: None, owner: type[object] | None = None) -> SharedWord: ...

    @overload
    def __get__(self, obj: object, owner: type[object] | None = None) -> int: ...

    def __get__(self, obj: object, owner: type[object] | None = None) -> SharedWord | int:
        if obj is None:
            return self
        return int(getattr(obj, self.array)[self.index])

    def __set__(self, obj: object, value: int) -> None:
        getattr(obj, self.array)[self.index] = value


class StatRow:
    """``stats["faults_fast"] += 1`` on the shared row of the current actor."""

    __slots__ = ("_all", "row")

    def __init__(self, table: np.ndarray, row: int) -> None:
        self._all = table
        self.row = row

    def __getitem__(self, name: str) -> int:
        return int(self._all[self.row, STAT_INDEX[name]])

    def __setitem__(self, name: str, value: int) -> None:
        self._all[self.row, STAT_INDEX[name]] = value


class MmuLock:
    """kvm->mmu_lock: a spinlock on one shared word (see the module essay).

    Acquisitions are counted by the callers (one per simulated slow-path
    fault or ioctl critical section, as the kernel would take it); the lock
    accounts wait and hold time.  Not re-entrant."""

    __slots__ = ("addr", "stats", "_t0", "_who")

    def __init__(self, state: SharedState, stats: StatRow) -> None:
        self.addr = state.addr("hdr", H_MMU_LOCK)
        self.stats = stats
        self._t0 = 0
        self._who = os.getpid()

    def acquire(self) -> None:
        if not cas8(self.addr, 0, self._who):
            t0 = time.perf_counter_ns()
            while True:
                os.sched_yield()
                if load8(self.addr) == 0 and cas8(self.addr, 0, self._who):
                    break
            self.stats["mmu_lock_wait_ns"] += time.perf_counter_ns() - t0
        self._t0 = time.perf_counter_ns()

    def release(self) -> None:
        self.stats["mmu_lock_hold_ns"] += time.perf_counter_ns() - self._t0
        store8(self.addr, 0)

    def held(self) -> bool:
        return load8(self.addr) != 0

    def __enter__(self) -> MmuLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
