"""``migrator compare``: the 2017 series' case 2 on the simulated KVM.

Real migrations (in-process source and destination over a unix socket),
tiny and quick.  The property checked is the series' point: with
write-protect-all the dirty log write-protects nothing itself (O(1)),
while the legacy GET write-protects every page it returns through the
rmap; the broken variant - a "write-protect-all" that walks the rmap -
must be caught by the same check.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from migrator.cli._cli import main
from migrator.reports._compare import (GUESTS, CompareConfig, RunResult, aggregate, check_o1_dirty_log,
                               run_case)

QUICK = CompareConfig(memory_bytes=16 << 20, max_bandwidth=32 << 20, downtime_limit=500, timeout_s=20)

FIELDS = ("guest-dirty-rate-pages-per-s", "total-time-ms", "iterations", "first-dirty-log-ms",
          "mmu-lock-hold-ms", "faults-fast", "faults-push-down", "faults-map", "sptes-write-protected",
          "tlb-flushes", "downtime-ms", "dirty-log-sptes-write-protected", "first-dirty-log-sptes-write-protected",
          "vm-stop-ms")  # vm-stop-ms: the VM's vm_stop reported Cause.VM_STOP to the meter


def test_quick_compare_writes_report_and_table(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["compare", "--quick", "--memory", "16M", "--max-bandwidth", str(32 << 20), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    for name in ("report.md", "report.html", "report.json", "compare.json", "compare.md"):
        assert (out / name).stat().st_size > 0, name
    assert list(out.glob("*.png"))
    doc = json.loads((out / "compare.json").read_text())
    labels = [r["label"] for r in doc["runs"]]
    assert labels == ["fresh, wp-all off", "fresh, wp-all on", "pre-written, wp-all off", "pre-written, wp-all on"]
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["runs"]] == labels
    for run in doc["runs"]:
        m = run["metrics"]
        assert m["status"] == "completed"
        for key in FIELDS:
            assert m[key] is not None, (run["label"], key)
        assert m["listener-mode"] == ("write-protect-all" if run["write-protect-all"] else "legacy")
        assert m["guest-pages-written"] > 0 and m["iterations"] >= 3
    assert doc["o1-dirty-log-problems"] == []
    # the table on stdout carries the seed's figures beside ours
    assert "333,092 -> 497,266" in stdout and "156 -> 6" in stdout
    assert "fresh, wp-all on" in stdout


def _by(results):
    return {(r.guest, r.wp_all): r.metrics for r in results}


async def _four(tmp_path, hook=None) -> list[RunResult]:
    results = []
    for guest in GUESTS:
        for wp_all in (False, True):
            r = await run_case(QUICK, guest, wp_all, tmp_path, kvm_hook=hook if wp_all else None)
            results.append(aggregate([r]))
    return results


def _rmap_walking_write_protect_all(kvm) -> None:
    """The broken variant: KVM_WRITE_PROTECT_ALL_MEM done the ordinary way,
    write-protecting every mapped leaf through the rmap (O(mapped pages))."""
    inner = kvm.write_protect_all

    def write_protect_all(enable: bool) -> None:
        inner(enable)
        if enable:
            for ms in kvm._slots.values():
                pages = np.flatnonzero(ms.rmap)
                mmu = kvm._mmus[ms.as_id]
                mmu.protect_leaves(mmu.leaf_index(ms.base_gfn + pages))

    kvm.write_protect_all = write_protect_all


async def test_wp_all_first_dirty_log_protects_in_o1_and_the_rmap_walk_is_caught(tmp_path):
    good = await _four(tmp_path)
    by = _by(good)
    ws = QUICK.working_set
    for guest in GUESTS:
        off, on = by[(guest, False)], by[(guest, True)]
        # legacy: the first dirty log returned the working set and protected each page of it
        assert off["first-dirty-log-pages"] == ws
        assert off["first-dirty-log-sptes-write-protected"] == ws
        # write-protect-all: the same pages returned, none protected by the ioctls
        assert on["first-dirty-log-pages"] == ws
        assert on["first-dirty-log-sptes-write-protected"] == 0
        assert on["dirty-log-sptes-write-protected"] == 0
        assert on["dirty-log-max-mmu-lock-hold-ms"] == 0 < off["dirty-log-max-mmu-lock-hold-ms"]
    assert check_o1_dirty_log(good) == []

    broken = await _four(tmp_path, hook=_rmap_walking_write_protect_all)
    problems = check_o1_dirty_log(broken)
    assert any("fresh: wp-all first dirty log protected" in p for p in problems), problems
    assert any("pre-written: wp-all first dirty log protected" in p for p in problems), problems
    assert _by(broken)[("pre-written", True)]["first-dirty-log-sptes-write-protected"] >= ws


def test_working_set_and_repeat_arguments_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--quick", "--working-set", "200%"])
    with pytest.raises(SystemExit):
        main(["compare", "--quick", "--repeat", "0"])
    assert "--working-set" in capsys.readouterr().err
