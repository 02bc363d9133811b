"""Device-section validation: hostile states never load, never run.

The named cases are the issue's (rate "fast", NaN, Infinity, a 10**30
cursor, wrong vCPU count, wrong accelerator kind, truncated, oversized);
the fuzz drives thousands of structured mutants of genuine states through
the real destination path (:meth:`IncomingMigration.process` on a whole
stream): a rejected mutant leaves the destination ``failed``, paused, with a
negative acknowledgement and a ``ProtocolError``-family cause; an accepted
one must be a state the guest can really run from.
"""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from memory.kvm.real import VCPUStateError, validate_vcpu_states
from memory.kvm.real.vcpu import encode_vcpu_states
from migrator.engine._devstate import KVM_STATE_MAGIC, KVM_STATE_SECTIONS, DeviceStateError, validate_device_state
from migrator.engine._devstate import pack_device_state
from migrator.engine._status import MigrationStatus as S
from transport import ProtocolError, encode_shut

from .streams import MEMORY, FakeChannel, build_stream, destination_vm, device_payload, sim_state

NPAGES = MEMORY // 4096


def validate(payload: bytes, *, accel: str = "sim", nvcpus: int = 1):
    return validate_device_state(payload, offset=1234, accel=accel, npages=NPAGES, nvcpus=nvcpus)


def kvm_blob(nvcpus: int = 1, *, mp_state: int = 0, program="ab") -> bytes:
    """A blob in memory.kvm.real.vcpu's format (built without /dev/kvm)."""
    payload = bytearray()
    vcpus = []
    for i in range(nvcpus):
        sections = {}
        for name, size in KVM_STATE_SECTIONS.items():
            sections[name] = [len(payload), size]
            payload += struct.pack("<I", mp_state) if name == "mp_state" else bytes(size)
        vcpus.append({"id": i, "halted": False, "sections": sections, "msrs": [[0x10, 5]], "regs": {"rip": 4096}})
    header = json.dumps({"format": "migrator-kvm-vcpu", "version": 1, "program": program, "vcpus": vcpus}).encode()
    return KVM_STATE_MAGIC + struct.pack("<I", len(header)) + header + bytes(payload)


def with_field(state: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(state)
    obj = out
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    return out


def test_genuine_states_are_accepted():
    for wl in ("idle", "ab", "random", "hotset", "fill", "stream"):
        st_ = sim_state(wl)
        valid = validate(device_payload(st_, running=False))
        assert valid.running is False and json.loads(valid.vcpu_state) == st_
    assert validate(device_payload(kvm_blob()), accel="kvm").running is True
    assert validate(pack_device_state(True, kvm_blob(2)), accel="kvm", nvcpus=2)
    assert validate(device_payload(sim_state("idle"), handover=True)).handover is True
    assert validate(device_payload(sim_state("idle"))).handover is False


NAMED = {
    "rate-fast": lambda s: device_payload(with_field(s, ("rate",), "fast")),
    "rate-nan": lambda s: device_payload(json.dumps(with_field(s, ("rate",), float("nan"))).encode()),
    "rate-infinity": lambda s: device_payload(json.dumps(with_field(s, ("rate",), float("inf"))).encode()),
    "rate-negative": lambda s: device_payload(with_field(s, ("rate",), -5)),
    "cursor-1e30": lambda s: device_payload(with_field(s, ("vcpus", 0, "cursor"), 10**30)),
    "cursor-beyond-ram": lambda s: device_payload(with_field(s, ("vcpus", 0, "cursor"), NPAGES)),
    "cursor-bool": lambda s: device_payload(with_field(s, ("vcpus", 0, "cursor"), True)),
    "passes-float": lambda s: device_payload(with_field(s, ("vcpus", 0, "passes"), 1.5)),
    "rng-state-2**200": lambda s: device_payload(with_field(s, ("vcpus", 0, "rng", "state", "state"), 2**200)),
    "rng-not-pcg64": lambda s: device_payload(with_field(s, ("vcpus", 0, "rng", "bit_generator"), "MT19937")),
    "unknown-workload": lambda s: device_payload(with_field(s, ("vcpus", 0, "name"), "rm -rf")),
    "unknown-field": lambda s: device_payload(with_field(s, ("extra",), 1)),
    "missing-field": lambda s: device_payload({k: v for k, v in s.items() if k != "rate"}),
    "duplicate-key": lambda s: pack_device_state(True, b'{"kind": "sim", "kind": "sim"}'),
    "wrong-accel-kind": lambda s: device_payload(kvm_blob()),
    "wrong-kind-field": lambda s: device_payload(with_field(s, ("kind",), "kvm")),
    "truncated": lambda s: device_payload(json.dumps(s).encode()[:-7]),
    "oversized": lambda s: device_payload(json.dumps(s).encode()[:-1] + b', "pad": "' + b"x" * (70 << 10) + b'"}'),
    "no-run-state": lambda s: json.dumps(s).encode(),
    "run-state-int": lambda s: b'{"running": 1}\n' + json.dumps(s).encode(),
    "run-state-extra": lambda s: b'{"running": true, "x": 0}\n' + json.dumps(s).encode(),
    "handover-false": lambda s: b'{"running": true, "handover": false}\n' + json.dumps(s).encode(),
    "handover-int": lambda s: b'{"running": true, "handover": 1}\n' + json.dumps(s).encode(),
    "not-utf8": lambda s: b'{"running": true}\n{"kind": "\xff"}',
    "empty": lambda s: b"",
}


@pytest.mark.parametrize("case", sorted(NAMED))
def test_named_hostile_states_are_rejected_with_the_offset(case):
    payload = NAMED[case](sim_state("ab"))
    with pytest.raises(DeviceStateError, match=r"at stream offset 1234") as info:
        validate(payload)
    assert isinstance(info.value, ProtocolError)


def test_kvm_state_checks():
    with pytest.raises(DeviceStateError, match=r"carries the state of 2 vCPU\(s\), this VM has 1"):
        validate(device_payload(kvm_blob(2)), accel="kvm")
    with pytest.raises(DeviceStateError, match="is for a sim accelerator, this VM uses kvm"):
        validate(device_payload(sim_state("ab")), accel="kvm")
    with pytest.raises(DeviceStateError, match="mp_state"):
        validate(device_payload(kvm_blob(mp_state=77)), accel="kvm")
    with pytest.raises(DeviceStateError, match="guest program"):
        validate(device_payload(kvm_blob(program="evil")), accel="kvm")
    blob = kvm_blob()
    for cut in (5, 12, 40, len(blob) - 1):
        with pytest.raises(DeviceStateError):
            validate(device_payload(blob[:cut]), accel="kvm")
    hlen = struct.unpack_from("<I", blob, 8)[0]
    with pytest.raises(DeviceStateError, match="header length"):
        validate(device_payload(blob[:8] + struct.pack("<I", hlen + 10**6) + blob[12:]), accel="kvm")


def _kvm_mutants() -> dict[str, bytes]:
    blob = kvm_blob()
    hlen = struct.unpack_from("<I", blob, 8)[0]
    header = json.loads(blob[12:12 + hlen])

    def rehead(h: dict, edit=lambda hj: hj) -> bytes:
        hj = edit(json.dumps(h).encode())
        return KVM_STATE_MAGIC + struct.pack("<I", len(hj)) + hj + blob[12 + hlen:]

    return {
        "mp_state-77": kvm_blob(mp_state=77),
        "program-evil": kvm_blob(program="evil"),
        "halted-missing": rehead(with_field(header, ("vcpus", 0), {k: v for k, v in header["vcpus"][0].items()
                                                                    if k != "halted"})),
        "id-1": rehead(with_field(header, ("vcpus", 0, "id"), 1)),
        "msr-index-2**32": rehead(with_field(header, ("vcpus", 0, "msrs"), [[1 << 32, 0]])),
        "regs-unknown-field": rehead(with_field(header, ("vcpus", 0, "regs"), {"eip": 1})),
        "version-true": rehead(with_field(header, ("version",), True)),
        "duplicate-key": rehead(header, lambda hj: hj.replace(b'"program": "ab"', b'"program": "ab", "program": "ab"')),
        "payload-truncated": blob[:-1],
        "header-length-1e6": blob[:8] + struct.pack("<I", hlen + 10**6) + blob[12:],
    }


@pytest.mark.parametrize("case", sorted(_kvm_mutants()))
def test_one_kvm_state_validator_for_the_stream_check_and_the_vcpu_load(case):
    """The destination's device-section check and RealVCPUs.load_state share
    memory.kvm.real's one validator: a blob is refused by both, with the same
    message (plus the stream offset here).  mp_state 77, a missing "halted",
    an MSR index beyond u32 and an unknown program were accepted by the
    vCPU-side parser before the two checks were one."""
    blob = _kvm_mutants()[case]
    with pytest.raises(VCPUStateError) as vcpu_side:
        validate_vcpu_states(blob, 1)
    with pytest.raises(DeviceStateError) as stream_side:
        validate(device_payload(blob), accel="kvm")
    assert str(vcpu_side.value) in str(stream_side.value) and "at stream offset 1234" in str(stream_side.value)


def test_kvm_state_encoder_round_trips_through_the_validator():
    image = validate_vcpu_states(kvm_blob(2), 2)
    assert [r.id for r in image.vcpus] == [0, 1] and image.program == "ab"
    again = validate_vcpu_states(encode_vcpu_states(image), 2)
    assert [bytes(r.sregs) + bytes(r.regs) + bytes(r.fpu) + bytes(r.events) for r in again.vcpus] == \
        [bytes(r.sregs) + bytes(r.regs) + bytes(r.fpu) + bytes(r.events) for r in image.vcpus]
    assert [(r.mp_state, r.msrs, r.halted) for r in again.vcpus] == [(0, ((0x10, 5),), False)] * 2


# -- through the real destination path ----------------------------------------------
async def _deliver(vm, payload: bytes):
    """Feed a whole stream with ``payload`` as device section to ``vm``'s incoming."""
    from migrator.engine import IncomingMigration

    stream, regions = build_stream(payload)
    vm.state.goto(S.SETUP)
    vm.incoming = inc = IncomingMigration(vm, vm.incoming_uri)
    chan = FakeChannel(stream)
    with trio.fail_after(30):
        await inc.process(chan)
    return inc, chan, regions


async def test_named_hostile_states_through_the_destination():
    vm = destination_vm()
    for case in sorted(NAMED):
        payload = NAMED[case](sim_state("ab"))
        inc, chan, regions = await _deliver(vm, payload)
        assert vm.state.status is S.FAILED, case
        assert not vm.vcpus.running and vm.runstate == "inmigrate", case
        assert chan.sent == [encode_shut(1)], case
        # the error names the stream offset of the device section's payload
        offset = regions["device-footer"] - len(payload)
        assert inc.error_desc.startswith("invalid device state") and \
            inc.error_desc.endswith(f"(at stream offset {offset})"), (case, inc.error_desc)


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    else:
        yield path


HOSTILE_VALUES = ["fast", "", None, True, False, [], {}, 1.5, -1, 0, 2**64, 10**30, -(10**30),
                  float("nan"), float("inf"), float("-inf"), "x" * 300, NPAGES, NPAGES - 1, 255, 256, 2**62]


def mutants(seed: int, n: int):
    """Structured mutants of genuine states: a hostile leaf value, a dropped
    or added key, raw byte edits, and run-state header edits."""
    rng = random.Random(seed)
    bases = [sim_state(wl) for wl in ("ab", "stream", "random", "idle")]
    for i in range(n):
        base = copy.deepcopy(rng.choice(bases))
        kind = rng.randrange(6)
        running = rng.random() < 0.5
        if kind <= 1:  # replace one leaf
            path = rng.choice(list(_leaves(base)))
            mut = with_field(base, path, rng.choice(HOSTILE_VALUES))
            yield f"{i}:leaf:{'/'.join(map(str, path))}", device_payload(json.dumps(mut).encode(), running=running)
        elif kind == 2:  # drop or add a key somewhere
            path = rng.choice(list(_leaves(base)))
            parent = base
            for key in path[:-1]:
                parent = parent[key]
            if isinstance(parent, dict) and rng.random() < 0.5:
                del parent[path[-1]]
                what = "drop"
            else:
                target = parent if isinstance(parent, dict) else base
                target[f"k{rng.randrange(9)}"] = rng.choice(HOSTILE_VALUES)
                what = "add"
            yield f"{i}:{what}:{'/'.join(map(str, path))}", device_payload(json.dumps(base).encode(), running=running)
        elif kind == 3:  # byte edits of the serialised state
            raw = bytearray(json.dumps(base).encode())
            for _ in range(rng.randint(1, 4)):
                op = rng.randrange(3)
                pos = rng.randrange(len(raw))
                if op == 0:
                    raw[pos] = rng.randrange(256)
                elif op == 1:
                    del raw[pos:pos + rng.randint(1, 8)]
                else:
                    raw[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
            yield f"{i}:bytes", device_payload(bytes(raw), running=running)
        elif kind == 4:  # run-state header edits
            head = rng.choice([b'{"running": "yes"}', b"{}", b'{"running": null}', b"[true]", b"NaN",
                               b'{"running": true, "running": false}', b"", b'{"running": true'])
            yield f"{i}:head", head + b"\n" + json.dumps(base).encode()
        else:  # truncations at every kind of boundary
            raw = device_payload(base, running=running)
            yield f"{i}:cut", raw[: rng.randrange(len(raw))]


async def test_device_section_fuzz_through_the_destination():
    """3000 structured mutants through IncomingMigration.process: each is
    either rejected (failed, paused, SHUT(1), a ProtocolError-family cause)
    or a state the guest really runs from."""
    from migrator.engine import IncomingMigration

    vm = destination_vm(start_paused=True)
    counts = {"rejected": 0, "accepted": 0}
    for name, payload in mutants(seed=8, n=3000):
        try:
            valid = validate(payload)
        except DeviceStateError:
            valid = None
        except Exception as exc:  # pragma: no cover - the property under test
            raise AssertionError(f"{name}: {exc!r} is not a ProtocolError") from exc
        if valid is None:
            counts["rejected"] += 1
            if counts["rejected"] % 10:  # every 10th rejected mutant also goes through a whole stream
                continue
        inc, chan, _ = await _deliver(vm, payload)
        assert not vm.vcpus.running, name
        if valid is None:
            assert vm.state.status is S.FAILED and chan.sent == [encode_shut(1)], name
            assert vm.runstate == "inmigrate", name
        else:
            counts["accepted"] += 1
            assert vm.state.status is S.COMPLETED and chan.sent == [encode_shut(0)], (name, inc.error_desc)
            # accepted means runnable: a batch of guest writes from the loaded state
            vm.vcpus.workload.step(600, vm.machine.kvm.vcpu_write)
            vm = destination_vm(start_paused=True)
    print(f"device-section fuzz: {counts}")
    assert counts["rejected"] > 2000 and counts["accepted"] > 10, counts


@given(st.binary(max_size=400), st.booleans())
def test_arbitrary_bytes_only_ever_raise_device_state_errors(blob, kvm):
    for accel in ("sim", "kvm"):
        for payload in (blob, b'{"running": true}\n' + blob, b'{"running": false}\n' + KVM_STATE_MAGIC + blob):
            try:
                validate(payload, accel=accel)
            except DeviceStateError:
                pass
