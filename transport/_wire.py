"""Record layouts of QEMU's migration stream (savevm format version 3).

Some facts about the stream, read from QEMU's migration/savevm.c and
migration/ram.c (7.2 and master agree on everything used here):

* **File header**: be32 magic ``0x5145564d`` ("QEVM"), be32 version 3
  (``QEMU_VM_FILE_MAGIC`` / ``QEMU_VM_FILE_VERSION``; version 2 is rejected as
  obsolete).
* **Configuration**: when the migration property ``send-configuration`` is on
  (the default for every current machine type), the byte after the header
  must be ``QEMU_VM_CONFIGURATION`` (0x07) followed by the
  ``vmstate_configuration`` fields: be32 length + machine name (no NUL).  The
  destination fails the load when the name differs from its own machine type.
  Optional subsections (0x05: target page bits, capabilities, uuid) may follow
  it; we neither send nor accept them.
* **Sections**: START (0x01) and FULL (0x04) are ``type, be32 section_id,
  u8 len, idstr, be32 instance_id, be32 version_id``; PART (0x02) and END
  (0x03) are ``type, be32 section_id``.  With ``send-section-footer`` (on by
  default) every section's payload is followed by FOOTER (0x7e) + be32
  section_id, which the loader checks against the section it just loaded.
  EOF is 0x00.  After EOF QEMU appends VMDESCRIPTION (0x06, be32 length, JSON)
  unless the machine suppresses it.
* **RAM payload** (section idstr ``"ram"``, instance 0, version 4): a list of
  records ended by EOS.  Every record starts with a be64 holding
  ``offset_in_block | flags``: the flags live below the target page size, the
  offset is page aligned.  Unless CONTINUE is set, the records that address a
  page (ZERO, PAGE, XBZRLE...) then name their block: u8 length + idstr.
  ``ram_block_from_stream`` remembers the last named block for the whole
  incoming migration (not per section), so CONTINUE is only invalid before
  any block was named.  QEMU's sender restarts naming only when its RAM list
  changes; our encoder names the block again in each section, which is valid
  either way.

  =========  =====  ===================================================
  flag       value  followed by
  =========  =====  ===================================================
  FULL       0x001  obsolete, rejected
  ZERO       0x002  [block], one byte that must be 0
  MEM_SIZE   0x004  (be64 holds the total of used_length) then per block:
                    u8 len, idstr, be64 used_length, until the total is
                    used up
  PAGE       0x008  [block], the raw target page
  EOS        0x010  nothing: ends this section's RAM payload
  CONTINUE   0x020  modifier of ZERO/PAGE: same block as the last record
  XBZRLE     0x040  rejected (we never negotiate xbzrle)
  HOOK       0x080  rejected (RDMA only)
  COMPRESS   0x100  rejected (removed in QEMU 9.1)
  MULTIFD    0x200  rejected: QEMU >= 8.0's per-round multifd flush;
                    we speak 7.2's multifd, which syncs at every EOS
  =========  =====  ===================================================

  ``ram_load_precopy`` subtracts each block's length from the MEM_SIZE total
  and loops while it is non-zero, so the lengths must add up to the total
  exactly.  MEM_SIZE per-block extras (page size with postcopy, GPA with
  x-ignore-shared) are never present without those capabilities.

* **Our device section** (FULL, idstr ``"migrator-vcpus"``, instance 0,
  version 1) is not a QEMU device: its payload is be32 length + that many
  opaque state bytes.  Stock QEMU fails on it ("Unknown savevm section or
  instance"), which is why ``x-ram-only`` leaves it out and ``x-qemu-devices``
  sends QEMU's ``-M none`` sections instead (``transport._vmstate``).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

QEMU_VM_FILE_MAGIC: Final = 0x5145564D
QEMU_VM_FILE_VERSION: Final = 3
QEMU_VM_FILE_VERSION_COMPAT: Final = 2

# Section types (migration/savevm.h).
QEMU_VM_EOF: Final = 0x00
QEMU_VM_SECTION_START: Final = 0x01
QEMU_VM_SECTION_PART: Final = 0x02
QEMU_VM_SECTION_END: Final = 0x03
QEMU_VM_SECTION_FULL: Final = 0x04
QEMU_VM_SUBSECTION: Final = 0x05
QEMU_VM_VMDESCRIPTION: Final = 0x06
QEMU_VM_CONFIGURATION: Final = 0x07
QEMU_VM_COMMAND: Final = 0x08
QEMU_VM_SECTION_FOOTER: Final = 0x7E

SECTION_TYPE_NAMES: Final = {
    QEMU_VM_EOF: "EOF",
    QEMU_VM_SECTION_START: "START",
    QEMU_VM_SECTION_PART: "PART",
    QEMU_VM_SECTION_END: "END",
    QEMU_VM_SECTION_FULL: "FULL",
    QEMU_VM_SUBSECTION: "SUBSECTION",
    QEMU_VM_VMDESCRIPTION: "VMDESCRIPTION",
    QEMU_VM_CONFIGURATION: "CONFIGURATION",
    QEMU_VM_COMMAND: "COMMAND",
    QEMU_VM_SECTION_FOOTER: "FOOTER",
}

# RAM record flags (migration/ram.c RAM_SAVE_FLAG_*).
RAM_SAVE_FLAG_FULL: Final = 0x001
RAM_SAVE_FLAG_ZERO: Final = 0x002
RAM_SAVE_FLAG_MEM_SIZE: Final = 0x004
RAM_SAVE_FLAG_PAGE: Final = 0x008
RAM_SAVE_FLAG_EOS: Final = 0x010
RAM_SAVE_FLAG_CONTINUE: Final = 0x020
RAM_SAVE_FLAG_XBZRLE: Final = 0x040
RAM_SAVE_FLAG_HOOK: Final = 0x080
RAM_SAVE_FLAG_COMPRESS_PAGE: Final = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH: Final = 0x200
#: every flag value QEMU has defined: anything at or above 0x400 (and below
#: the page size) is an unaligned offset rather than a flag.
RAM_SAVE_FLAGS_DEFINED: Final = 0x3FF

RAM_FLAG_NAMES: Final = {
    RAM_SAVE_FLAG_FULL: "FULL",
    RAM_SAVE_FLAG_ZERO: "ZERO",
    RAM_SAVE_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_SAVE_FLAG_PAGE: "PAGE",
    RAM_SAVE_FLAG_EOS: "EOS",
    RAM_SAVE_FLAG_CONTINUE: "CONTINUE",
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "HOOK",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_SAVE_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}

ZERO_CONT: Final = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE
PAGE_CONT: Final = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE

# Well-known sections.
RAM_SECTION_IDSTR: Final = "ram"
RAM_SECTION_INSTANCE: Final = 0
RAM_SECTION_VERSION: Final = 4
VCPU_SECTION_IDSTR: Final = "migrator-vcpus"
VCPU_SECTION_INSTANCE: Final = 0
VCPU_SECTION_VERSION: Final = 1

TARGET_PAGE_SIZE: Final = 4096

# Limits on lengths read from the wire (anything larger is a protocol error).
MAX_IDSTR_BYTES: Final = 255  # u8 length prefix; QEMU's idstr buffers are 256 bytes
MAX_MACHINE_NAME_BYTES: Final = 256
DEFAULT_MAX_DEVICE_STATE_BYTES: Final = 64 << 20
DEFAULT_MAX_VMDESC_BYTES: Final = 16 << 20

BE32: Final = struct.Struct(">I")
BE64: Final = struct.Struct(">Q")
FILE_HEADER: Final = struct.Struct(">II")
#: type, section_id (then u8 len + idstr, then SECTION_TAIL)
SECTION_HEAD: Final = struct.Struct(">BI")
#: instance_id, version_id
SECTION_TAIL: Final = struct.Struct(">II")


def ram_flag_names(flags: int) -> str:
    """Render RAM flags as ``PAGE|CONTINUE`` (unknown bits in hex)."""
    names = [name for bit, name in RAM_FLAG_NAMES.items() if flags & bit]
    rest = flags & ~RAM_SAVE_FLAGS_DEFINED
    if rest:
        names.append(hex(rest))
    return "|".join(names) if names else "0"


def encode_idstr(idstr: str) -> bytes:
    """``u8 length + bytes`` as QEMU's ``qemu_put_counted_string``.

    Raises:
        ValueError: the idstr is empty or longer than 255 bytes in UTF-8.
    """
    raw = idstr.encode()
    if not raw or len(raw) > MAX_IDSTR_BYTES:
        raise ValueError(f"idstr must be 1..{MAX_IDSTR_BYTES} bytes: {idstr!r}")
    return bytes((len(raw),)) + raw


def byte_view(array: NDArray[np.uint8]) -> memoryview:
    """A ``memoryview`` of a byte array (no copy), typed for ``struct`` and sockets."""
    # numpy's stubs declare ndarray.__buffer__ only for Python >= 3.12, so on
    # 3.11 mypy does not see an ndarray as a Buffer, though it is one.
    return memoryview(array)  # type: ignore[arg-type]
