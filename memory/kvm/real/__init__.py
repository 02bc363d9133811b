"""Real KVM through ioctls on ``/dev/kvm`` (:mod:`.real`), its vCPUs
(:mod:`.vcpu`), their state blob (:func:`validate_vcpu_states`) and the
guest programs they run (:mod:`.guests`)."""

from ._state import VCPUStateError, validate_vcpu_states
from .real import RealKVM, StatsReader, kvm_usable
from .vcpu import GuestPageWriter, KvmVCPUCounters, KvmVCPUStatistics, RealMachine, RealVCPU, RealVCPUs, VCPUError, install_kick_handler

__all__ = ["GuestPageWriter", "KvmVCPUCounters", "KvmVCPUStatistics", "RealKVM", "RealMachine", "RealVCPU", "RealVCPUs", "StatsReader", "VCPUError",
           "VCPUStateError", "install_kick_handler", "kvm_usable", "validate_vcpu_states"]
