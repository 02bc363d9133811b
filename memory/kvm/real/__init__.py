"""Real KVM through ioctls on ``/dev/kvm`` (:mod:`.real`), its vCPUs
(:mod:`.vcpu`) and the guest programs they run (:mod:`.guests`)."""

from .real import RealKVM, StatsReader, kvm_usable
from .vcpu import GuestPageWriter, RealMachine, RealVCPU, RealVCPUs, VCPUError, install_kick_handler

__all__ = ["GuestPageWriter", "RealKVM", "RealMachine", "RealVCPU", "RealVCPUs", "StatsReader", "VCPUError",
           "install_kick_handler", "kvm_usable"]
