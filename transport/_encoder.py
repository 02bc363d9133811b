"""Sans-IO encoder of QEMU's migration stream (the sending side).

Every method returns the bytes (or buffers) of one stream element; the caller
writes them in order.  The encoder keeps just enough state to refuse a stream
the decoder (or QEMU) would reject: :class:`LocalProtocolError` on misuse,
with the encoder unchanged.

How :meth:`StreamEncoder.ram_pages` reads guest RAM exactly once
------------------------------------------------------------------

The wire wants each page behind its 8-byte header (4104-byte records), while
guest RAM holds pages back to back.  ``np.take(..., out=...)`` only writes a
C-contiguous ``out`` without a hidden temporary, and it makes a temporary copy
of a non-contiguous source, so neither side of the gather may be strided.  So
the pages are gathered in chunks of ``chunk_pages`` into a small contiguous
scratch buffer (the one read of guest RAM, ``mode="clip"`` to avoid numpy's
buffered ``raise`` mode), zero-checked there while it is hot in cache (a
first-word prefilter, then a full OR-reduce of the candidates), and only the
non-zero pages are copied on, cache to cache, into the data column of the
reused record staging buffer, whose header column is written as one big-endian
``uint64`` view.  A chunk of consecutive pages needs no gather: it is checked
and copied straight from guest RAM.  Zero pages never reach the staging buffer: they become
9-byte ZERO records.

Within one call the ZERO records come first and the PAGE records after them:
every page of a call is sent once, so their order carries no meaning, and long
runs of same-size records let the receiver parse them as one strided view.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from . import _vmstate as vms
from . import _wire as w
from .errors import LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from numpy.typing import ArrayLike, NDArray

__all__ = ["EncodedPages", "StreamEncoder"]

_ZERO_REC = np.dtype([("hdr", ">u8"), ("fill", "u1")])  # packed: 9 bytes
_BE64 = np.dtype(">u8")


class EncodedPages(NamedTuple):
    """Result of :meth:`StreamEncoder.ram_pages`.

    ``buffers`` are views into the encoder's staging buffers: send them before
    the next ``ram_pages`` call.  Unpacks as ``(buffers, normal, zero)``.
    """

    buffers: list[memoryview]
    normal: int  #: pages sent as PAGE records (QMP ``normal``)
    zero: int  #: pages sent as ZERO records (QMP ``duplicate``)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)


class _State(enum.Enum):
    START = "start"
    AFTER_HEADER = "after-header"
    TOP = "top"
    RAM = "ram"  # inside a RAM payload
    RAM_DONE = "ram-done"  # EOS written, footer due
    DEVICE = "device"
    DEVICE_DONE = "device-done"
    DONE = "done"  # EOF written: only the VM description may follow
    DESCRIBED = "described"


class StreamEncoder:
    """Produce a migration stream piece by piece; no I/O.

    Args:
        page_size: the target page size.
        chunk_pages: pages gathered per step in :meth:`ram_pages` (the scratch
            buffer is ``chunk_pages * page_size`` bytes; keep it cache sized).
    """

    def __init__(self, page_size: int = w.TARGET_PAGE_SIZE, *, chunk_pages: int = 256) -> None:
        if page_size < 1024 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two >= 1024: {page_size}")
        self.page_size = page_size
        self._shift = page_size.bit_length() - 1
        self._rec = 8 + page_size
        self._chunk = chunk_pages
        self._scratch = np.empty((chunk_pages, page_size), dtype=np.uint8)
        self._stage = np.empty(0, dtype=np.uint8)
        self._zstage = np.empty(0, dtype=_ZERO_REC)
        self._state = _State.START
        self._sections: dict[int, str] = {}  # section_id -> "ram"/"ram-ended"/"full"
        self._cur: int | None = None
        self._blocks: dict[str, int] | None = None
        self._last_block: str | None = None
        self._vmdesc = vms.VMDescWriter(page_size)
        self._full: tuple[str, int] | None = None  # (idstr, instance_id) of the open FULL section

    # -- helpers ---------------------------------------------------------
    def _require(self, *states: _State, what: str) -> None:
        if self._state not in states:
            raise LocalProtocolError(f"{what} is not allowed now (encoder state {self._state.value})")

    def _enter_section(self, section_id: int, kind: int) -> bytes:
        self._require(_State.AFTER_HEADER, _State.TOP, what=w.SECTION_TYPE_NAMES[kind])
        if not 0 <= section_id <= 0xFFFFFFFF:
            raise LocalProtocolError(f"section id {section_id} does not fit in be32")
        return w.SECTION_HEAD.pack(kind, section_id)

    # -- stream structure ------------------------------------------------
    def header(self) -> bytes:
        """File header: magic "QEVM" and version 3."""
        self._require(_State.START, what="the file header")
        self._state = _State.AFTER_HEADER
        return w.FILE_HEADER.pack(w.QEMU_VM_FILE_MAGIC, w.QEMU_VM_FILE_VERSION)

    def configuration(self, name: str) -> bytes:
        """QEMU_VM_CONFIGURATION with the machine type name (right after the header)."""
        self._require(_State.AFTER_HEADER, what="the configuration section")
        raw = name.encode()
        if len(raw) > w.MAX_MACHINE_NAME_BYTES:
            raise LocalProtocolError(f"machine name longer than {w.MAX_MACHINE_NAME_BYTES} bytes")
        self._state = _State.TOP
        self._vmdesc.configuration = vms.configuration_desc(name)
        return bytes((w.QEMU_VM_CONFIGURATION,)) + w.BE32.pack(len(raw)) + raw

    def section_start(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
        """QEMU_VM_SECTION_START; only the ``"ram"`` section is iterative here."""
        head = self._enter_section(section_id, w.QEMU_VM_SECTION_START)
        if (idstr, instance_id, version_id) != (w.RAM_SECTION_IDSTR, w.RAM_SECTION_INSTANCE, w.RAM_SECTION_VERSION):
            raise LocalProtocolError(f"only 'ram' instance 0 version 4 can be started, not {idstr!r}")
        if section_id in self._sections or "ram" in self._sections.values() or "ram-ended" in self._sections.values():
            raise LocalProtocolError(f"section id {section_id} already used or 'ram' already started")
        out = head + w.encode_idstr(idstr) + w.SECTION_TAIL.pack(instance_id, version_id)
        self._sections[section_id] = "ram"
        self._open_ram(section_id)
        return out

    def section_part(self, section_id: int) -> bytes:
        """QEMU_VM_SECTION_PART of the started ``"ram"`` section."""
        head = self._enter_section(section_id, w.QEMU_VM_SECTION_PART)
        if self._sections.get(section_id) != "ram":
            raise LocalProtocolError(f"section {section_id} is not a started (and not ended) section")
        self._open_ram(section_id)
        return head

    def section_end(self, section_id: int) -> bytes:
        """QEMU_VM_SECTION_END: the last part of the ``"ram"`` section."""
        head = self._enter_section(section_id, w.QEMU_VM_SECTION_END)
        if self._sections.get(section_id) != "ram":
            raise LocalProtocolError(f"section {section_id} is not a started (and not ended) section")
        self._sections[section_id] = "ram-ended"
        self._open_ram(section_id)
        return head

    def section_full(self, section_id: int, idstr: str, instance_id: int, version_id: int) -> bytes:
        """QEMU_VM_SECTION_FULL: our ``"migrator-vcpus"`` section or a QEMU device
        section whose layout ``transport._vmstate`` knows (``timer``, ``globalstate``,
        ``slirp``); follow it with :meth:`device_state` or :meth:`vmstate`."""
        head = self._enter_section(section_id, w.QEMU_VM_SECTION_FULL)
        layout = vms.KNOWN_SECTIONS.get(idstr)
        if layout is None or (instance_id, version_id) != (0, layout.version):
            known = ", ".join(f"{k!r} v{v.version}" for k, v in vms.KNOWN_SECTIONS.items())
            raise LocalProtocolError(f"no full section {idstr!r} instance {instance_id} version {version_id} "
                                     f"(known: instance 0 of {known})")
        if section_id in self._sections:
            raise LocalProtocolError(f"section id {section_id} is already used")
        out = head + w.encode_idstr(idstr) + w.SECTION_TAIL.pack(instance_id, version_id)
        self._sections[section_id] = "full"
        self._state = _State.DEVICE
        self._cur = section_id
        self._full = (idstr, instance_id)
        return out

    def section_footer(self, section_id: int) -> bytes:
        """QEMU_VM_SECTION_FOOTER after a section's payload (EOS or device state)."""
        self._require(_State.RAM_DONE, _State.DEVICE_DONE, what="a section footer")
        if section_id != self._cur:
            raise LocalProtocolError(f"footer for section {section_id}, but section {self._cur} is open")
        self._state = _State.TOP
        self._cur = None
        return w.SECTION_HEAD.pack(w.QEMU_VM_SECTION_FOOTER, section_id)

    def eof(self) -> bytes:
        """QEMU_VM_EOF: the end of the stream."""
        self._require(_State.AFTER_HEADER, _State.TOP, what="EOF")
        self._state = _State.DONE
        return bytes((w.QEMU_VM_EOF,))

    def vmdescription(self) -> bytes:
        """QEMU_VM_VMDESCRIPTION after EOF: the JSON describing every section written.

        QEMU's layout (see ``transport._vmstate``): the configuration, the page
        size and one entry per device section, in stream order, sized from the
        bytes actually written.
        """
        self._require(_State.DONE, what="the VM description")
        raw = self._vmdesc.json_bytes()
        self._state = _State.DESCRIBED
        return bytes((w.QEMU_VM_VMDESCRIPTION,)) + w.BE32.pack(len(raw)) + raw

    def _open_ram(self, section_id: int) -> None:
        self._state = _State.RAM
        self._cur = section_id
        # Name the block again in every section.  QEMU's loader would accept
        # CONTINUE here (it remembers the block across sections) but a
        # self-contained section is easier to inspect and costs ~4 bytes.
        self._last_block = None

    # -- RAM payload -----------------------------------------------------
    def ram_mem_size(self, blocks: Iterable[tuple[str, int]]) -> bytes:
        """RAM_SAVE_FLAG_MEM_SIZE: the block list, ``(idstr, used_length)`` pairs.

        Sent once, in the START section, before any page.
        """
        self._require(_State.RAM, what="MEM_SIZE")
        if self._blocks is not None:
            raise LocalProtocolError("MEM_SIZE was already sent")
        table: dict[str, int] = {}
        parts = []
        for idstr, length in blocks:
            if idstr in table:
                raise LocalProtocolError(f"block {idstr!r} listed twice")
            if length <= 0 or length % self.page_size:
                raise LocalProtocolError(f"block {idstr!r} used_length {length} is not a positive page multiple")
            try:
                parts.append(w.encode_idstr(idstr) + w.BE64.pack(length))
            except ValueError as exc:
                raise LocalProtocolError(str(exc)) from None
            table[idstr] = length
        total = sum(table.values())
        self._blocks = table
        return w.BE64.pack(total | w.RAM_SAVE_FLAG_MEM_SIZE) + b"".join(parts)

    def eos(self) -> bytes:
        """RAM_SAVE_FLAG_EOS: end of this section's RAM payload."""
        self._require(_State.RAM, what="EOS")
        self._state = _State.RAM_DONE
        return w.BE64.pack(w.RAM_SAVE_FLAG_EOS)

    def device_state(self, data: bytes | bytearray | memoryview) -> bytes:
        """Payload of our device section: be32 length + the opaque bytes."""
        self._require(_State.DEVICE, what="device state")
        if self._full is None or self._full[0] != w.VCPU_SECTION_IDSTR:
            raise LocalProtocolError(f"device_state() is for {w.VCPU_SECTION_IDSTR!r}; use vmstate()")
        raw = bytes(data)
        if len(raw) > 0xFFFFFFFF:
            raise LocalProtocolError("device state does not fit a be32 length")
        out = w.BE32.pack(len(raw)) + raw
        self._describe(out)
        self._state = _State.DEVICE_DONE
        return out

    def vmstate(self, payload: bytes | bytearray | memoryview) -> bytes:
        """Payload of a QEMU device section, checked against its layout (so the
        description written after EOF is true to the bytes)."""
        self._require(_State.DEVICE, what="device state")
        if self._full is None or self._full[0] == w.VCPU_SECTION_IDSTR:
            raise LocalProtocolError(f"vmstate() is for QEMU device sections; use device_state() for "
                                     f"{w.VCPU_SECTION_IDSTR!r}")
        raw = bytes(payload)
        self._describe(raw)
        self._state = _State.DEVICE_DONE
        return raw

    def _describe(self, payload: bytes) -> None:
        assert self._full is not None
        idstr, instance_id = self._full
        layout = vms.KNOWN_SECTIONS[idstr]
        # A footer byte after the payload ends its subsection list.
        try:
            measured = vms.measure_section(payload + bytes((w.QEMU_VM_SECTION_FOOTER,)), 0, len(payload) + 1, layout)
        except vms.LayoutError as exc:
            raise LocalProtocolError(f"section {idstr!r} payload: {exc.detail}") from None
        if measured is None or measured.length != len(payload):
            got = "too short" if measured is None else f"{measured.length} of its {len(payload)} bytes fit"
            raise LocalProtocolError(f"section {idstr!r} payload does not fit its layout ({got})")
        self._vmdesc.devices.append(vms.describe_section(idstr, instance_id, layout, measured))

    def ram_pages(
        self,
        block_idstr: str,
        block_pages: NDArray[np.uint8],
        page_indices: ArrayLike,
        *,
        detect_zero: bool = True,
    ) -> EncodedPages:
        """Encode pages of one block as ZERO and PAGE records.

        (:meth:`ram_zero_pages` is the multifd variant: ZERO records only.)

        Args:
            block_idstr: the block, as listed in MEM_SIZE.
            block_pages: the whole block as a ``(npages, page_size)`` ``uint8``
                view (``RAMBlock.pages``); read once, never modified.
            page_indices: page numbers within the block (any integer array;
                each should appear once per call).
            detect_zero: send all-zero pages as ZERO records (QEMU's default
                ``zero-page-detection``).  If false every page is a PAGE.

        Returns:
            ``EncodedPages(buffers, normal, zero)``; the buffers are valid
            until the next ``ram_pages`` call.

        Raises:
            LocalProtocolError: not inside a RAM payload, unknown block, shape
                mismatch or an index outside the block.  Nothing is encoded.
        """
        return self._encode_pages(block_idstr, block_pages, page_indices, detect_zero=detect_zero, stage=True)[0]

    def ram_zero_pages(
        self, block_idstr: str, block_pages: NDArray[np.uint8], page_indices: ArrayLike, *, detect_zero: bool = True
    ) -> tuple[EncodedPages, NDArray[np.intp]]:
        """multifd (QEMU 7.2): ZERO records for the zero pages among ``page_indices``;
        the non-zero ones are returned (ascending if the input was) for the
        multifd channels, neither copied nor encoded here.  Validation as
        :meth:`ram_pages`."""
        enc, nonzero = self._encode_pages(block_idstr, block_pages, page_indices, detect_zero=detect_zero,
                                          stage=False)
        return enc, nonzero

    def _encode_pages(self, block_idstr: str, block_pages: NDArray[np.uint8], page_indices: ArrayLike, *,
                      detect_zero: bool, stage: bool) -> tuple[EncodedPages, NDArray[np.intp]]:
        self._require(_State.RAM, what="page records")
        if self._blocks is None:
            raise LocalProtocolError("page records before MEM_SIZE")
        used = self._blocks.get(block_idstr)
        if used is None:
            raise LocalProtocolError(f"block {block_idstr!r} was not listed in MEM_SIZE")
        ps = self.page_size
        npages = used // ps
        if block_pages.dtype != np.uint8 or block_pages.shape != (npages, ps):
            raise LocalProtocolError(
                f"block {block_idstr!r} pages must be a ({npages}, {ps}) uint8 array, "
                f"got {block_pages.shape} {block_pages.dtype}"
            )
        if not block_pages.flags.c_contiguous:
            # np.take would silently copy the whole block first.
            raise LocalProtocolError(f"block {block_idstr!r} pages must be C-contiguous")
        idx = np.asarray(page_indices)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise LocalProtocolError("page_indices must be a 1-D integer array")
        idx = idx.astype(np.intp, copy=False)
        n = idx.size
        if n == 0:
            return EncodedPages([], 0, 0), idx
        if int(idx.min()) < 0 or int(idx.max()) >= npages:
            raise LocalProtocolError(f"page index outside block {block_idstr!r} ({npages} pages)")

        rec = self._rec
        if stage and self._stage.size < n * rec:
            self._stage = np.empty(n * rec, dtype=np.uint8)
        records = self._stage[: n * rec].reshape(-1, rec)
        data_col = records[:, 8:]
        zero_idx: list[NDArray[np.intp]] = []
        sent_idx: list[NDArray[np.intp]] = []
        k = 0  # PAGE records staged
        for s in range(0, n, self._chunk):
            ci = idx[s : s + self._chunk]
            m = ci.size
            first_page = int(ci[0])
            if m > 1 and (np.diff(ci) == 1).all():
                # A run of consecutive pages (the bulk pass, dense dirty
                # ranges): read it in place, no gather.
                src = block_pages[first_page : first_page + m]
            else:
                src = self._scratch[:m]
                np.take(block_pages, ci, axis=0, out=src, mode="clip")  # the one read of guest RAM
            zmask = self._zero_mask(src) if detect_zero else None
            if zmask is None or not zmask.any():
                if stage:
                    data_col[k : k + m] = src
                sent_idx.append(ci)
                k += m
            else:
                keep = ~zmask
                nz = int(np.count_nonzero(keep))
                if stage:
                    data_col[k : k + nz] = src[keep]
                sent_idx.append(ci[keep])
                zero_idx.append(ci[zmask])
                k += nz

        buffers: list[memoryview] = []
        first = True
        nzero = 0
        if zero_idx:
            zi = np.concatenate(zero_idx)
            nzero = zi.size
            if self._zstage.size < nzero:
                self._zstage = np.empty(max(nzero, self._chunk), dtype=_ZERO_REC)
            zrec = self._zstage[:nzero]
            zrec["hdr"] = (zi.astype(np.uint64) << np.uint64(self._shift)) | np.uint64(w.ZERO_CONT)
            zrec["fill"] = 0
            zbytes = w.byte_view(zrec.view(np.uint8).reshape(-1))
            buffers += self._name_first(block_idstr, zbytes, int(zi[0]), w.RAM_SAVE_FLAG_ZERO)
            first = False
        pi = (np.concatenate(sent_idx) if len(sent_idx) > 1 else sent_idx[0]) if sent_idx else idx[:0]
        if not stage:
            if nzero:
                self._last_block = block_idstr
            return EncodedPages(buffers, 0, nzero), pi
        if k:
            hdr_col = np.ndarray((k,), dtype=_BE64, buffer=self._stage, offset=0, strides=(rec,))
            hdr_col[:] = (pi.astype(np.uint64) << np.uint64(self._shift)) | np.uint64(w.PAGE_CONT)
            pbytes = w.byte_view(self._stage)[: k * rec]
            if first and self._last_block != block_idstr:
                buffers += self._name_first(block_idstr, pbytes, int(pi[0]), w.RAM_SAVE_FLAG_PAGE)
            else:
                buffers.append(pbytes)
        self._last_block = block_idstr
        return EncodedPages(buffers, k, nzero), pi

    def _name_first(self, idstr: str, recs: memoryview, page: int, kind: int) -> list[memoryview]:
        """Split off the first record's header if it must name the block."""
        if self._last_block == idstr:
            return [recs]
        head = w.BE64.pack((page << self._shift) | kind) + w.encode_idstr(idstr)
        return [memoryview(head), recs[8:]]

    def _zero_mask(self, scratch: NDArray[np.uint8]) -> NDArray[np.bool_]:
        """Which pages of ``scratch`` are all zero (QEMU's ``buffer_is_zero``)."""
        words: NDArray[np.uint64] = scratch.view(np.uint64)
        cand: NDArray[np.bool_] = words[:, 0] == 0  # prefilter: most non-zero pages fail here
        ncand = int(np.count_nonzero(cand))
        if ncand == 0:
            return cand
        if 2 * ncand >= len(cand):
            full: NDArray[np.bool_] = np.bitwise_or.reduce(words, axis=1) == 0
            return full
        where = np.flatnonzero(cand)
        cand[where] = np.bitwise_or.reduce(words[where], axis=1) == 0
        return cand
