"""In-process pieces for the ownership and device-section tests.

* :func:`build_stream`: a complete, valid migration stream (header,
  configuration, ``ram`` START/END with every page, our device section, EOF)
  with any device payload, plus the offsets of its regions.
* :class:`FakeChannel`: what :meth:`IncomingMigration.process` reads from
  and acknowledges into, fed by the test chunk by chunk, so a test decides
  exactly how many bytes the destination has seen (no socket, no race).
* :func:`destination_vm` / :func:`source_vm`: real VM objects (sim accel).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import json

import numpy as np
import trio

from migrator.engine._devstate import pack_device_state
from migrator.engine._machine import parse_accel
from migrator.qmp._vm import VM
from transport import (MACHINE_NAME, RAM_SECTION_IDSTR, RAM_SECTION_VERSION, VCPU_SECTION_IDSTR,
                       VCPU_SECTION_VERSION, StreamEncoder)

MEMORY = 2 << 20  # ab needs more than 1 MiB


def destination_vm(*, memory: int = MEMORY, start_paused: bool = False, handover: bool = False,
                   uri: str = "tcp:127.0.0.1:0") -> VM:
    vm = VM(memory_bytes=memory, accel=parse_accel("sim"), incoming=uri, start_paused=start_paused, label="dst")
    if handover:
        set_caps(vm, "x-handover")
    return vm


def source_vm(*, memory: int = MEMORY, workload: str = "ab", rate: float | None = 20000.0,
              handover: bool = False) -> VM:
    opts = {"rate": rate} if rate else {}
    vm = VM(memory_bytes=memory, accel=parse_accel("sim"), workload=workload, workload_opts=opts, label="src")
    if handover:
        set_caps(vm, "x-handover")
    return vm


def set_caps(vm: VM, *names: str) -> None:
    vm.options.capabilities = vm.options.capabilities.apply([{"capability": n, "state": True} for n in names])


def sim_state(workload: str = "ab", *, memory: int = MEMORY, rate: float | None = 1000.0, steps: int = 3) -> dict:
    """A genuine sim vCPU state (from a real SimVCPUs after a few steps)."""
    vm = source_vm(memory=memory, workload=workload, rate=rate)
    vm.machine.boot()
    for _ in range(steps):
        vm.vcpus.workload.step(97, vm.machine.kvm.vcpu_write)
    return json.loads(vm.vcpus.save_state())


def device_payload(state: dict | bytes, *, running: bool = True, handover: bool = False) -> bytes:
    blob = state if isinstance(state, bytes) else json.dumps(state).encode()
    return pack_device_state(running, blob, handover=handover)


def build_stream(device: bytes | None, *, memory: int = MEMORY, seed: int = 1) -> tuple[bytes, dict]:
    """A valid stream carrying ``device`` (None: RAM only); and its region offsets."""
    enc = StreamEncoder()
    npages = memory // 4096
    pages = np.zeros((npages, 4096), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    pages[::3, :8] = rng.integers(1, 255, size=(len(pages[::3]), 8), dtype=np.uint8)
    out = bytearray()
    regions = {}
    out += enc.header() + enc.configuration(MACHINE_NAME)
    regions["header"] = 0
    regions["ram-start"] = len(out)
    out += (enc.section_start(1, RAM_SECTION_IDSTR, 0, RAM_SECTION_VERSION) + enc.ram_mem_size([("ram", memory)])
            + enc.eos() + enc.section_footer(1))
    out += enc.section_end(1)
    regions["pages"] = len(out)
    for start in range(0, npages, 256):  # the buffers are views: copy before the next call
        for buf in enc.ram_pages("ram", pages, np.arange(start, min(start + 256, npages))).buffers:
            out += bytes(buf)
    out += enc.eos() + enc.section_footer(1)
    if device is not None:
        regions["device"] = len(out)
        out += enc.section_full(2, VCPU_SECTION_IDSTR, 0, VCPU_SECTION_VERSION) + enc.device_state(device)
        regions["device-footer"] = len(out)
        out += enc.section_footer(2)
    regions["eof"] = len(out)
    out += enc.eof()
    regions["vmdesc"] = len(out)
    out += enc.vmdescription()  # as every stream we write: QEMU's description after EOF
    regions["end"] = len(out)
    return bytes(out), regions


class FakeChannel:
    """A channel whose incoming bytes the test releases explicitly."""

    def __init__(self, data: bytes = b"", *, close: bool = True) -> None:
        self._send, self._recv = trio.open_memory_channel(1000)
        self.sent: list[bytes] = []
        self.bytes_received = 0
        if data:
            self.feed(data)
        if close:
            self.close()

    def feed(self, data: bytes) -> None:
        self._send.send_nowait(bytes(data))

    def close(self) -> None:
        self._send.send_nowait(b"")

    async def receive_into(self, decoder, sizehint: int = 1 << 20) -> int:
        data = await self._recv.receive()
        decoder.receive_data(data)
        self.bytes_received += len(data)
        return len(data)

    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._recv.receive()

    async def send_all(self, buffers) -> None:
        self.sent.append(b"".join(bytes(b) for b in buffers))
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def vcpus_running(vm: VM):
    """``vm`` with its vCPU processes started (stopped, as at boot), for tests
    that drive the engine directly instead of ``VM.run``; stopped on exit."""
    async with trio.open_nursery() as nursery:
        await nursery.start(vm.vcpus.run)
        yield vm
        nursery.cancel_scope.cancel()
