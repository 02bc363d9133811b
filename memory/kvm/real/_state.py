"""The real-KVM vCPU state blob: its format, its encoder and its one validator.

Layout: ``STATE_MAGIC``, a little-endian u32 header length, a JSON header,
then the payload of raw kernel structs.  The header::

    {"format": "migrator-kvm-vcpu", "version": 1, "program": "ab" | ... | null,
     "vcpus": [{"id": 0, "halted": false,
                "sections": {"sregs": [offset, length], "regs": [...], "fpu": [...],
                             "events": [...], "mp_state": [...]},
                "msrs": [[index, value], ...],
                "regs": {"rip": ..., ...}}, ...]}

Section offsets are into the payload; lengths are the sizes of ``struct
kvm_sregs``, ``kvm_regs``, ``kvm_fpu``, ``kvm_vcpu_events`` and 4 (the
``mp_state`` u32).  ``regs`` repeats ``kvm_regs`` as JSON for people reading
a stream; the loader takes the raw struct.

:func:`validate_vcpu_states` is the only parser: the destination's device
section check (``migrator.engine._devstate``) and
:meth:`memory.kvm.real.vcpu.RealVCPUs.load_state` both call it, so a blob is
accepted or refused, with the same :class:`VCPUStateError`, by one set of
checks.  It touches no vCPU.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, NoReturn

from .. import linux_kvm as K
from .._strict import exact_keys, int_in, strict_json
from .guests import PROGRAMS

__all__ = ["MAX_HEADER_BYTES", "MAX_MP_STATE", "MAX_MSRS", "STATE_FORMAT", "STATE_MAGIC", "STATE_PROGRAMS",
           "STATE_SECTIONS", "STATE_VERSION", "VCPUStateError", "VCPUStateImage", "VCPUStateRecord",
           "encode_vcpu_states", "validate_vcpu_states"]

STATE_MAGIC = b"MGKVCPU1"
STATE_FORMAT = "migrator-kvm-vcpu"
STATE_VERSION = 1
#: section name -> its exact length, in payload order
STATE_SECTIONS: dict[str, int] = {
    "sregs": ctypes.sizeof(K.kvm_sregs),
    "regs": ctypes.sizeof(K.kvm_regs),
    "fpu": ctypes.sizeof(K.kvm_fpu),
    "events": ctypes.sizeof(K.kvm_vcpu_events),
    "mp_state": 4,
}
#: the guest programs a blob may name (``null``: none recorded)
STATE_PROGRAMS: tuple[str | None, ...] = (None, *PROGRAMS)
MAX_HEADER_BYTES = 4 << 20
MAX_MSRS = 4096
#: KVM_MP_STATE_RUNNABLE (0) .. KVM_MP_STATE_SUSPENDED (10), include/uapi/linux/kvm.h
MAX_MP_STATE = 10
_PREFIX = len(STATE_MAGIC) + 4
_REGS_FIELDS = frozenset(f[0] for f in K.kvm_regs._fields_)
_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class VCPUStateError(ValueError):
    """A vCPU state blob that cannot be loaded (malformed, or not for this VM)."""


@dataclass(frozen=True)
class VCPUStateRecord:
    """One vCPU's state (the kernel's structs)."""

    id: int
    halted: bool
    sregs: K.kvm_sregs
    regs: K.kvm_regs
    fpu: K.kvm_fpu
    events: K.kvm_vcpu_events
    mp_state: int
    msrs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class VCPUStateImage:
    """A whole blob: the guest program and one record per vCPU, in vCPU order."""

    program: str | None
    vcpus: tuple[VCPUStateRecord, ...]


def encode_vcpu_states(image: VCPUStateImage) -> bytes:
    """The blob of ``image`` (the inverse of :func:`validate_vcpu_states`)."""
    payload = bytearray()
    records: list[dict[str, Any]] = []
    for st in image.vcpus:
        raw = {"sregs": bytes(st.sregs), "regs": bytes(st.regs), "fpu": bytes(st.fpu),
               "events": bytes(st.events), "mp_state": struct.pack("<I", st.mp_state)}
        sections = {}
        for name in STATE_SECTIONS:
            sections[name] = [len(payload), len(raw[name])]
            payload += raw[name]
        records.append({
            "id": st.id,
            "halted": st.halted,
            "sections": sections,
            "msrs": [[index, value] for index, value in st.msrs],
            "regs": {name: getattr(st.regs, name) for name, *_ in K.kvm_regs._fields_},
        })
    header = {"format": STATE_FORMAT, "version": STATE_VERSION, "program": image.program, "vcpus": records}
    hj = json.dumps(header, sort_keys=True).encode()
    return STATE_MAGIC + struct.pack("<I", len(hj)) + hj + bytes(payload)


def validate_vcpu_states(blob: bytes | bytearray | memoryview, nvcpus: int | None = None) -> VCPUStateImage:
    """Check the whole blob and return it parsed; raise :class:`VCPUStateError`
    naming the first problem.

    Checked: magic; header length within the blob and at most
    ``MAX_HEADER_BYTES``; the header is strict JSON (UTF-8, no NaN/Infinity,
    no duplicate keys) with exactly the fields above; format and version;
    the program; with ``nvcpus``, the vCPU count against this VM's; ids
    0..n-1 in order; ``halted`` a bool; every section an ``[offset,
    length]`` of its struct's exact length inside the payload; ``mp_state``
    in 0..``MAX_MP_STATE``; at most ``MAX_MSRS`` MSRs, each a (u32 index,
    u64 value); ``regs`` only ``kvm_regs`` fields with u64 values.
    """
    data = bytes(blob)
    if data[:len(STATE_MAGIC)] != STATE_MAGIC:
        _fail(f"not a kvm vCPU state blob (magic {data[:len(STATE_MAGIC)]!r})")
    if len(data) < _PREFIX:
        _fail(f"kvm vCPU state truncated in its header length ({len(data)} bytes)")
    (hlen,) = struct.unpack_from("<I", data, len(STATE_MAGIC))
    if hlen > MAX_HEADER_BYTES or _PREFIX + hlen > len(data):
        _fail(f"kvm vCPU state header length {hlen} does not fit in {len(data)} bytes")
    header = _keys(_strict_json(data[_PREFIX:_PREFIX + hlen]), {"format", "version", "program", "vcpus"},
                   "kvm vCPU state header")
    if header["format"] != STATE_FORMAT or type(header["version"]) is not int or header["version"] != STATE_VERSION:
        _fail(f"unknown kvm vCPU state format {str(header['format'])[:40]!r} v{str(header['version'])[:20]}")
    program = header["program"]
    if not (program is None or isinstance(program, str)) or program not in STATE_PROGRAMS:
        _fail(f"unknown guest program {str(program)[:40]!r}")
    vcpus = header["vcpus"]
    if not isinstance(vcpus, list) or not vcpus:
        _fail("kvm vCPU state 'vcpus' must be a non-empty list")
    if nvcpus is not None and len(vcpus) != nvcpus:
        _fail(f"the migration stream carries the state of {len(vcpus)} vCPU(s), this VM has {nvcpus} "
              f"(--smp {nvcpus}); start the destination with --smp {len(vcpus)}")
    payload = memoryview(data)[_PREFIX + hlen:]
    return VCPUStateImage(program=program, vcpus=tuple(_record(i, st, payload) for i, st in enumerate(vcpus)))


def _record(i: int, st: object, payload: memoryview) -> VCPUStateRecord:
    what = f"vCPU {i}"
    rec = _keys(st, {"id", "halted", "sections", "msrs", "regs"}, what)
    _int(rec["id"], i, i, f"{what} id")
    if type(rec["halted"]) is not bool:
        _fail(f"{what} halted must be true or false")
    sections = _keys(rec["sections"], set(STATE_SECTIONS), f"{what} sections")
    raw: dict[str, bytes] = {}
    for name, size in STATE_SECTIONS.items():
        ext = sections[name]
        if not isinstance(ext, list) or len(ext) != 2:
            _fail(f"{what} section {name} must be [offset, length], not {str(ext)[:40]}")
        off = _int(ext[0], 0, len(payload), f"{what} section {name} offset")
        _int(ext[1], size, size, f"{what} section {name} length")
        if off + size > len(payload):
            _fail(f"{what} section {name} [{off}, +{size}) is outside the {len(payload)}-byte payload")
        raw[name] = bytes(payload[off:off + size])
    (mp_state,) = struct.unpack("<I", raw["mp_state"])
    _int(mp_state, 0, MAX_MP_STATE, f"{what} mp_state")
    msrs = rec["msrs"]
    if not isinstance(msrs, list) or len(msrs) > MAX_MSRS:
        _fail(f"{what} msrs must be a list of at most {MAX_MSRS} [index, value] pairs")
    pairs = []
    for entry in msrs:
        if not isinstance(entry, list) or len(entry) != 2:
            _fail(f"{what} msr entry {str(entry)[:40]} is not [index, value]")
        pairs.append((_int(entry[0], 0, _U32, f"{what} msr index"), _int(entry[1], 0, _U64, f"{what} msr value")))
    regs = rec["regs"]
    if not isinstance(regs, dict) or not set(regs) <= _REGS_FIELDS:
        _fail(f"{what} regs must be an object of kvm_regs fields")
    for name, value in regs.items():
        _int(value, 0, _U64, f"{what} {name}")
    return VCPUStateRecord(
        id=i, halted=rec["halted"],
        sregs=K.kvm_sregs.from_buffer_copy(raw["sregs"]),
        regs=K.kvm_regs.from_buffer_copy(raw["regs"]),
        fpu=K.kvm_fpu.from_buffer_copy(raw["fpu"]),
        events=K.kvm_vcpu_events.from_buffer_copy(raw["events"]),
        mp_state=mp_state,
        msrs=tuple(pairs),
    )


def _fail(detail: str) -> NoReturn:
    raise VCPUStateError(detail)


def _strict_json(raw: bytes) -> object:
    return strict_json(raw, "kvm vCPU state header", VCPUStateError)


def _int(value: object, lo: int, hi: int, what: str) -> int:
    return int_in(value, lo, hi, what, VCPUStateError)


def _keys(obj: object, required: Collection[str], what: str) -> dict[str, Any]:
    return exact_keys(obj, required, what, VCPUStateError)
