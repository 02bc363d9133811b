"""Migration parameters and capabilities, with QEMU's names, defaults and checks.

Facts from QEMU (migration/options.c, qapi/migration.json, QEMU 10.2):

* ``migrate-set-parameters`` is checked as a whole: the new values are laid
  over the current ones (``migrate_params_test_apply``), the merged set is
  checked (``migrate_params_check``), and only then applied.  A rejected call
  changes nothing, and a check may involve a member that was not in the call
  (``max-cpu-throttle`` must stay >= ``cpu-throttle-initial``).
* Range errors name the C field (underscores) and read
  "Parameter 'downtime_limit' expects an integer in the range of 0 to
  (2000 * 1000) ms": QEMU builds that text with ``stringify()`` of a macro,
  so the arithmetic appears verbatim.  We reproduce every text exactly,
  including the odd ones ("a value between 0 and 10000" for
  ``announce_step``, whose real minimum is 1).
* Before those checks the QAPI types apply: ``uint8`` members refuse 256 with
  "Parameter 'cpu-throttle-initial' expects uint8_t" (hyphenated: it is the
  visitor speaking), ``uint64`` members accept negative integers by wrapping
  them (so ``downtime-limit: -1`` is refused by the range check).
* ``migrate-set-parameters`` is allowed while migrating (QEMU applies e.g. a
  new bandwidth immediately); ``migrate-set-capabilities`` is refused while a
  migration runs: "There's a migration process in progress".
* ``query-migrate-capabilities`` lists every capability of the enum, in enum
  order.  We accept every QEMU capability name; enabling one this migrator
  does not implement is a GenericError, disabling it is a no-op.

Our extensions, all marked ``x-`` as QAPI does for experimental members:
``x-clear-bitmap-shift`` (QEMU has it only as ``-global
migration.x-clear-bitmap-shift`` and clamps to 6..31; we expose it as a
parameter and refuse values outside 6..31), ``x-return-path-timeout`` (ms,
1..3600000: how long either side waits for the other's return-path or
hand-over message; QEMU waits forever), ``x-predictive-switchover`` (bool,
default false: the switchover test becomes "predicted stop-and-copy time <=
downtime-limit", which changes when a migration switches over, so it is not
QEMU's default), and the capabilities ``x-ram-only``, ``x-qemu-devices`` (see the
engine: which device sections a stream carries) and ``x-handover`` (set on
both sides, as QEMU users set ``return-path``: the explicit ownership
hand-over of the engine's essay).
``block-bitmap-mapping`` (no block devices here) and ``accel-path`` are not
implemented and refused as unexpected parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Final

from ._commands import BOOL, SIZE, STR_OR_NULL, UINT8, UINT32, UINT64, Enum, command
from ..engine._status import RUNNING_STATES as _STATUS_RUNNING_STATES
from ..errors import QMPError

__all__ = [
    "MIGRATION_ACTIVE_DESC",
    "MIGRATION_CAPABILITIES",
    "RUNNING_STATES",
    "SET_CAPABILITIES_ARGS",
    "SET_PARAMETERS_ARGS",
    "SUPPORTED_CAPABILITIES",
    "MigrationCapabilities",
    "MigrationOptions",
    "MigrationParameters",
    "is_migration_running",
]

TARGET_PAGE_SIZE: Final = 4096

#: QEMU's ``MigrationCapability`` enum, in order (10.2; ``zero-blocks`` removed),
#: followed by ours.
MIGRATION_CAPABILITIES: Final[tuple[str, ...]] = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
    "switchover-ack",
    "dirty-limit",
    "mapped-ram",
    "x-ram-only",
    "x-handover",
    "x-qemu-devices",
)

#: Capabilities this migrator implements (may be set to true).
SUPPORTED_CAPABILITIES: Final = frozenset({"events", "auto-converge", "multifd", "x-ram-only", "x-handover",
                                           "x-qemu-devices"})

#: ``MigrationStatus`` values for which QEMU's ``migration_is_running()`` is true
#: (the one list lives with the state table).
RUNNING_STATES: Final = frozenset(s.value for s in _STATUS_RUNNING_STATES)

MIGRATION_ACTIVE_DESC: Final = "There's a migration process in progress"

#: upper bound of x-return-path-timeout: one hour, in ms
MAX_RETURN_PATH_TIMEOUT_MS: Final = 3600 * 1000


def is_migration_running(status: Any) -> bool:
    """QEMU's ``migration_is_running()`` (+ COLO) for a MigrationStatus enum member or string."""
    return str(getattr(status, "value", status)) in RUNNING_STATES


# ---------------------------------------------------------------------------
# Parameters

MULTIFD_COMPRESSION: Final = Enum(("none", "zlib", "zstd"), "MultiFDCompression")
MIG_MODE: Final = Enum(("normal", "cpr-reboot", "cpr-transfer"), "MigMode")
ZERO_PAGE_DETECTION: Final = Enum(("none", "legacy", "multifd"), "ZeroPageDetection")

#: Argument schema of ``migrate-set-parameters`` (QAPI ``MigrateSetParameters``).
SET_PARAMETERS_ARGS: Final[dict[str, Any]] = {
    "*announce-initial": SIZE,
    "*announce-max": SIZE,
    "*announce-rounds": SIZE,
    "*announce-step": SIZE,
    "*throttle-trigger-threshold": UINT8,
    "*cpu-throttle-initial": UINT8,
    "*cpu-throttle-increment": UINT8,
    "*cpu-throttle-tailslow": BOOL,
    "*tls-creds": STR_OR_NULL,
    "*tls-hostname": STR_OR_NULL,
    "*tls-authz": STR_OR_NULL,
    "*max-bandwidth": SIZE,
    "*avail-switchover-bandwidth": SIZE,
    "*downtime-limit": UINT64,
    "*x-checkpoint-delay": UINT32,
    "*multifd-channels": UINT8,
    "*xbzrle-cache-size": SIZE,
    "*max-postcopy-bandwidth": SIZE,
    "*max-cpu-throttle": UINT8,
    "*multifd-compression": MULTIFD_COMPRESSION,
    "*multifd-zlib-level": UINT8,
    "*multifd-qatzip-level": UINT8,
    "*multifd-zstd-level": UINT8,
    "*x-vcpu-dirty-limit-period": UINT64,
    "*vcpu-dirty-limit": UINT64,
    "*mode": MIG_MODE,
    "*zero-page-detection": ZERO_PAGE_DETECTION,
    "*direct-io": BOOL,
    "*x-clear-bitmap-shift": UINT8,
    "*x-predictive-switchover": BOOL,
    "*x-return-path-timeout": UINT64,
}


def _expects(field_name: str, what: str) -> QMPError:
    # QERR_INVALID_PARAMETER_VALUE
    return QMPError.generic(f"Parameter '{field_name}' expects {what}")


@dataclass(frozen=True, slots=True)
class MigrationParameters:
    """QEMU's ``MigrationParameters`` with QEMU's defaults (migration/options.c).

    Units are as in QAPI: bandwidths in bytes/s, times in ms, throttles in %.
    Build new values with :meth:`apply` (checked) rather than ``replace``.
    """

    announce_initial: int = 50
    announce_max: int = 550
    announce_rounds: int = 5
    announce_step: int = 100
    throttle_trigger_threshold: int = 50
    cpu_throttle_initial: int = 20
    cpu_throttle_increment: int = 10
    cpu_throttle_tailslow: bool = False
    tls_creds: str = ""
    tls_hostname: str = ""
    tls_authz: str = ""
    max_bandwidth: int = 128 << 20  # MAX_THROTTLE, bytes/s
    avail_switchover_bandwidth: int = 0  # 0: estimate
    downtime_limit: int = 300  # ms
    x_checkpoint_delay: int = 200 * 100  # ms
    multifd_channels: int = 2
    xbzrle_cache_size: int = 64 << 20
    max_postcopy_bandwidth: int = 0
    max_cpu_throttle: int = 99
    multifd_compression: str = "none"
    multifd_zlib_level: int = 1
    multifd_qatzip_level: int = 1
    multifd_zstd_level: int = 1
    x_vcpu_dirty_limit_period: int = 1000  # ms
    vcpu_dirty_limit: int = 1  # MB/s
    mode: str = "normal"
    zero_page_detection: str = "multifd"
    direct_io: bool = False
    x_clear_bitmap_shift: int = 18  # ours; CLEAR_BITMAP_SHIFT_DEFAULT (1 GiB chunks)
    #: ours: switch over when the predicted stop-and-copy time fits in
    #: downtime-limit, instead of QEMU's pending < bandwidth x downtime-limit
    x_predictive_switchover: bool = False
    #: ours: how long (ms) one side waits for the other's return-path or
    #: hand-over message once the stream's EOF was sent (received).  Expiry
    #: never resumes a guest the peer may be running (see the engine).
    x_return_path_timeout: int = 10_000

    def to_qmp(self) -> dict[str, Any]:
        """The ``query-migrate-parameters`` reply (hyphenated QAPI names)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def apply(self, **changes: Any) -> MigrationParameters:
        """The parameters with ``changes`` laid over, checked as QEMU checks them.

        ``changes`` use Python names (``downtime_limit=...``) with values already
        of the right QAPI type (the ``migrate-set-parameters`` schema ensures
        that); ``None`` for a ``tls-*`` member means ``""`` as in QEMU.

        Raises:
            QMPError: GenericError worded as QEMU's; ``self`` is unchanged.
            TypeError: an unknown parameter name (a programming error).
        """
        for key in ("tls_creds", "tls_hostname", "tls_authz"):
            if key in changes and changes[key] is None:
                changes[key] = ""
        merged = replace(self, **changes)
        merged.check()
        return merged

    def check(self) -> None:
        """``migrate_params_check``: raise QMPError for the first invalid member."""
        if not 1 <= self.throttle_trigger_threshold <= 100:
            raise _expects("throttle_trigger_threshold", "an integer in the range of 1 to 100")
        if not 1 <= self.cpu_throttle_initial <= 99:
            raise _expects("cpu_throttle_initial", "an integer in the range of 1 to 99")
        if not 1 <= self.cpu_throttle_increment <= 99:
            raise _expects("cpu_throttle_increment", "an integer in the range of 1 to 99")
        # max_bandwidth / avail_switchover_bandwidth > SIZE_MAX: impossible on 64-bit.
        if self.downtime_limit > 2000 * 1000:
            raise _expects("downtime_limit", "an integer in the range of 0 to (2000 * 1000) ms")
        if self.multifd_channels < 1:
            raise _expects("multifd_channels", "a value between 1 and 255")
        if self.multifd_zlib_level > 9:
            raise _expects("multifd_zlib_level", "a value between 0 and 9")
        if not 1 <= self.multifd_qatzip_level <= 9:
            raise _expects("multifd_qatzip_level", "a value between 1 and 9")
        if self.multifd_zstd_level > 20:
            raise _expects("multifd_zstd_level", "a value between 0 and 20")
        size = self.xbzrle_cache_size
        if size < TARGET_PAGE_SIZE or size & (size - 1):
            raise _expects("xbzrle_cache_size", "a power of two no less than the target page size")
        if not self.cpu_throttle_initial <= self.max_cpu_throttle <= 99:
            raise _expects("max_cpu_throttle", "an integer in the range of cpu_throttle_initial to 99")
        if self.announce_initial > 100000:
            raise _expects("announce_initial", "a value between 0 and 100000")
        if self.announce_max > 100000:
            raise _expects("announce_max", "a value between 0 and 100000")
        if self.announce_rounds > 1000:
            raise _expects("announce_rounds", "a value between 0 and 1000")
        if not 1 <= self.announce_step <= 10000:
            raise _expects("announce_step", "a value between 0 and 10000")
        if not 1 <= self.x_vcpu_dirty_limit_period <= 1000:
            raise _expects("x-vcpu-dirty-limit-period", "a value between 1 and 1000")
        if self.vcpu_dirty_limit < 1:
            raise QMPError.generic("Parameter 'vcpu_dirty_limit' must be greater than 1 MB/s")
        # Ours, in the same words (QEMU's CLEAR_BITMAP_SHIFT_MIN/MAX).
        if not 6 <= self.x_clear_bitmap_shift <= 31:
            raise _expects("x_clear_bitmap_shift", "an integer in the range of 6 to 31")
        if not 1 <= self.x_return_path_timeout <= MAX_RETURN_PATH_TIMEOUT_MS:
            raise _expects("x_return_path_timeout", "an integer in the range of 1 to (3600 * 1000) ms")


# ---------------------------------------------------------------------------
# Capabilities

#: Argument schema of ``migrate-set-capabilities``.
SET_CAPABILITIES_ARGS: Final[dict[str, Any]] = {
    "capabilities": [{"capability": Enum(MIGRATION_CAPABILITIES, "MigrationCapability"), "state": bool}],
}


@dataclass(frozen=True, slots=True)
class MigrationCapabilities:
    """The set of enabled migration capabilities (all default to off, as in QEMU)."""

    enabled: frozenset[str] = frozenset()
    supported: frozenset[str] = SUPPORTED_CAPABILITIES

    def __getitem__(self, name: str) -> bool:
        if name not in MIGRATION_CAPABILITIES:
            raise KeyError(name)
        return name in self.enabled

    def to_qmp(self) -> list[dict[str, Any]]:
        """The ``query-migrate-capabilities`` reply, in enum order."""
        return [{"capability": c, "state": c in self.enabled} for c in MIGRATION_CAPABILITIES]

    def apply(self, changes: Iterable[Mapping[str, Any]], *, status: Any = "none") -> MigrationCapabilities:
        """The capabilities after ``[{"capability", "state"}, ...]``, or raise.

        Args:
            changes: validated ``MigrationCapabilityStatus`` records; later
                entries win, as in QEMU.
            status: the current MigrationStatus (enum member or string).

        Raises:
            QMPError: while a migration runs ("There's a migration process in
                progress"), or when enabling a capability we do not
                implement.  ``self`` is unchanged.
        """
        if is_migration_running(status):
            raise QMPError.generic(MIGRATION_ACTIVE_DESC)
        new = set(self.enabled)
        for change in changes:
            cap, state = change["capability"], change["state"]
            if cap not in MIGRATION_CAPABILITIES:
                raise QMPError.generic(f"Parameter 'capability' does not accept value '{cap}'")
            if state:
                new.add(cap)
            else:
                new.discard(cap)
        unsupported = [c for c in MIGRATION_CAPABILITIES if c in new and c not in self.supported]
        if unsupported:
            raise QMPError.generic(f"Capability '{unsupported[0]}' is not supported by this migrator")
        return replace(self, enabled=frozenset(new))


class MigrationOptions:
    """Current parameters and capabilities, and the four QMP commands over them.

    Register with ``CommandTable.from_objects(options, ...)``.

    Args:
        status: returns the current MigrationStatus (enum member or string);
            used to refuse ``migrate-set-capabilities`` during a migration.
        supported_capabilities: capabilities that may be enabled.
    """

    def __init__(
        self,
        *,
        status: Callable[[], Any] = lambda: "none",
        supported_capabilities: Iterable[str] = SUPPORTED_CAPABILITIES,
    ) -> None:
        self._status = status
        self.parameters = MigrationParameters()
        self.capabilities = MigrationCapabilities(supported=frozenset(supported_capabilities))

    @command("query-migrate-parameters")
    def query_migrate_parameters(self) -> dict[str, Any]:
        return self.parameters.to_qmp()

    @command("migrate-set-parameters", args=SET_PARAMETERS_ARGS)
    def migrate_set_parameters(self, **changes: Any) -> None:
        self.parameters = self.parameters.apply(**changes)

    @command("query-migrate-capabilities")
    def query_migrate_capabilities(self) -> list[dict[str, Any]]:
        return self.capabilities.to_qmp()

    @command("migrate-set-capabilities", args=SET_CAPABILITIES_ARGS)
    def migrate_set_capabilities(self, capabilities: list[dict[str, Any]]) -> None:
        self.capabilities = self.capabilities.apply(capabilities, status=self._status())
