"""Every stream our engine writes ends with a VM description that matches it.

Our decoder (the "reader of our own") checks the description against the
device sections it actually read; here it reads real files written by
``migrator run`` in each device-section mode.
"""

from __future__ import annotations

import pytest
import trio

from transport import ConnectionClosed, StreamDecoder, VMDescription, listen_channel

from .harness import vm_process

pytestmark = pytest.mark.trio_timeout(60)


async def _read_all(path) -> tuple[list, StreamDecoder]:
    listener = await listen_channel(f"file:{path}")
    async with listener:
        chan = await listener.accept()
    dec = StreamDecoder()
    events = []
    async with chan:
        while not isinstance(ev := await chan.next_event(dec), ConnectionClosed):
            events.append(type(ev).__name__)
    return events, dec


@pytest.mark.parametrize(("cap", "devices"), [
    (None, ["migrator-vcpus"]),
    ("x-ram-only", []),
    ("x-qemu-devices", ["timer", "globalstate"]),
])
async def test_file_stream_description_matches_its_sections(tmp_path, cap, devices):
    path = tmp_path / "out.stream"
    async with vm_process(tmp_path, "src", memory="16M", workload="random,rate=5000") as src:
        if cap:
            await src.qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": cap, "state": True}]})
        await trio.sleep(0.1)
        await src.qmp.execute("migrate", {"uri": f"file:{path}"})
        assert (await src.qmp.wait_migration())["status"] == "completed", src.log()
    events, dec = await _read_all(path)
    assert events[-2:] == ["EndOfStream", VMDescription.__name__]
    assert [d["name"] for d in dec.vmdesc["devices"]] == devices
    assert dec.vmdesc["configuration"]["fields"][1] == {"name": "name", "type": "buffer", "size": 4}
