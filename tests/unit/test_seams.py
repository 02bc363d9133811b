"""The engine's seams hold: mypy proves the implementations satisfy them.

``migrator/engine/_seams.py`` and ``migrator/qmp/_vm.py`` end in typing-only
functions that return a ``SimVCPUs``/``RealVCPUs`` as a ``VCPUController``,
a ``KVMMemoryListener`` as a ``DirtyLogListener`` and the ``VM`` as both a
``SourceVM`` and a ``DestinationVM``.  Nothing runs them; mypy checks them.
This test runs mypy (``--strict``, imported modules analysed but their own
errors not reported, so the check does not wait for the rest of the tree to
be clean) over those two modules and over a broken controller written here,
one that lacks ``throttle_pct`` (the member the engine once probed with
``hasattr``) and one whose ``statistics()`` is the old JSON list instead of
the frozen ``VCPUControllerStatistics``: the product must pass and the
broken variants must be refused.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("mypy")

BROKEN_CONTROLLER = textwrap.dedent('''\
    """A vCPU controller with every member but throttle_pct, and one whose
    statistics are today's JSON instead of the frozen record."""

    from __future__ import annotations

    from typing import Any

    import trio

    from memory.kvm import VCPUControllerStatistics
    from migrator.engine._seams import VCPUController


    class NoThrottlePct:
        running = False

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None: ...
        async def vm_start(self) -> None: ...
        async def vm_stop(self) -> None: ...
        def set_throttle(self, pct: int) -> None: ...
        def save_state(self) -> bytes: return b""
        def load_state(self, data: bytes) -> None: ...
        def statistics(self) -> VCPUControllerStatistics: return VCPUControllerStatistics(vcpus=())
        def expected_stop_ns(self) -> int: return 0


    def is_a_controller(v: NoThrottlePct) -> VCPUController:
        return v


    class DictStatistics(NoThrottlePct):
        throttle_pct = 0

        def statistics(self) -> list[dict[str, Any]]:  # type: ignore[override]
            return []


    def dicts_are_not_a_controller(v: DictStatistics) -> VCPUController:
        return v
    ''')


def test_implementations_satisfy_the_seams_and_a_broken_controller_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken_controller.py"
    broken.write_text(BROKEN_CONTROLLER)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(tmp_path / "cache"),
         "migrator/engine/_seams.py", "migrator/qmp/_vm.py", str(broken)],
        cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    product = [line for line in lines if not line.startswith(str(broken))]
    assert product == []
    refused = [line for line in lines if line.startswith(str(broken))]
    assert any('"NoThrottlePct" is missing following "VCPUController" protocol member' in line
               for line in refused), proc.stdout
    assert any(line.endswith("throttle_pct") for line in refused), proc.stdout
    # the old JSON-shaped statistics() no longer satisfies the seam
    assert any("DictStatistics" in line and "VCPUController" in line and "incompatible" in line.lower()
               for line in refused), proc.stdout
    assert proc.returncode == 1
