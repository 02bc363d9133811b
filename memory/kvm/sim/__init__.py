"""The simulated KVM: the MMU and memslots in shared memory
(:mod:`.simulated`, :mod:`._sim_shm`), the vCPU processes
(:mod:`.sim_vcpu`, :mod:`._sim_vcpu_proc`) and the guest programs they run
(:mod:`.workloads`)."""

from ._sim_vcpu_proc import vcpu_range
from .sim_vcpu import SimVCPUCounters, SimVCPUStatistics, SimVCPUs
from .simulated import SimKVM

__all__ = ["SimKVM", "SimVCPUCounters", "SimVCPUStatistics", "SimVCPUs", "vcpu_range"]
