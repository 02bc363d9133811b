"""KVM behind one small interface (:class:`KvmVM`), with two backends."""

from ._backend import KvmVM, UserMemoryRegion
from . import linux_kvm
from .simulated import SimKVM

__all__ = ["KvmVM", "SimKVM", "UserMemoryRegion", "linux_kvm"]

# real KVM (/dev/kvm): VM, vCPUs, test machine
from .real import RealKVM, kvm_usable  # noqa: E402
from .vcpu import GuestPageWriter, RealMachine, RealVCPU, RealVCPUs, VCPUError  # noqa: E402

__all__ += ["RealKVM", "kvm_usable", "GuestPageWriter", "RealMachine", "RealVCPU", "RealVCPUs", "VCPUError"]
