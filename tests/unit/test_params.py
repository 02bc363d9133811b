"""Migration parameters and capabilities, checked through the QMP commands.

Every expected text and default below is QEMU's (migration/options.c,
qapi/migration.json, QEMU 10.2), so a wording drift is a test failure.
"""

from __future__ import annotations

import pytest

from migrator.qmp._commands import CommandTable
from migrator.qmp._params import (
    MIGRATION_CAPABILITIES,
    RUNNING_STATES,
    MigrationCapabilities,
    MigrationOptions,
    MigrationParameters,
    is_migration_running,
)
from migrator.qmp._protocol import ErrorReply, Request, Return
from migrator.errors import QMPError

# QEMU's defaults, as query-migrate-parameters shows them on a fresh QEMU 10.2
# (plus our x-clear-bitmap-shift, CLEAR_BITMAP_SHIFT_DEFAULT, x-return-path-timeout,
# and x-predictive-switchover, off so the switchover test is QEMU's).
QEMU_DEFAULTS = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": "",
    "max-bandwidth": 134217728,
    "avail-switchover-bandwidth": 0,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "multifd-channels": 2,
    "xbzrle-cache-size": 67108864,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1,
    "multifd-zstd-level": 1,
    "x-vcpu-dirty-limit-period": 1000,
    "vcpu-dirty-limit": 1,
    "mode": "normal",
    "zero-page-detection": "multifd",
    "direct-io": False,
    "x-clear-bitmap-shift": 18,
    "x-predictive-switchover": False,
    "x-return-path-timeout": 10000,
}


class Harness:
    def __init__(self, status: str = "none") -> None:
        self.status = status
        self.options = MigrationOptions(status=lambda: self.status)
        self.table = CommandTable.from_objects(self.options)

    async def qmp(self, command: str, **arguments):
        reply = await self.table.dispatch(Request(command, arguments))
        if isinstance(reply, ErrorReply):
            raise QMPError(reply.error_class, reply.desc)
        assert isinstance(reply, Return)
        return reply.value

    async def set_params(self, **arguments):
        return await self.qmp(
            "migrate-set-parameters", **{k.replace("_", "-"): v for k, v in arguments.items()}
        )


@pytest.fixture
def h():
    return Harness()


async def test_defaults_match_qemu(h):
    assert await h.qmp("query-migrate-parameters") == QEMU_DEFAULTS
    assert MigrationParameters().downtime_limit == 300
    assert MigrationParameters().max_bandwidth == 128 * 1024 * 1024


# (wire name, min, max, QEMU's description of the valid range).  The C field
# name in the message uses underscores, except where QEMU itself does not.
RANGES = [
    (
        "throttle-trigger-threshold",
        1,
        100,
        "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100",
    ),
    (
        "cpu-throttle-initial",
        1,
        99,
        "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99",
    ),
    (
        "cpu-throttle-increment",
        1,
        99,
        "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99",
    ),
    (
        "downtime-limit",
        0,
        2_000_000,
        "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms",
    ),
    ("multifd-channels", 1, 255, "Parameter 'multifd_channels' expects a value between 1 and 255"),
    ("multifd-zlib-level", 0, 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"),
    ("multifd-qatzip-level", 1, 9, "Parameter 'multifd_qatzip_level' expects a value between 1 and 9"),
    ("multifd-zstd-level", 0, 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"),
    ("announce-initial", 0, 100000, "Parameter 'announce_initial' expects a value between 0 and 100000"),
    ("announce-max", 0, 100000, "Parameter 'announce_max' expects a value between 0 and 100000"),
    ("announce-rounds", 0, 1000, "Parameter 'announce_rounds' expects a value between 0 and 1000"),
    ("announce-step", 1, 10000, "Parameter 'announce_step' expects a value between 0 and 10000"),
    (
        "x-vcpu-dirty-limit-period",
        1,
        1000,
        "Parameter 'x-vcpu-dirty-limit-period' expects a value between 1 and 1000",
    ),
    (
        "x-clear-bitmap-shift",
        6,
        31,
        "Parameter 'x_clear_bitmap_shift' expects an integer in the range of 6 to 31",
    ),
    (
        "x-return-path-timeout",
        1,
        3_600_000,
        "Parameter 'x_return_path_timeout' expects an integer in the range of 1 to (3600 * 1000) ms",
    ),
    # max-cpu-throttle's lower bound is cpu-throttle-initial (20 by default)
    (
        "max-cpu-throttle",
        20,
        99,
        "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99",
    ),
]

# Values just outside a range that the QAPI type refuses before the range
# check runs: uint8 stops at 255, and -1 sent to a uint8 member wraps to
# 2**64-1 (QEMU accepts negative uint64 input "for backward compatibility").
TYPE_REFUSED = {
    ("multifd-channels", 256): "Parameter 'multifd-channels' expects uint8_t",
    ("multifd-zlib-level", -1): "Parameter 'multifd-zlib-level' expects uint8_t",
    ("multifd-zstd-level", -1): "Parameter 'multifd-zstd-level' expects uint8_t",
}


@pytest.mark.parametrize(("name", "lo", "hi", "desc"), RANGES, ids=[r[0] for r in RANGES])
async def test_every_range_boundary(h, name, lo, hi, desc):
    for good in (lo, hi):
        await h.qmp("migrate-set-parameters", **{name: good})
        assert (await h.qmp("query-migrate-parameters"))[name] == good
    last_good = await h.qmp("query-migrate-parameters")
    for bad in (lo - 1, hi + 1):
        with pytest.raises(QMPError) as info:
            await h.qmp("migrate-set-parameters", **{name: bad})
        assert info.value.error_class == "GenericError"
        assert info.value.desc == TYPE_REFUSED.get((name, bad), desc)
        assert await h.qmp("query-migrate-parameters") == last_good  # nothing applied


async def test_negative_uint64_wraps_and_hits_the_range_check(h):
    with pytest.raises(
        QMPError,
        match=r"^Parameter 'downtime_limit' expects an integer in the range of 0 to \(2000 \* 1000\) ms$",
    ):
        await h.set_params(downtime_limit=-1)
    # size members accept it: SIZE_MAX is the (unreachable) limit, as in QEMU.
    await h.set_params(max_bandwidth=-1)
    assert (await h.qmp("query-migrate-parameters"))["max-bandwidth"] == 2**64 - 1


async def test_set_is_atomic_and_checked_on_the_merged_parameters(h):
    with pytest.raises(QMPError, match="cpu_throttle_increment"):
        await h.set_params(downtime_limit=1, cpu_throttle_increment=0)
    assert await h.qmp("query-migrate-parameters") == QEMU_DEFAULTS
    # max-cpu-throttle must stay >= cpu-throttle-initial even when only one changes
    await h.set_params(max_cpu_throttle=30)
    with pytest.raises(QMPError, match="range of cpu_throttle_initial to 99"):
        await h.set_params(cpu_throttle_initial=31)
    await h.set_params(cpu_throttle_initial=30)
    assert (await h.qmp("query-migrate-parameters"))["cpu-throttle-initial"] == 30


async def test_query_after_set(h):
    await h.set_params(
        max_bandwidth=3_000_000,
        downtime_limit=1,
        avail_switchover_bandwidth=10**9,
        cpu_throttle_tailslow=True,
        multifd_compression="zlib",
        mode="cpr-reboot",
        tls_creds="tls0",
        xbzrle_cache_size=4096,
    )
    got = await h.qmp("query-migrate-parameters")
    assert got == {
        **QEMU_DEFAULTS,
        "max-bandwidth": 3_000_000,
        "downtime-limit": 1,
        "avail-switchover-bandwidth": 10**9,
        "cpu-throttle-tailslow": True,
        "multifd-compression": "zlib",
        "mode": "cpr-reboot",
        "tls-creds": "tls0",
        "xbzrle-cache-size": 4096,
    }
    assert h.options.parameters.max_bandwidth == 3_000_000  # the engine reads the record
    await h.set_params(tls_creds=None)  # StrOrNull: null means ""
    assert (await h.qmp("query-migrate-parameters"))["tls-creds"] == ""


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        (
            {"xbzrle-cache-size": 4095},
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        ),
        (
            {"xbzrle-cache-size": 3 * 4096},
            "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
        ),
        ({"vcpu-dirty-limit": 0}, "Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s"),
        ({"cpu-throttle-initial": 256}, "Parameter 'cpu-throttle-initial' expects uint8_t"),
        ({"downtime-limit": "300"}, "Parameter 'downtime-limit' expects uint64"),
        ({"downtime-limit": 300.0}, "Parameter 'downtime-limit' expects uint64"),
        (
            {"cpu-throttle-tailslow": 1},
            "Invalid parameter type for 'cpu-throttle-tailslow', expected: boolean",
        ),
        ({"multifd-compression": "lz4"}, "Parameter 'multifd-compression' does not accept value 'lz4'"),
        ({"tls-creds": 1}, "Invalid parameter type for 'tls-creds', expected: StrOrNull"),
        ({"block-bitmap-mapping": []}, "Parameter 'block-bitmap-mapping' is unexpected"),
        ({"downtime_limit": 1}, "Parameter 'downtime_limit' is unexpected"),
    ],
)
async def test_other_parameter_errors(h, arguments, desc):
    with pytest.raises(QMPError) as info:
        await h.qmp("migrate-set-parameters", **arguments)
    assert info.value.desc == desc
    assert await h.qmp("query-migrate-parameters") == QEMU_DEFAULTS


# ---------------------------------------------------------------------------
# capabilities


def caps_dict(reply) -> dict:
    return {c["capability"]: c["state"] for c in reply}


async def test_capabilities_default_off_in_enum_order(h):
    reply = await h.qmp("query-migrate-capabilities")
    assert [c["capability"] for c in reply] == list(MIGRATION_CAPABILITIES)
    assert reply[:4] == [
        {"capability": "xbzrle", "state": False},
        {"capability": "rdma-pin-all", "state": False},
        {"capability": "auto-converge", "state": False},
        {"capability": "events", "state": False},
    ]
    assert not any(c["state"] for c in reply)
    assert {"postcopy-ram", "multifd", "mapped-ram", "x-ram-only"} <= set(MIGRATION_CAPABILITIES)


async def test_set_then_query_capabilities(h):
    await h.qmp(
        "migrate-set-capabilities",
        capabilities=[
            {"capability": "events", "state": True},
            {"capability": "auto-converge", "state": True},
            {"capability": "xbzrle", "state": False},  # unsupported but off: fine
        ],
    )
    on = {k for k, v in caps_dict(await h.qmp("query-migrate-capabilities")).items() if v}
    assert on == {"events", "auto-converge"}
    assert h.options.capabilities["events"] and not h.options.capabilities["x-ram-only"]
    await h.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}])
    on = {k for k, v in caps_dict(await h.qmp("query-migrate-capabilities")).items() if v}
    assert on == {"auto-converge"}


async def test_enabling_an_unsupported_capability_changes_nothing(h):
    with pytest.raises(QMPError, match="^Capability 'postcopy-ram' is not supported by this migrator$"):
        await h.qmp(
            "migrate-set-capabilities",
            capabilities=[
                {"capability": "events", "state": True},
                {"capability": "postcopy-ram", "state": True},
            ],
        )
    assert not any(caps_dict(await h.qmp("query-migrate-capabilities")).values())


async def test_unknown_or_malformed_capability(h):
    with pytest.raises(QMPError, match="^Parameter 'capability' does not accept value 'turbo'$"):
        await h.qmp("migrate-set-capabilities", capabilities=[{"capability": "turbo", "state": True}])
    with pytest.raises(QMPError, match=r"^Parameter 'capabilities\[0\].state' is missing$"):
        await h.qmp("migrate-set-capabilities", capabilities=[{"capability": "events"}])
    with pytest.raises(QMPError, match="^Parameter 'capabilities' is missing$"):
        await h.qmp("migrate-set-capabilities")


@pytest.mark.parametrize("status", sorted(RUNNING_STATES))
async def test_set_capabilities_refused_while_migrating_but_parameters_allowed(status):
    h = Harness(status)
    with pytest.raises(QMPError, match="^There's a migration process in progress$"):
        await h.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    assert not h.options.capabilities["events"]
    await h.set_params(max_bandwidth=1000)  # QEMU applies a new bandwidth live
    assert h.options.parameters.max_bandwidth == 1000


@pytest.mark.parametrize("status", ["none", "completed", "failed", "cancelled"])
async def test_set_capabilities_allowed_when_idle(status):
    h = Harness(status)
    await h.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    assert h.options.capabilities["events"]


def test_records_are_immutable_and_apply_returns_new_ones():
    p = MigrationParameters()
    q = p.apply(downtime_limit=5)
    assert (p.downtime_limit, q.downtime_limit) == (300, 5)
    with pytest.raises(AttributeError):
        p.downtime_limit = 1  # type: ignore[misc]
    c = MigrationCapabilities()
    d = c.apply([{"capability": "events", "state": True}])
    assert not c["events"] and d["events"]
    with pytest.raises(KeyError):
        c["nope"]


def test_is_migration_running_accepts_enum_members():
    class Status:
        value = "active"

    assert is_migration_running(Status()) and is_migration_running("device")
    assert not is_migration_running("completed") and not is_migration_running("none")
