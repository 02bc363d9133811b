"""Events produced by :class:`~transport.StreamDecoder`.

One event per stream element, in stream order.  Page records are grouped:
a run of consecutive records of the same kind (PAGE or ZERO) for the same
block may come as one :class:`RamPages` / :class:`RamZeroPages` or be split
into several, depending on how the bytes arrived.  Consumers must not depend
on the grouping, only on the order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import NDArray

__all__ = [
    "NEED_DATA",
    "Sentinel",
    "Configuration",
    "DeviceState",
    "EndOfStream",
    "Event",
    "RamEOS",
    "RamMemSize",
    "RamPages",
    "RamZeroPages",
    "SectionEnd",
    "SectionFooter",
    "SectionFull",
    "SectionPart",
    "SectionStart",
    "StreamHeader",
    "VMDescription",
    "VMStateSection",
]


class _Sentinel:
    """A named singleton returned instead of an event (h11's NEED_DATA style);
    also used by :mod:`migrator.qmp`'s sans-IO connection."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


#: Returned by ``next_event()`` when more bytes are needed (h11's NEED_DATA).
NEED_DATA: Final = _Sentinel("NEED_DATA")


@dataclass(frozen=True, slots=True)
class StreamHeader:
    """The file header: magic "QEVM" and the format version (3)."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration:
    """QEMU_VM_CONFIGURATION: the source's machine type name."""

    name: str


@dataclass(frozen=True, slots=True)
class SectionStart:
    """QEMU_VM_SECTION_START: first part of an iterative (live) section."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionPart:
    """QEMU_VM_SECTION_PART: a further part of a started section."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionEnd:
    """QEMU_VM_SECTION_END: the last part of a started section."""

    section_id: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    """QEMU_VM_SECTION_FULL: a one-shot device section."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """QEMU_VM_SECTION_FOOTER closing the section with this id."""

    section_id: int


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """RAM_SAVE_FLAG_MEM_SIZE: the source's block list, ``(idstr, used_length)``."""

    blocks: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(length for _, length in self.blocks)


@dataclass(frozen=True, slots=True, eq=False)
class RamPages:
    """A run of RAM_SAVE_FLAG_PAGE records for one block.

    Attributes:
        block: the RAM block idstr.
        offsets: ``uint64`` byte offsets in the block (page aligned, each
            checked to be below the block's used_length).
        data: ``(n, page_size)`` ``uint8`` page contents.  Usually a view into
            the decoder's buffer: valid only until the next call into the
            decoder.  Copy it (e.g. scatter into guest RAM) before that.
    """

    block: str
    offsets: NDArray[np.uint64]
    data: NDArray[np.uint8]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamPages):
            return NotImplemented
        return (
            self.block == other.block
            and np.array_equal(self.offsets, other.offsets)
            and np.array_equal(self.data, other.data)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RamPages(block={self.block!r}, npages={len(self.offsets)})"


@dataclass(frozen=True, slots=True, eq=False)
class RamZeroPages:
    """A run of RAM_SAVE_FLAG_ZERO records (pages whose content is all zero).

    QEMU's loader only writes such a page when it is not already zero, so
    untouched destination memory is never faulted in.
    """

    block: str
    offsets: NDArray[np.uint64]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RamZeroPages):
            return NotImplemented
        return self.block == other.block and np.array_equal(self.offsets, other.offsets)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RamZeroPages(block={self.block!r}, npages={len(self.offsets)})"


@dataclass(frozen=True, slots=True)
class RamEOS:
    """RAM_SAVE_FLAG_EOS: end of this section's RAM payload."""


@dataclass(frozen=True, slots=True)
class DeviceState:
    """Payload of our ``migrator-vcpus`` section: opaque state bytes."""

    data: bytes

    def __repr__(self) -> str:
        return f"DeviceState({len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class VMStateSection:
    """The payload of a QEMU device section the decoder knows the layout of
    (``timer``, ``globalstate``, ``slirp``: see ``transport._vmstate``).

    ``data`` is the payload exactly as on the wire (fields and subsections,
    without the section header and footer), so it can be carried on.
    """

    idstr: str
    instance_id: int
    version_id: int
    data: bytes

    def __repr__(self) -> str:
        return f"VMStateSection({self.idstr!r} {self.instance_id} v{self.version_id}, {len(self.data)} bytes)"


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """QEMU_VM_EOF: the end of the migration stream."""


@dataclass(frozen=True, slots=True)
class VMDescription:
    """QEMU_VM_VMDESCRIPTION after EOF: QEMU's JSON description of the stream."""

    json: bytes

    def __repr__(self) -> str:
        return f"VMDescription({len(self.json)} bytes)"


Event = (
    StreamHeader
    | Configuration
    | SectionStart
    | SectionPart
    | SectionEnd
    | SectionFull
    | SectionFooter
    | RamMemSize
    | RamPages
    | RamZeroPages
    | RamEOS
    | DeviceState
    | VMStateSection
    | EndOfStream
    | VMDescription
)


#: the public name of the sentinel type
Sentinel = _Sentinel
