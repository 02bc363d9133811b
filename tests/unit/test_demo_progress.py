"""The demo's progress bar (rich), shown for migrations longer than a second."""

from migrator.cli._demo import _Progress, _summary


def test_progress_bar_renders_after_a_second(capsys):
    p = _Progress(enabled=True)
    info = {"status": "active", "ram": {"total": 1 << 30, "remaining": 1 << 29, "dirty-sync-count": 2}}
    p.update(info)  # within the first second: nothing yet
    assert p._bar is None
    p._t0 -= 2.0
    p.update(info)
    assert p._bar is not None
    p.close()


def test_progress_disabled_never_renders():
    p = _Progress(enabled=False)
    p._t0 -= 5.0
    p.update({"ram": {"total": 1, "remaining": 0}})
    assert p._bar is None


def test_summary_lists_every_iteration():
    res = {"query-migrate": {"status": "completed", "ram": {"dirty-sync-count": 2}}, "ram_match": True,
           "history": {"iterations": [
               {"iteration": i, "time-ms": 1.0, "dirty-pages": 0, "normal-pages": 1, "zero-pages": 0,
                "remaining-bytes": 0, "bandwidth-bytes-per-s": 0.0, "throttle-pct": 0} for i in (1, 2)]}}
    text = _summary(res)
    assert "RAM match         True" in text
    assert len([ln for ln in text.splitlines() if ln.strip().startswith(("1 ", "2 "))]) == 2
