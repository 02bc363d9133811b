"""Interoperability with stock QEMU (``qemu-system-x86_64``, checked with 7.2).

Facts these tests pin down (QEMU 7.2.22, Debian 12):

* ``-M none -m 64M`` has exactly one RAM block, idstr ``"ram"`` (the machine's
  ``default_ram_id``; HMP ``info ramblock``), mapped at guest-physical 0.
* The stream must carry the CONFIGURATION section with the destination's
  machine type name (``"none"`` here): without it QEMU fails with
  "Configuration section missing", with another name "Machine type received
  is 'pc' and local is 'none'".
* A RAM-only stream (header, configuration, the ``"ram"`` section with
  footers, EOF) is accepted; QEMU then prints "Expected vmdescription
  section, but got 0" (it does not fail) and runs the guest.
* MEM_SIZE must list blocks QEMU has ("Unknown ramblock") with exactly its
  ``used_length`` ("Size mismatch": ``-M none``'s block is not resizable).
* Our ``migrator-vcpus`` section makes QEMU fail ("Unknown savevm section or
  instance 'migrator-vcpus' 0"): hence the ``x-ram-only`` capability.
* QEMU's own stream starts a PART section with ``PAGE|CONTINUE`` when the
  block did not change, and its device sections (``timer``, ``slirp`` with a
  ``-netdev user``, ``globalstate`` for ``-M none``) follow the RAM END
  section; the description JSON follows EOF.
* QEMU 7.2 has no ``file:`` migration URI (added in 8.2): streams go through
  ``exec:cat``.

qemu.qmp is asyncio-only, so it runs in a worker thread under
``asyncio.run`` (``trio.to_thread.run_sync``), never inside trio.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import trio

from .harness import qemu_qmp as qmp
from transport._vmstate import decode_globalstate
from transport import (
    ConnectionClosed,
    EndOfStream,
    RamEOS,
    RamPages,
    RamZeroPages,
    SectionEnd,
    SectionFooter,
    StreamDecoder,
    StreamEncoder,
    VMDescription,
    VMStateSection,
    listen_channel,
    open_channel,
)

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86_64 not on PATH (Debian: apt-get install qemu-system-x86)"
)

PS = 4096
MIB = 64
NPAGES = MIB * 256
MACHINE = "none"
BLOCK = "ram"  # -M none's RAM block in QEMU 7.2


def _qemu_version() -> tuple[int, int]:
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = re.search(r"version (\d+)\.(\d+)", out).groups()  # type: ignore[union-attr]
    return int(major), int(minor)


async def _wait_for_path(path, proc) -> None:
    while not path.exists():
        if proc.returncode is not None:
            raise AssertionError(f"QEMU exited early with {proc.returncode}")
        await trio.sleep(0.05)


async def _wait_migration_done(qmp_sock) -> dict:
    while True:
        (info,) = await qmp(qmp_sock, ("query-migrate", None))
        if info.get("status") in ("completed", "failed"):
            return info
        await trio.sleep(0.05)


def _guest() -> np.ndarray:
    rng = np.random.default_rng(42)
    guest = np.zeros((NPAGES, PS), dtype=np.uint8)
    touched = rng.choice(NPAGES, 3000, replace=False)
    guest[touched] = rng.integers(0, 256, (len(touched), PS), dtype=np.uint8)
    guest[touched[:200]] = 0  # sent as ZERO records
    guest[-1] = 0x5A  # the last page of the block
    guest[touched[200:300], :8] = 0  # first word zero, rest not: must go as PAGE
    return guest


def _stream_pieces(guest: np.ndarray, machine: str = MACHINE, device: bytes | None = None):
    """Yield the stream as lists of buffers: 2 PART sections and the END section."""
    enc = StreamEncoder()
    sid = 2
    yield [enc.header(), enc.configuration(machine), enc.section_start(sid, "ram", 0, 4)]
    yield [enc.ram_mem_size([(BLOCK, guest.nbytes)]), enc.eos(), enc.section_footer(sid)]
    pages = np.flatnonzero(np.bitwise_or.reduce(guest.view(np.uint64), axis=1) != 0)
    pages = np.concatenate([pages, np.arange(0, 50)])  # plus some untouched (zero) pages
    for part, chunk in enumerate(np.array_split(np.random.default_rng(0).permutation(pages), 3)):
        yield [enc.section_end(sid) if part == 2 else enc.section_part(sid)]
        for batch in np.array_split(chunk, 4):
            yield enc.ram_pages(BLOCK, guest, batch).buffers  # sent before the next call
        yield [enc.eos(), enc.section_footer(sid)]
    if device is not None:
        yield [enc.section_full(3, "migrator-vcpus", 0, 1), enc.device_state(device), enc.section_footer(3)]
    yield [enc.eof()]


async def _start_qemu(args: list[str], **kw):
    return await trio.lowlevel.open_process(
        [QEMU, "-M", MACHINE, "-m", f"{MIB}M", "-nodefaults", "-display", "none", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        **kw,
    )


async def _stop(proc) -> bytes:
    if proc.returncode is None:
        proc.kill()
    await proc.wait()
    return await proc.stderr.receive_some(1 << 16) if proc.stderr else b""


async def test_qemu_loads_our_ram_stream(tmp_path):
    """Our encoder + unix channel -> stock QEMU ``-incoming``; compare its RAM with ours."""
    guest = _guest()
    mig, mon, dump = tmp_path / "mig.sock", tmp_path / "qmp.sock", tmp_path / "mem.bin"
    with trio.fail_after(60):
        proc = await _start_qemu(["-incoming", f"unix:{mig}", "-qmp", f"unix:{mon},server=on,wait=off"])
        try:
            await _wait_for_path(mig, proc)
            (blocks,) = await qmp(mon, ("human-monitor-command", {"command-line": "info ramblock"}))
            assert re.search(rf"^\s*{BLOCK}\s+4 KiB\s+0x0+\s+0x0*4000000\b", blocks, re.M), blocks
            chan = await open_channel(f"unix:{mig}")
            async with chan:
                for buffers in _stream_pieces(guest):
                    await chan.send_all(buffers)
            info = await _wait_migration_done(mon)
            status, _ = await qmp(mon, ("query-status", None), ("pmemsave", {"val": 0, "size": guest.nbytes, "filename": str(dump)}))
        finally:
            stderr = await _stop(proc)
    assert info["status"] == "completed", (info, stderr)
    assert status["status"] == "running"
    np.testing.assert_equal(np.fromfile(dump, np.uint8).reshape(NPAGES, PS), guest)
    assert b"Expected vmdescription section" in stderr  # harmless: no VMDESCRIPTION after EOF


def _setup_only(blocks: list[tuple[str, int]]) -> list[list[bytes]]:
    enc = StreamEncoder()
    head = [enc.header(), enc.configuration(MACHINE), enc.section_start(2, "ram", 0, 4)]
    return [head, [enc.ram_mem_size(blocks), enc.eos(), enc.section_footer(2), enc.eof()]]


_ONE_PAGE = np.zeros((NPAGES, PS), dtype=np.uint8)
_ONE_PAGE[7] = 1


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        (lambda: _stream_pieces(_ONE_PAGE, "pc"), b"Machine type received is 'pc' and local is 'none'"),
        (lambda: _stream_pieces(_ONE_PAGE, device=b"vcpu"), b"Unknown savevm section or instance 'migrator-vcpus' 0"),
        (lambda: _setup_only([(BLOCK, NPAGES * PS // 2)]), b"Size mismatch: ram: 0x2000000 != 0x4000000"),
        (lambda: _setup_only([(BLOCK, NPAGES * PS), ("pc.ram", PS)]), b'Unknown ramblock "pc.ram"'),
    ],
    ids=["wrong-machine-name", "our-device-section", "block-size-mismatch", "unknown-block"],
)
async def test_qemu_rejects(tmp_path, pieces, message):
    path = tmp_path / "stream.bin"
    with trio.fail_after(60):
        chan = await open_channel(f"file:{path}")
        async with chan:
            for buffers in pieces():
                await chan.send_all(buffers)
        proc = await _start_qemu(["-incoming", f"exec:cat {path}"])
        with trio.move_on_after(30):
            await proc.wait()
        stderr = await _stop(proc)
    assert proc.returncode == 1, stderr
    assert message in stderr
    assert b"load of migration failed" in stderr


async def test_decode_a_stream_qemu_produced(tmp_path):
    """QEMU ``migrate`` -> file -> our decoder: the RAM it carries equals pmemsave."""
    rng = np.random.default_rng(5)
    blob = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    blob[10 * PS : 20 * PS] = 0
    (tmp_path / "blob.bin").write_bytes(blob.tobytes())
    mon, out, dump = tmp_path / "qmp.sock", tmp_path / "qemu-stream.bin", tmp_path / "mem.bin"
    uri = f"file:{out}" if _qemu_version() >= (8, 2) else f"exec:cat > {out}"
    with trio.fail_after(60):
        proc = await _start_qemu(
            ["-device", f"loader,file={tmp_path / 'blob.bin'},addr=0x100000,force-raw=on",
             "-qmp", f"unix:{mon},server=on,wait=off"]
        )
        try:
            await _wait_for_path(mon, proc)
            await qmp(mon, ("migrate", {"uri": uri}))
            info = await _wait_migration_done(mon)
            await qmp(mon, ("pmemsave", {"val": 0, "size": NPAGES * PS, "filename": str(dump)}))
        finally:
            await _stop(proc)
        assert info["status"] == "completed", info
        listener = await listen_channel(f"file:{out}")
        async with listener:
            chan = await listener.accept()
        dec = StreamDecoder(max_block_bytes={BLOCK: NPAGES * PS})
        mem = np.zeros((NPAGES, PS), dtype=np.uint8)
        seen: list = []
        async with chan:
            while not isinstance(ev := await chan.next_event(dec), ConnectionClosed):
                if isinstance(ev, RamPages):
                    mem[(ev.offsets // PS).astype(np.intp)] = ev.data
                elif isinstance(ev, RamZeroPages):
                    mem[(ev.offsets // PS).astype(np.intp)] = 0
                else:
                    seen.append(ev)
    # The RAM section ends cleanly, then -M none's device sections (timer,
    # globalstate: -nodefaults, so no slirp), EOF and the description, which
    # the decoder checked against those sections.
    end = next(i for i, ev in enumerate(seen) if isinstance(ev, SectionEnd))
    assert seen[end + 1 : end + 3] == [RamEOS(), SectionFooter(seen[end].section_id)]
    devices = [ev for ev in seen if isinstance(ev, VMStateSection)]
    assert [(d.idstr, d.version_id) for d in devices] == [("timer", 2), ("globalstate", 1)]
    assert decode_globalstate(devices[1].data) == "running"
    assert isinstance(seen[-2], EndOfStream) and isinstance(seen[-1], VMDescription)
    assert [d["name"] for d in dec.vmdesc["devices"]] == ["timer", "globalstate"]
    assert info["ram"]["normal"] > 0 and info["ram"]["duplicate"] > 0
    qemu_mem = np.fromfile(dump, np.uint8).reshape(NPAGES, PS)
    np.testing.assert_equal(mem, qemu_mem)
    np.testing.assert_equal(qemu_mem.reshape(-1)[0x100000 : 0x100000 + blob.size], blob)
