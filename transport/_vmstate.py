"""Device sections as QEMU's vmstate lays them out, and the JSON that describes them.

QEMU writes a device (non-iterative) section as its ``VMStateDescription``
fields in order, each big-endian and of a fixed size for a given state, then
any *needed* subsections, each ``0x05 (QEMU_VM_SUBSECTION), u8 len, name,
be32 version`` + that subsection's fields (and its own subsections).  There
is no length prefix: a loader must know the layout to find the footer.

After EOF QEMU appends ``QEMU_VM_VMDESCRIPTION`` (0x06, be32 length, JSON)
describing what it wrote (migration/savevm.c ``qemu_savevm_state_header`` /
``vmstate_save``, migration/vmstate.c ``vmsd_desc_field_start/end``):

* top level, in this key order: ``"configuration"`` (QEMU >= 8.2 describes the
  CONFIGURATION section; 7.2 leaves it out), ``"page_size"``, ``"devices"``;
* a vmsd-based device: ``{"name", "instance_id", "vmsd_name", "version",
  "fields": [...], "subsections": [...]}``, ``"subsections"`` only when one
  was written, each ``{"vmsd_name", "version", "fields"[, "subsections"]}``;
* a field: ``{"name", ["array_len" N,] "type", "size"}`` where ``size`` is
  the bytes written for one element (``array_len`` elements follow);
* an old-style section (``SaveVMHandlers.save_state``, e.g. ``slirp``):
  ``{"name", "instance_id", "size", "fields": [{"name": "data", "size",
  "type": "buffer"}]}``.

QEMU's JSON writer separates with ``", "`` and ``": "``, which is what
``json.dumps`` does by default, so the bytes match QEMU's for the same data.

Sections known here (checked against QEMU 7.2 streams and master's source,
whose layouts for these are unchanged since 7.2):

* ``timer`` v2 (system/cpu-timers.c ``vmstate_timers``): int64
  cpu_ticks_offset, 8 unused bytes, int64 cpu_clock_offset; subsection
  ``timer/icount`` only with ``-icount`` (its layout is known, so such a
  stream is walked, and carried on unchanged).
* ``globalstate`` v1 (migration/global_state.c): uint32 size (strlen+1),
  100-byte buffer holding the NUL-terminated run-state name.
* ``slirp`` v4 (net/slirp.c + libslirp state.c, old style): one byte per
  guestfwd socket (42 + socket state) and a 0 terminator, be16 ip_id, 16 bootp
  clients of (be16 allocated, 6-byte MAC).  Only the socket-less form (131
  bytes, what a ``-netdev user`` without guestfwd sends) is accepted.
* ``migrator-vcpus`` v1 (ours): uint32 length + that many opaque bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy as np
    from numpy.typing import NDArray

    #: any indexable byte buffer the layouts are measured in
    _Bytes: TypeAlias = bytes | bytearray | memoryview | NDArray[np.uint8]

from . import _wire as w

__all__ = [
    "GLOBALSTATE",
    "KNOWN_SECTIONS",
    "SLIRP_IDLE_BYTES",
    "TIMER",
    "RUN_STATES",
    "Field",
    "SectionLayout",
    "VMDescWriter",
    "Vmsd",
    "decode_globalstate",
    "decode_timer",
    "describe_section",
    "described_size",
    "encode_globalstate",
    "encode_timer",
    "measure_section",
    "validate_vmdesc",
]


@dataclass(frozen=True, slots=True)
class Field:
    """One fixed-size vmstate field (``count`` elements of ``size`` bytes)."""

    name: str
    type: str
    size: int
    count: int = 1


@dataclass(frozen=True, slots=True)
class Vmsd:
    """A VMStateDescription: fixed fields, then optional subsections."""

    name: str
    version: int
    fields: tuple[Field, ...]
    subsections: tuple[Vmsd, ...] = ()

    @property
    def fields_size(self) -> int:
        return sum(f.size * f.count for f in self.fields)


@dataclass(frozen=True, slots=True)
class SectionLayout:
    """How a FULL section ``idstr`` is laid out: a vmsd, or a special form."""

    idstr: str
    version: int
    vmsd: Vmsd | None  # None: old-style (opaque), measured by ``kind``
    kind: str = "vmsd"  # "vmsd", "slirp", "counted" (be32 length + bytes)


_ICOUNT = Vmsd(
    "timer/icount", 1,
    (Field("qemu_icount_bias", "int64", 8), Field("qemu_icount", "int64", 8)),
    (
        Vmsd("timer/icount/warp_timer", 1, (Field("vm_clock_warp_start", "int64", 8),
                                             Field("icount_warp_timer", "timer", 8))),
        Vmsd("timer/icount/timers", 1, (Field("icount_rt_timer", "timer", 8),
                                         Field("icount_vm_timer", "timer", 8))),
        Vmsd("timer/icount/shift", 2, (Field("icount_time_shift", "int16", 2),
                                        Field("last_delta", "int64", 8))),
    ),
)
TIMER: Final = Vmsd(
    "timer", 2,
    (Field("cpu_ticks_offset", "int64", 8), Field("unused", "unused_buffer", 8),
     Field("cpu_clock_offset", "int64", 8)),
    (_ICOUNT,),
)
GLOBALSTATE: Final = Vmsd("globalstate", 1, (Field("size", "uint32", 4), Field("runstate", "buffer", 100)))
SLIRP_VERSION: Final = 4
SLIRP_IDLE_BYTES: Final = 1 + 2 + 16 * 8
CONFIGURATION_VERSION: Final = 1

KNOWN_SECTIONS: Final = {
    "timer": SectionLayout("timer", 2, TIMER),
    "globalstate": SectionLayout("globalstate", 1, GLOBALSTATE),
    "slirp": SectionLayout("slirp", SLIRP_VERSION, None, "slirp"),
    w.VCPU_SECTION_IDSTR: SectionLayout(w.VCPU_SECTION_IDSTR, w.VCPU_SECTION_VERSION, None, "counted"),
}

#: QEMU's RunState names (qapi/run-state.json); globalstate must hold one.
RUN_STATES: Final = frozenset({
    "debug", "inmigrate", "internal-error", "io-error", "paused", "postmigrate", "prelaunch",
    "finish-migrate", "restore-vm", "running", "save-vm", "shutdown", "suspended", "watchdog",
    "guest-panicked", "colo",
})


# -- measuring a payload -----------------------------------------------------
@dataclass(slots=True)
class Measured:
    """A payload's length and the subsections it holds (for its description)."""

    length: int
    subsections: list[tuple[Vmsd, Measured]] = field(default_factory=list)


class LayoutError(ValueError):
    """The bytes do not fit the section's layout; ``offset`` is relative to the payload."""

    def __init__(self, detail: str, offset: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.offset = offset


def _measure_vmsd(buf: _Bytes, pos: int, end: int, vmsd: Vmsd, base: int) -> Measured | None:
    q = pos + vmsd.fields_size
    if q > end:
        return None
    found: list[tuple[Vmsd, Measured]] = []
    by_name = {s.name: s for s in vmsd.subsections}
    # QEMU (vmstate_subsection_load): loop while the next byte is a
    # subsection marker; a name it does not know ends the loop and the load
    # then fails on the footer.  We name the subsection instead.
    while True:
        if q >= end:
            return None  # the footer (or another subsection) must follow
        if buf[q] != w.QEMU_VM_SUBSECTION:
            return Measured(q - pos, found)
        if q + 2 > end:
            return None
        n = buf[q + 1]
        if q + 2 + n + 4 > end:
            return None
        name = bytes(buf[q + 2 : q + 2 + n]).decode(errors="replace")
        sub = by_name.get(name)
        if sub is None:
            raise LayoutError(f"unknown subsection {name!r} in section {vmsd.name!r}", q - base)
        version = int.from_bytes(bytes(buf[q + 2 + n : q + 6 + n]), "big")
        if version != sub.version:
            raise LayoutError(f"subsection {name!r} version {version}, expected {sub.version}", q - base)
        if any(s is sub for s, _ in found):
            raise LayoutError(f"subsection {name!r} appears twice", q - base)
        inner = _measure_vmsd(buf, q + 6 + n, end, sub, base)
        if inner is None:
            return None
        found.append((sub, inner))
        q += 6 + n + inner.length


def measure_section(buf: _Bytes, pos: int, end: int, layout: SectionLayout) -> Measured | None:
    """Length of the section payload at ``buf[pos:end]``; None if more bytes are needed.

    ``buf`` is any indexable byte buffer (bytes, memoryview, uint8 array).
    The byte after the payload must be present too (it ends the subsection
    list), except for the opaque forms.

    Raises:
        LayoutError: the payload does not fit the layout.
    """
    if layout.kind == "vmsd":
        assert layout.vmsd is not None
        return _measure_vmsd(buf, pos, end, layout.vmsd, pos)
    if layout.kind == "counted":
        if pos + 4 > end:
            return None
        n = int.from_bytes(bytes(buf[pos : pos + 4]), "big")
        return Measured(4 + n) if pos + 4 + n <= end else None
    # slirp (old style): socket list, then ip_id and the bootp clients
    if pos + 1 > end:
        return None
    if buf[pos] != 0:
        raise LayoutError(
            f"slirp state with guestfwd sockets (marker {buf[pos]}) is not supported: only the "
            "socket-less form of a -netdev user", 0)
    return Measured(SLIRP_IDLE_BYTES) if pos + SLIRP_IDLE_BYTES <= end else None


# -- descriptions --------------------------------------------------------------
def _field_desc(f: Field) -> dict[str, Any]:
    d: dict[str, Any] = {"name": f.name}
    if f.count > 1:
        d["array_len"] = f.count
    d["type"] = f.type
    d["size"] = f.size
    return d


def _vmsd_desc(vmsd: Vmsd, measured: Measured, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"vmsd_name": vmsd.name, "version": vmsd.version,
               "fields": fields if fields is not None else [_field_desc(f) for f in vmsd.fields]}
    if measured.subsections:
        d["subsections"] = [_vmsd_desc(s, m) for s, m in measured.subsections]
    return d


def describe_section(idstr: str, instance_id: int, layout: SectionLayout, measured: Measured) -> dict[str, Any]:
    """The ``devices`` entry QEMU writes for this section (see the module doc)."""
    head: dict[str, Any] = {"name": idstr, "instance_id": instance_id}
    if layout.kind == "slirp":
        n = measured.length
        return {**head, "size": n, "fields": [{"name": "data", "size": n, "type": "buffer"}]}
    if layout.kind == "counted":
        fields = [{"name": "length", "type": "uint32", "size": 4},
                  {"name": "state", "type": "buffer", "size": measured.length - 4}]
        return {**head, "vmsd_name": idstr, "version": layout.version, "fields": fields}
    assert layout.vmsd is not None
    return {**head, **_vmsd_desc(layout.vmsd, measured)}


def configuration_desc(machine: str) -> dict[str, Any]:
    """The ``configuration`` entry (QEMU >= 8.2): fields ``len`` and ``name``."""
    return {"vmsd_name": "configuration", "version": CONFIGURATION_VERSION,
            "fields": [{"name": "len", "type": "uint32", "size": 4},
                       {"name": "name", "type": "buffer", "size": len(machine.encode())}]}


class VMDescWriter:
    """Collects what a stream wrote, then renders QEMU's description JSON."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.configuration: dict[str, Any] | None = None
        self.devices: list[dict[str, Any]] = []

    def json_bytes(self) -> bytes:
        top: dict[str, Any] = {}
        if self.configuration is not None:
            top["configuration"] = self.configuration
        top["page_size"] = self.page_size
        top["devices"] = self.devices
        return json.dumps(top).encode()


# -- validating a description against the stream ------------------------------
def described_size(desc: dict[str, Any]) -> int:
    """Bytes a description entry says were written (fields x array_len + subsections)."""
    total = 0
    for f in desc.get("fields", ()):
        total += int(f["size"]) * int(f.get("array_len", 1))
    for sub in desc.get("subsections", ()):
        total += 2 + len(str(sub["vmsd_name"]).encode()) + 4 + described_size(sub)
    return total


def validate_vmdesc(raw: bytes, *, page_size: int, machine: str | None,
                    sections: list[tuple[str, int, int, int]]) -> dict[str, Any]:
    """Check a VMDESCRIPTION against what the stream carried.

    ``sections`` lists the FULL (device) sections read, in order, as
    ``(idstr, instance_id, version_id, payload_length)``.  QEMU describes
    exactly those (iterative sections such as ``ram`` are not described).

    Returns the parsed JSON.  Raises ValueError naming the first mismatch.
    """
    try:
        desc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"VM description is not valid JSON: {exc}") from None
    if not isinstance(desc, dict):
        raise ValueError("VM description is not a JSON object")
    if desc.get("page_size") != page_size:
        raise ValueError(f"VM description page_size {desc.get('page_size')!r}, stream uses {page_size}")
    conf = desc.get("configuration")
    if conf is not None:
        if machine is None:
            raise ValueError("VM description describes a configuration section the stream does not have")
        try:
            size = described_size(conf)
        except (KeyError, TypeError, ValueError):
            raise ValueError("VM description: malformed configuration entry") from None
        if size != 4 + len(machine.encode()):
            raise ValueError(f"VM description: configuration is {size} bytes, the stream's is "
                             f"{4 + len(machine.encode())}")
    devices = desc.get("devices")
    if not isinstance(devices, list):
        raise ValueError("VM description has no device list")
    if len(devices) != len(sections):
        names = [d.get("name") if isinstance(d, dict) else d for d in devices]
        raise ValueError(f"VM description lists {len(devices)} devices {names}, the stream has "
                         f"{len(sections)} device sections {[s[0] for s in sections]}")
    for dev, (idstr, instance_id, version_id, length) in zip(devices, sections, strict=True):
        if not isinstance(dev, dict) or "fields" not in dev:
            raise ValueError(f"VM description entry for {idstr!r} has no fields")
        if dev.get("name") != idstr or dev.get("instance_id") != instance_id:
            raise ValueError(f"VM description names {dev.get('name')!r} {dev.get('instance_id')!r}, "
                             f"the stream's section is {idstr!r} {instance_id}")
        if "version" in dev and dev["version"] != version_id:
            raise ValueError(f"VM description: {idstr!r} version {dev['version']}, section has {version_id}")
        try:
            size = described_size(dev)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"VM description: malformed entry for {idstr!r}") from None
        if size != length:
            raise ValueError(f"VM description: {idstr!r} describes {size} bytes, the section holds {length}")
    return desc


# -- the two QEMU sections we originate ---------------------------------------
def encode_timer(cpu_ticks_offset: int, cpu_clock_offset: int) -> bytes:
    """``timer`` v2 payload, no icount subsection."""
    return (int(cpu_ticks_offset).to_bytes(8, "big", signed=True) + bytes(8)
            + int(cpu_clock_offset).to_bytes(8, "big", signed=True))


def decode_timer(payload: bytes) -> tuple[int, int]:
    return (int.from_bytes(payload[0:8], "big", signed=True),
            int.from_bytes(payload[16:24], "big", signed=True))


def encode_globalstate(runstate: str) -> bytes:
    """``globalstate`` v1 payload: size = strlen + 1, the name NUL-padded to 100 bytes."""
    raw = runstate.encode()
    if runstate not in RUN_STATES or len(raw) >= 100:
        raise ValueError(f"not a QEMU run state: {runstate!r}")
    return (len(raw) + 1).to_bytes(4, "big") + raw.ljust(100, b"\0")


def decode_globalstate(payload: bytes) -> str:
    """The run state a ``globalstate`` section carries, validated as QEMU's post_load does."""
    size = int.from_bytes(payload[0:4], "big")
    buf = payload[4:104]
    if size > 100:
        raise ValueError(f"globalstate size {size} exceeds its 100-byte buffer")
    name = buf.split(b"\0", 1)[0].decode(errors="replace")
    if name not in RUN_STATES:
        raise ValueError(f"globalstate carries an unknown run state {name!r}")
    return name
