"""KVM behind one small interface (:class:`KvmVM`), with two backends."""

from ._backend import (DirtyRingBackend, DirtyRingReaper, KvmStatistics, KvmVM, UserMemoryRegion, VCPUControllerStatistics,
                       VCPUCounters, kvm_statistics_dict)
from . import linux_kvm
from ._strict import exact_keys, int_in, strict_json
from .sim import SimKVM

__all__ = [
    "DirtyRingBackend",
    "DirtyRingReaper",
    "KvmStatistics",
    "KvmVM",
    "SimKVM",
    "UserMemoryRegion",
    "VCPUControllerStatistics",
    "VCPUCounters",
    "exact_keys",
    "int_in",
    "kvm_statistics_dict",
    "linux_kvm",
    "strict_json",
]

# real KVM (/dev/kvm): VM, vCPUs, test machine
from .real import RealKVM, kvm_usable  # noqa: E402
from .real import GuestPageWriter, RealMachine, RealVCPU, RealVCPUs, VCPUError  # noqa: E402

__all__ += ["RealKVM", "kvm_usable", "GuestPageWriter", "RealMachine", "RealVCPU", "RealVCPUs", "VCPUError"]

# QEMU's KVM glue (accel/kvm/kvm-all.c) and the simulated vCPU runner
from ._listener import DirtyLogMode, KVMListenerStatistics, KVMMemoryListener, KVMSlot, RegionSyncRule  # noqa: E402
from .sim import SimVCPUs  # noqa: E402

__all__ += ["DirtyLogMode", "KVMListenerStatistics", "KVMMemoryListener", "KVMSlot", "RegionSyncRule", "SimVCPUs"]
