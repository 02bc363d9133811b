"""Complete validation of our device section before anything is loaded.

The destination calls :func:`validate_device_state` once, on the whole
``migrator-vcpus`` payload, after the stream's EOF and before it loads a
single vCPU field, acknowledges, or resumes.  Everything is checked: the
run-state header (the role of QEMU's ``globalstate``), the accelerator kind
(a sim state into a kvm VM or the reverse), the vCPU count, every field's
type, range and finiteness, the sizes of the raw KVM structs, and the
consistency with this VM (RAM size in pages for the simulated workloads).
A failure is a :class:`DeviceStateError`, a ``RemoteProtocolError`` carrying
the stream offset of the section's payload; nothing has been changed then.

Rule: ``load_state`` of a vCPU controller is only ever called with a payload
this module accepted.  The simulated vCPUs' format is checked here (pure
functions over bytes); the real-KVM blob by its own package's one validator,
:func:`memory.kvm.real.validate_vcpu_states` (pure too: it touches no vCPU),
which ``RealVCPUs.load_state`` calls again, so both sides apply the same
checks.  Its :class:`~memory.kvm.real.VCPUStateError` becomes a
:class:`DeviceStateError` with the stream offset here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memory import TARGET_PAGE_SIZE
from memory.kvm import exact_keys as _keys
from memory.kvm import int_in as _int
from memory.kvm import strict_json
from memory.kvm.real import VCPUStateError, validate_vcpu_states
from memory.kvm.real.vcpu import STATE_MAGIC, STATE_SECTIONS
from memory.kvm.sim import vcpu_range
from memory.kvm.sim.workloads import AB_START, WORKLOADS
from transport import RemoteProtocolError

from ._machine import SMP_MAX

__all__ = ["DeviceStateError", "ValidDeviceState", "pack_device_state", "validate_device_state"]

#: our device section's largest sane payload (the decoder allows 64 MiB)
MAX_SIM_STATE_BYTES = 64 << 10
MAX_RATE_PAGES_PER_S = 1e9
U32 = (1 << 32) - 1
U128 = (1 << 128) - 1
#: counters (pages written, passes, sequence numbers) stay far from uint64 wrap
MAX_COUNTER = (1 << 62) - 1

#: memory.kvm.real's blob format (magic, header, raw structs; see memory.kvm.real._state)
KVM_STATE_MAGIC = STATE_MAGIC
KVM_STATE_SECTIONS = STATE_SECTIONS

#: extra fields of each simulated workload's state (memory/kvm/sim/workloads.py)
_WORKLOAD_FIELDS = {
    "idle": frozenset(),
    "fill": frozenset(),
    "ab": frozenset({"cursor", "passes"}),
    "random": frozenset({"seq"}),
    "hotset": frozenset({"seq"}),
    "stream": frozenset({"cursor", "passes", "seq", "working_set"}),
}
assert set(_WORKLOAD_FIELDS) == set(WORKLOADS)


def pack_device_state(running: bool, vcpu_state: bytes, *, handover: bool = False) -> bytes:
    """Our device section's payload: one JSON line (the source's run state, the
    role QEMU's "globalstate" section plays, and ``"handover": true`` when the
    source hands over: it waits for LOADED and resumes without a GO), then the
    vCPU controller's blob."""
    meta: dict[str, bool] = {"running": bool(running)}
    if handover:
        meta["handover"] = True
    return json.dumps(meta).encode() + b"\n" + vcpu_state


class DeviceStateError(RemoteProtocolError):
    """The device section is malformed or does not fit this VM."""


#: builds the error for one detail (with the section's stream offset)
_Fail = Callable[[str], DeviceStateError]


@dataclass(frozen=True, slots=True)
class ValidDeviceState:
    """An accepted device section: the source's run state and the vCPU blob."""

    running: bool
    vcpu_state: bytes
    #: the source hands over (x-handover): it resumes unless we say LOADED and get its GO
    handover: bool = False


def validate_device_state(payload: bytes, *, offset: int, accel: str, npages: int,
                          nvcpus: int = 1) -> ValidDeviceState:
    """Check the whole device section; raise :class:`DeviceStateError`.

    Args:
        payload: the section's data (run-state line, then the vCPU blob).
        offset: stream offset of ``payload`` (reported in errors).
        accel: this VM's accelerator kind, ``"sim"`` or ``"kvm"``.
        npages: guest RAM pages of this VM.
        nvcpus: vCPUs of this VM.
    """
    def fail(detail: str) -> DeviceStateError:
        return DeviceStateError(f"invalid device state: {detail}", offset)

    head, sep, blob = bytes(payload).partition(b"\n")
    if not sep:
        raise fail("no run-state header")
    meta = strict_json(head, "run-state header", fail)
    if (not isinstance(meta, dict) or set(meta) not in ({"running"}, {"running", "handover"})
            or not isinstance(meta["running"], bool) or meta.get("handover", True) is not True):
        raise fail(f"run-state header must be {{\"running\": true|false[, \"handover\": true]}}, "
                   f"not {head[:80]!r}")
    kind = "kvm" if blob.startswith(KVM_STATE_MAGIC) else "sim" if blob.startswith(b"{") else None
    if kind is None:
        raise fail(f"unknown vCPU state format (starts {blob[:8]!r})")
    if kind != accel:
        raise fail(f"vCPU state is for a {kind} accelerator, this VM uses {accel}")
    if kind == "sim":
        _check_sim(blob, fail, npages=npages, nvcpus=nvcpus)
    else:
        _check_kvm(blob, fail, nvcpus=nvcpus)
    return ValidDeviceState(meta["running"], blob, handover="handover" in meta)


# -- the simulated vCPU (memory/kvm/sim/sim_vcpu.py) --------------------------------
def _check_sim(blob: bytes, fail: _Fail, *, npages: int, nvcpus: int) -> None:
    """:meth:`memory.kvm.sim.SimVCPUs.save_state`: ``kind``, ``smp``, ``rate``
    and one workload state per vCPU, each over its own page range
    (:func:`memory.kvm.sim.vcpu_range`)."""
    if len(blob) > MAX_SIM_STATE_BYTES:
        raise fail(f"sim vCPU state is {len(blob)} bytes, more than {MAX_SIM_STATE_BYTES}")
    state = _keys(strict_json(blob, "sim vCPU state", fail), {"kind", "smp", "rate", "vcpus"},
                  "sim vCPU state", fail)
    if state["kind"] != "sim":
        raise fail(f"sim vCPU state has kind {str(state['kind'])[:40]!r}")
    smp = _int(state["smp"], 1, SMP_MAX, "sim vCPU state smp", fail)
    vcpus = state["vcpus"]
    if not isinstance(vcpus, list) or len(vcpus) != smp:
        raise fail(f"sim vCPU state lists {len(vcpus) if isinstance(vcpus, list) else 'no'} vCPU states for smp {smp}")
    if smp != nvcpus:
        raise fail(f"the migration stream carries the state of {smp} vCPU(s), this VM has {nvcpus} "
                   f"(--smp {nvcpus}); start the destination with --smp {smp}")
    rate = state["rate"]
    if rate is not None:
        if type(rate) not in (int, float):
            raise fail(f"rate must be a number or null, not {type(rate).__name__} {str(rate)[:40]!r}")
        if not math.isfinite(rate) or not 0 < rate <= MAX_RATE_PAGES_PER_S:
            raise fail(f"rate {rate!r} is not in (0, {MAX_RATE_PAGES_PER_S:g}] pages/s")
    for v, wl in enumerate(vcpus):
        lo, hi = vcpu_range(npages, smp, v)
        _check_sim_workload(wl, fail, share=hi - lo, gfn_base=lo, what=f"vCPU {v}")


def _check_sim_workload(wl: Any, fail: _Fail, *, share: int, gfn_base: int, what: str) -> None:
    name = wl.get("name") if isinstance(wl, dict) else None
    if not isinstance(name, str) or name not in _WORKLOAD_FIELDS:
        raise fail(f"{what}: unknown workload {str(name)[:40]!r}")
    _keys(wl, {"name", "rng", "pages_written"} | _WORKLOAD_FIELDS[name], f"{what} workload {name!r} state", fail)
    _check_pcg64(wl["rng"], fail)
    _int(wl["pages_written"], 0, MAX_COUNTER, f"{what} pages_written", fail)
    for key in ("passes", "seq"):
        if key in wl:
            _int(wl[key], 0, MAX_COUNTER, f"{what} {key}", fail)
    if name == "ab":
        first = max(0, AB_START // TARGET_PAGE_SIZE - gfn_base)  # the ab guest writes [1 MiB, end)
        if share <= first:
            raise fail(f"{what}: the ab workload needs more than {first} pages, its share has {share}")
        _int(wl["cursor"], first, share - 1, f"{what} ab cursor", fail)
    elif name == "stream":
        ws = _int(wl["working_set"], 1, share, f"{what} stream working_set", fail)
        _int(wl["cursor"], 0, ws - 1, f"{what} stream cursor", fail)


def _check_pcg64(rng: Any, fail: _Fail) -> None:
    rng = _keys(rng, {"bit_generator", "state", "has_uint32", "uinteger"}, "rng state", fail)
    if rng["bit_generator"] != "PCG64":
        raise fail(f"rng bit_generator {str(rng['bit_generator'])[:40]!r} is not PCG64")
    inner = _keys(rng["state"], {"state", "inc"}, "rng state.state", fail)
    _int(inner["state"], 0, U128, "rng state", fail)
    _int(inner["inc"], 0, U128, "rng inc", fail)
    _int(rng["has_uint32"], 0, 1, "rng has_uint32", fail)
    _int(rng["uinteger"], 0, U32, "rng uinteger", fail)


# -- the real KVM vCPUs (memory/kvm/real) ---------------------------------------------
def _check_kvm(blob: bytes, fail: _Fail, *, nvcpus: int) -> None:
    try:
        validate_vcpu_states(blob, nvcpus)
    except VCPUStateError as exc:
        raise fail(str(exc)) from None
