"""Real KVM through ``/dev/kvm``: :class:`RealKVM` implements :class:`KvmVM`.

Pure Python: ``fcntl.ioctl`` with the structs of :mod:`linux_kvm`, numpy
views for bitmaps and for the dirty rings (``mmap`` of each vCPU fd).

GIL (reference/kvm.md pitfall 3): ``fcntl.ioctl`` releases the GIL for an
int argument and for an immutable buffer of at most 1024 bytes (which it
copies).  Every hot ioctl here passes either an int or a small struct whose
``dirty_bitmap`` *pointer* designates the numpy bitmap, so a vCPU thread in
``KVM_RUN`` and the migration thread in ``KVM_GET_DIRTY_LOG`` run in
parallel.

Errors are the kernel's: ``fcntl.ioctl`` raises ``OSError(errno)``.  Two
checks happen before an ioctl, because the kernel would *not* fail:

* ``get_dirty_log(flags != 0)``: the 2017 series' ``flags`` field is
  mainline's ``padding1``, which ``KVM_GET_DIRTY_LOG`` ignores.  Passing
  ``KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT`` would therefore silently
  write-protect anyway; we raise ``EINVAL`` (what a kernel validating the
  field would return) so a caller can never believe it got a
  non-protecting fetch.
* bitmaps and host views that are too small raise ``OSError(EFAULT)`` (as
  the simulated KVM does): the real kernel would write past the buffer (or
  map foreign memory) instead of failing.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ... import popcount
from .. import linux_kvm as K
from .._backend import KvmStatistics, UserMemoryRegion

if TYPE_CHECKING:
    from ._vcpu_fd import RealVCPU

PAGE_SIZE = 4096
KVM_DEV = "/dev/kvm"


def _ioctl_int(fd: int, request: int, arg: int = 0) -> int:
    return fcntl.ioctl(fd, request, arg)


def get_cpuid2(fd: int, request: int) -> bytes:
    """A ``struct kvm_cpuid2`` filling ioctl (KVM_GET_SUPPORTED_CPUID on
    /dev/kvm, KVM_GET_CPUID2 on a vCPU): retried with a larger array on E2BIG;
    returns the header and the ``nent`` entries the kernel wrote."""
    nent = 64
    while True:
        buf = bytearray(K.KVM_CPUID2_HEADER_SIZE + nent * 40)
        struct.pack_into("<I", buf, 0, nent)
        try:
            fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise
        n = struct.unpack_from("<I", buf, 0)[0]
        return bytes(buf[: K.KVM_CPUID2_HEADER_SIZE + n * 40])


class StatsReader:
    """``KVM_GET_STATS_FD`` binary statistics of a VM or vCPU fd.

    Layout (api.rst): a 24-byte header (flags, name_size, num_desc,
    id_offset, desc_offset, data_offset), ``num_desc`` descriptors of
    ``16 + name_size`` bytes (flags u32, exponent s16, size u16, offset u32,
    bucket_size u32, name), and the u64 values at ``data_offset +
    desc.offset``.  Only scalar stats (size 1) are returned.
    """

    def __init__(self, owner_fd: int) -> None:
        self.fd = _ioctl_int(owner_fd, K.KVM_GET_STATS_FD, 0)
        hdr = os.pread(self.fd, K.KVM_STATS_HEADER_SIZE, 0)
        _flags, name_size, num_desc, _id_off, desc_off, self.data_offset = struct.unpack("<6I", hdr)
        dsz = K.KVM_STATS_DESC_SIZE + name_size
        raw = os.pread(self.fd, dsz * num_desc, desc_off)
        self.names: list[str] = []
        offsets: list[int] = []
        end = 0
        for i in range(num_desc):
            _f, _exp, size, offset, _bucket = struct.unpack_from("<IhHII", raw, i * dsz)
            end = max(end, offset + 8 * size)
            if size != 1:
                continue
            name = raw[i * dsz + K.KVM_STATS_DESC_SIZE : (i + 1) * dsz].split(b"\0", 1)[0].decode()
            self.names.append(name)
            offsets.append(offset // 8)
        self._idx = np.array(offsets, dtype=np.intp)
        self._data_bytes = end

    def read(self) -> dict[str, int]:
        data = np.frombuffer(os.pread(self.fd, self._data_bytes, self.data_offset), dtype=np.uint64)
        return dict(zip(self.names, (int(v) for v in data[self._idx])))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Slot:
    region: UserMemoryRegion
    npages: int


class _Ring:
    """One vCPU's dirty ring: ``struct kvm_dirty_gfn[]`` mmapped from the vCPU
    fd at ``KVM_DIRTY_LOG_PAGE_OFFSET`` pages, plus our fetch index."""

    def __init__(self, vcpu_fd: int, entries: int) -> None:
        nbytes = entries * K.KVM_DIRTY_GFN_SIZE
        self.map = mmap.mmap(vcpu_fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                             offset=K.KVM_DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE)
        self.gfns = np.frombuffer(self.map, dtype=np.dtype(K.KVM_DIRTY_GFN_DTYPE))
        self.entries = entries
        self.fetch_index = 0  # free-running, like kvm_fetch_index in QEMU

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """Collect the published entries from the fetch index on, in ring order,
        and mark them RESET (the kernel recycles them at KVM_RESET_DIRTY_RINGS).

        Ordering: the kernel writes slot/offset, then flags=DIRTY with release
        semantics; x86 is TSO, so once our (earlier) read of ``flags`` sees
        DIRTY, the later reads of slot/offset see the entry.  Collection stops
        at the first entry that is not exactly DIRTY (``dirty_gfn_is_dirtied``
        in dirty_log_test.c).
        """
        n = self.entries
        start = self.fetch_index % n
        flags = self.gfns["flags"]
        window = np.concatenate((flags[start:], flags[:start]))
        stop = np.flatnonzero(window != K.KVM_DIRTY_GFN_F_DIRTY)
        count = int(stop[0]) if len(stop) else n
        if count == 0:
            return _EMPTY_U32, _EMPTY_U64
        idx = np.arange(start, start + count) % n
        slots = self.gfns["slot"][idx]
        offsets = self.gfns["offset"][idx]
        flags[idx] = K.KVM_DIRTY_GFN_F_RESET
        self.fetch_index += count
        return slots, offsets

    def close(self) -> None:
        self.gfns = None  # type: ignore[assignment]
        try:
            self.map.close()
        except BufferError:
            pass


_EMPTY_U32 = np.zeros(0, dtype=np.uint32)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)


class RealKVM:
    """A VM on ``/dev/kvm`` implementing :class:`memory.kvm.KvmVM`.

    Memslots are created by whoever owns the memory map (the KVM memory
    listener, or a test) through :meth:`set_user_memory_region`; vCPUs
    (:class:`memory.kvm.real.vcpu.RealVCPU`) register themselves so that their
    dirty rings and statistics are reachable from here.

    Dirty ring: :meth:`enable_dirty_ring` before the first vCPU;
    :meth:`harvest_dirty_rings` / :meth:`reset_dirty_rings` mirror
    ``kvm_dirty_ring_reap_locked``.  Harvests are serialised by a lock,
    since both a vCPU thread (on ``KVM_EXIT_DIRTY_RING_FULL``) and the
    migration thread reap.
    """

    page_size = PAGE_SIZE

    def __init__(self, dev: str = KVM_DEV) -> None:
        self.kvm_fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        self.fd = -1
        try:
            api = _ioctl_int(self.kvm_fd, K.KVM_GET_API_VERSION)
            if api != K.KVM_API_VERSION:
                raise OSError(errno.EINVAL, f"KVM API version {api}, need {K.KVM_API_VERSION}")
            self.fd = _ioctl_int(self.kvm_fd, K.KVM_CREATE_VM, 0)
            self.vcpu_mmap_size = _ioctl_int(self.kvm_fd, K.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise
        self._slots: dict[int, _Slot] = {}
        self.vcpus: list[RealVCPU] = []  # in creation order
        self._rings: list[_Ring] = []
        self.dirty_ring_entries = 0
        self.ring_lock = threading.Lock()
        #: entries reaped by a vCPU thread on RING_FULL, returned by the next harvest
        self._ring_stash: list[tuple[np.ndarray, np.ndarray]] = []
        self._vm_stats: StatsReader | None = None
        self._counters = dict.fromkeys(
            (
                "fetch_calls", "fetch_ns", "fetch_dirty_pages",
                "clear_calls", "clear_ns", "clear_pages",
                "harvest_calls", "harvest_ns", "harvest_entries",
                "reset_calls", "reset_ns", "reset_entries",
                "ring_full_reaps",
            ),
            0,
        )

    # ------------------------------------------------------------ system
    def system_check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on ``/dev/kvm``."""
        return _ioctl_int(self.kvm_fd, K.KVM_CHECK_EXTENSION, cap)

    def get_supported_cpuid(self) -> bytes:
        """``struct kvm_cpuid2`` with every supported leaf (for KVM_SET_CPUID2)."""
        return get_cpuid2(self.kvm_fd, K.KVM_GET_SUPPORTED_CPUID)

    def get_msr_index_list(self) -> list[int]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs to migrate."""
        hdr = bytearray(struct.pack("<I", 0))
        try:
            fcntl.ioctl(self.kvm_fd, K.KVM_GET_MSR_INDEX_LIST, hdr, True)
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
        n = struct.unpack_from("<I", hdr, 0)[0]
        buf = bytearray(struct.pack("<I", n) + bytes(4 * n))
        fcntl.ioctl(self.kvm_fd, K.KVM_GET_MSR_INDEX_LIST, buf, True)
        n = struct.unpack_from("<I", buf, 0)[0]
        return list(struct.unpack_from(f"<{n}I", buf, 4))

    # ------------------------------------------------------------ KvmVM
    def check_extension(self, cap: int) -> int:
        """``KVM_CHECK_EXTENSION`` on the VM fd (what kvm-all.c asks)."""
        return _ioctl_int(self.fd, K.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int) -> None:
        if len(args) > 4:
            raise OSError(errno.EINVAL, "KVM_ENABLE_CAP takes at most 4 args")
        ec = K.kvm_enable_cap(cap=cap, flags=0)
        for i, a in enumerate(args):
            ec.args[i] = a
        fcntl.ioctl(self.fd, K.KVM_ENABLE_CAP, bytes(ec))

    def set_user_memory_region(self, region: UserMemoryRegion) -> None:
        if region.memory_size:
            host = region.host
            if host is None or not host.flags.c_contiguous or host.nbytes < region.memory_size:
                raise OSError(errno.EFAULT, f"slot {region.slot}: host view must be a contiguous buffer of "
                              f"at least {region.memory_size} bytes")
        r = K.kvm_userspace_memory_region(
            slot=region.slot, flags=region.flags, guest_phys_addr=region.guest_phys_addr,
            memory_size=region.memory_size, userspace_addr=region.userspace_addr,
        )
        fcntl.ioctl(self.fd, K.KVM_SET_USER_MEMORY_REGION, bytes(r))
        if region.memory_size:
            self._slots[region.slot] = _Slot(region, region.memory_size // PAGE_SIZE)
        else:
            self._slots.pop(region.slot, None)

    def slot_npages(self, slot: int) -> int | None:
        s = self._slots.get(slot)
        return None if s is None else s.npages

    @staticmethod
    def _check_bitmap(bitmap: np.ndarray, nbits: int, what: str) -> None:
        words = (nbits + 63) // 64
        if bitmap.dtype != np.uint64 or not bitmap.flags.c_contiguous or bitmap.size < words:
            raise OSError(errno.EFAULT, f"{what}: need a contiguous uint64 bitmap of >= {words} words, got "
                          f"{bitmap.dtype} x {bitmap.size}")

    def get_dirty_log(self, slot: int, bitmap: np.ndarray, flags: int = 0) -> None:
        """``KVM_GET_DIRTY_LOG``: copy the slot's bitmap into ``bitmap`` and, unless
        manual protect is enabled, clear it and write-protect the dirty pages in the
        same ioctl (so every write after the copy faults and is logged again)."""
        if flags:
            raise OSError(errno.EINVAL, f"KVM_GET_DIRTY_LOG flags {flags:#x}: not supported by this kernel "
                          "(the 2017 KVM_DIRTY_LOG_WITHOUT_WRITE_PROTECT was never merged)")
        s = self._slots.get(slot)
        if s is not None:
            if not bitmap.flags.writeable:
                raise OSError(errno.EFAULT, "bitmap is read-only")
            self._check_bitmap(bitmap, s.npages, "KVM_GET_DIRTY_LOG")
        else:
            bitmap = np.zeros(1, np.uint64)  # the kernel answers ENOENT before writing
        t0 = time.perf_counter_ns()
        fcntl.ioctl(self.fd, K.KVM_GET_DIRTY_LOG, struct.pack("<IIQ", slot, 0, bitmap.ctypes.data))
        c = self._counters
        c["fetch_ns"] += time.perf_counter_ns() - t0
        c["fetch_calls"] += 1
        c["fetch_dirty_pages"] += popcount(bitmap)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: np.ndarray) -> None:
        """``KVM_CLEAR_DIRTY_LOG`` (manual protect): clear the set bits of ``bitmap``
        (bit 0 = ``first_page``) and write-protect those pages.  The kernel
        requires ``first_page`` % 64 == 0 and ``num_pages`` % 64 == 0 unless the
        range ends at the end of the slot (EINVAL otherwise)."""
        self._check_bitmap(bitmap, num_pages, "KVM_CLEAR_DIRTY_LOG")
        t0 = time.perf_counter_ns()
        fcntl.ioctl(self.fd, K.KVM_CLEAR_DIRTY_LOG,
                    struct.pack("<IIQQ", slot, num_pages, first_page, bitmap.ctypes.data))
        c = self._counters
        c["clear_ns"] += time.perf_counter_ns() - t0
        c["clear_calls"] += 1
        c["clear_pages"] += num_pages

    def write_protect_all(self, enable: bool) -> None:
        """``KVM_WRITE_PROTECT_ALL_MEM`` (2017 series, never merged): the real
        kernel answers ENOTTY on a VM fd, surfaced as ``OSError(ENOTTY)``."""
        _ioctl_int(self.fd, K.KVM_WRITE_PROTECT_ALL_MEM, int(bool(enable)))

    # ------------------------------------------------------------ dirty ring
    def enable_dirty_ring(self, size_entries: int) -> int:
        """Enable the per-vCPU dirty ring (before any vCPU exists).

        Uses ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` when offered (as QEMU does),
        else ``KVM_CAP_DIRTY_LOG_RING``; ``args[0]`` is the ring size in bytes.
        Returns the capability enabled.
        """
        if size_entries <= 0 or size_entries & (size_entries - 1):
            raise OSError(errno.EINVAL, f"dirty ring size {size_entries} is not a power of two")
        cap = K.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        if not self.check_extension(cap):
            cap = K.KVM_CAP_DIRTY_LOG_RING
        max_bytes = self.check_extension(cap)
        nbytes = size_entries * K.KVM_DIRTY_GFN_SIZE
        if not max_bytes:
            raise OSError(errno.EINVAL, "dirty ring not supported by this kernel")
        if nbytes > max_bytes:
            raise OSError(errno.EINVAL, f"dirty ring of {nbytes} bytes > kernel maximum {max_bytes}")
        self.enable_cap(cap, nbytes)
        self.dirty_ring_entries = size_entries
        return cap

    def _register_vcpu(self, vcpu: RealVCPU) -> None:
        """Called by RealVCPU after KVM_CREATE_VCPU."""
        self.vcpus.append(vcpu)
        if self.dirty_ring_entries:
            self._rings.append(_Ring(vcpu.fd, self.dirty_ring_entries))

    def harvest_dirty_rings(self) -> tuple[np.ndarray, np.ndarray]:
        """Collect every vCPU's published entries: ``(slots, offsets)``.

        ``slots`` are uint32 ``slot | as_id << 16``; ``offsets`` are page
        indices in the slot (uint64), in ring order per vCPU.  Entries reaped
        earlier by a vCPU thread on ring-full (already reset) come first.
        The caller must :meth:`reset_dirty_rings` before it reads the pages.
        """
        with self.ring_lock:
            return self._harvest_locked()

    def _harvest_locked(self) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter_ns()
        fresh = [ring.harvest() for ring in self._rings]
        parts = self._ring_stash + fresh
        self._ring_stash = []
        if parts:
            slots = np.concatenate([p[0] for p in parts])
            offsets = np.concatenate([p[1] for p in parts])
        else:
            slots, offsets = _EMPTY_U32, _EMPTY_U64
        c = self._counters
        c["harvest_ns"] += time.perf_counter_ns() - t0
        c["harvest_calls"] += 1
        c["harvest_entries"] += sum(len(p[1]) for p in fresh)
        return slots, offsets

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-protect the pages of every entry marked
        RESET and recycle the entries; returns the number reset."""
        t0 = time.perf_counter_ns()
        n = _ioctl_int(self.fd, K.KVM_RESET_DIRTY_RINGS, 0)
        c = self._counters
        c["reset_ns"] += time.perf_counter_ns() - t0
        c["reset_calls"] += 1
        c["reset_entries"] += n
        return n

    def reap_dirty_rings(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Harvest then reset under the ring lock (QEMU's
        ``kvm_dirty_ring_reap_locked``): ``(slots, offsets, reset_count)``."""
        with self.ring_lock:
            slots, offsets = self._harvest_locked()
            return slots, offsets, self.reset_dirty_rings()

    def reap_into_stash(self) -> int:
        """Default ring-full handler: harvest + reset now (so the vCPU can go on)
        and keep the entries for the next :meth:`harvest_dirty_rings`."""
        with self.ring_lock:
            slots, offsets = self._harvest_locked()
            n = self.reset_dirty_rings()
            if len(offsets):
                self._ring_stash.append((slots, offsets))
            self._counters["ring_full_reaps"] += 1
            return n

    # ------------------------------------------------------------ stats
    def statistics(self) -> KvmStatistics:
        """Our counters (``fetch_*``, ``clear_*``, ``harvest_*``, ``reset_*``:
        calls, ns, pages/entries) plus the kernel's binary stats: VM stats as
        ``kvm_vm.<name>``, vCPU stats summed over vCPUs as ``kvm_vcpu.<name>``,
        and the common ones (``pf_fixed``, ``exits``...) without prefix."""
        out = dict(self._counters)
        out["memslots"] = len(self._slots)
        out["vcpus"] = len(self.vcpus)
        try:
            if self._vm_stats is None:
                self._vm_stats = StatsReader(self.fd)
            for k, v in self._vm_stats.read().items():
                out[f"kvm_vm.{k}"] = v
        except OSError:
            pass
        sums: dict[str, int] = {}
        for vcpu in self.vcpus:
            for k, v in vcpu.kernel_stats().items():
                sums[k] = sums.get(k, 0) + v
        for k, v in sums.items():
            out[f"kvm_vcpu.{k}"] = v
        for k in ("pf_fixed", "pf_taken", "exits", "io_exits", "halt_exits", "insn_emulation", "signal_exits"):
            if k in sums:
                out[k] = sums[k]
        return KvmStatistics(out)

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        for vcpu in list(getattr(self, "vcpus", [])):
            vcpu.close()
        for ring in getattr(self, "_rings", []):
            ring.close()
        self._rings = []
        vm_stats = getattr(self, "_vm_stats", None)
        if vm_stats is not None:
            vm_stats.close()
            self._vm_stats = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.kvm_fd >= 0:
            os.close(self.kvm_fd)
            self.kvm_fd = -1
        self._slots = {}

    def __enter__(self) -> RealKVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_usable_cache: tuple[bool, str] | None = None


def kvm_usable() -> tuple[bool, str]:
    """``(True, "")`` when ``/dev/kvm`` can create a VM and a vCPU here,
    else ``(False, reason)`` (for ``pytest.skip``).  Cached."""
    global _usable_cache
    if _usable_cache is not None:
        return _usable_cache
    if not os.path.exists(KVM_DEV):
        _usable_cache = (False, f"{KVM_DEV} does not exist")
        return _usable_cache
    try:
        with RealKVM() as vm:
            fd = _ioctl_int(vm.fd, K.KVM_CREATE_VCPU, 0)
            os.close(fd)
            if not vm.check_extension(K.KVM_CAP_IMMEDIATE_EXIT):
                _usable_cache = (False, "KVM_CAP_IMMEDIATE_EXIT missing")
                return _usable_cache
    except OSError as e:
        _usable_cache = (False, f"{KVM_DEV} unusable: {e}")
        return _usable_cache
    _usable_cache = (True, "")
    return _usable_cache
