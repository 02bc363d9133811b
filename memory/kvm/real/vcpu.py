"""Real vCPUs, one import path for all of them (re-exports).

:class:`RealVCPU` (one vCPU fd) is in :mod:`._vcpu_fd`; :class:`RealVCPUs`
(the vCPU threads, stop/kick, throttle, state save/load, statistics) in
:mod:`._control`; the state blob's format and its one validator
:func:`validate_vcpu_states` in :mod:`._state`; :class:`RealMachine`,
:func:`create_vcpus` and :class:`GuestPageWriter` in :mod:`._machine`.
"""

from ._control import DEFAULT_STOP_NS, STOP_HISTORY, THROTTLE_TIMESLICE_S, KvmVCPUCounters, KvmVCPUStatistics, RealVCPUs
from ._machine import GuestPageWriter, RealMachine, create_vcpus
from ._state import (STATE_MAGIC, STATE_SECTIONS, VCPUStateError, VCPUStateImage, VCPUStateRecord,
                     encode_vcpu_states, validate_vcpu_states)
from ._vcpu_fd import RealVCPU, VCPUError, cpuid_for_vcpu, install_kick_handler

__all__ = ["DEFAULT_STOP_NS", "STATE_MAGIC", "STATE_SECTIONS", "STOP_HISTORY", "THROTTLE_TIMESLICE_S", "GuestPageWriter", "KvmVCPUCounters",
           "KvmVCPUStatistics", "RealMachine", "RealVCPU",
           "RealVCPUs", "VCPUError", "VCPUStateError", "VCPUStateImage", "VCPUStateRecord", "cpuid_for_vcpu",
           "create_vcpus", "encode_vcpu_states", "install_kick_handler", "validate_vcpu_states"]
