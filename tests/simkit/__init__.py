"""Test-only helpers for the simulated KVM: introspection and invariant
checks that read :class:`memory.kvm.sim.SimKVM`'s private state."""

from .sim_check import SpteInfo, check_invariants, check_mmu, inspect_spte, peek_dirty_log, sim_state

__all__ = ["SpteInfo", "check_invariants", "check_mmu", "inspect_spte", "peek_dirty_log", "sim_state"]
