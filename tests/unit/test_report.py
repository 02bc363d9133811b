"""``migrator report``: fixtures' consistency with QEMU's rules, report files, CLI."""

from __future__ import annotations

import base64
import copy
import json
import re
import struct
from pathlib import Path

import pytest

from migrator.engine._history import MigrationHistory
from migrator.reports._plots import PLOTS
from migrator.reports._report import (
    ReportInputError,
    history_from_document,
    load_history,
    report_main,
    summarize,
    write_report,
)

FIXTURES = Path(__file__).parent.parent / "fixtures"
CONVERGING = FIXTURES / "history_converging.json"
CANCELLED = FIXTURES / "history_nonconverging_cancelled.json"
AUTOCONVERGE = FIXTURES / "history_autoconverge.json"
ALL_FIXTURES = [CONVERGING, CANCELLED, AUTOCONVERGE]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A RAM page record: be64 offset|flags, then (unless CONTINUE) a length byte
# and the block idstr (<= 255 bytes); a PAGE carries the page, a ZERO one byte.
MAX_RECORD_HEADER = 8 + 1 + 255


def _raw(path: Path) -> dict:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------
# Fixture consistency


def consistency_problems(h: MigrationHistory) -> list[str]:
    """Everything in ``h`` that contradicts QEMU's pre-copy rules (empty = ok)."""
    problems = []
    recs = h.iterations
    page = h.setup["page-size"]
    limit_ms = h.setup["parameters"]["downtime-limit"]
    total_pages = h.setup["memory-bytes"] // page
    if [r.iteration for r in recs] != list(range(1, len(recs) + 1)):
        problems.append("iterations not numbered 1..n (dirty-sync-count)")
    for a, b in zip(recs, recs[1:]):
        if not b.time_ms > a.time_ms:
            problems.append(f"time not increasing at iteration {b.iteration}")
        elif b.time_ms < a.time_ms + a.duration_ms:
            problems.append(f"iteration {a.iteration} sends past the next sync")
    if recs and h.setup_time_ms is not None and recs[0].time_ms > h.setup_time_ms:
        problems.append("first sync after setup ended (it happens in ram_save_setup)")
    if recs and recs[0].remaining_bytes != h.setup["memory-bytes"]:
        problems.append("after the setup sync all of RAM must be pending")
    for r in recs:
        if r.remaining_bytes % page:
            problems.append(f"iteration {r.iteration}: remaining not a page multiple")
        if not (r.normal_pages * page <= r.bytes
                <= (r.normal_pages * (page + MAX_RECORD_HEADER)
                    + r.zero_pages * MAX_RECORD_HEADER)):
            problems.append(f"iteration {r.iteration}: bytes do not match pages sent")
        if r.duration_ms > 0 and r.bytes > 0:
            achieved = r.bytes / r.duration_ms * 1000
            if abs(achieved - r.bandwidth_bytes_per_s) > 0.01 * r.bandwidth_bytes_per_s:
                problems.append(f"iteration {r.iteration}: bandwidth != bytes / duration")
    sent = sum(r.normal_pages + r.zero_pages for r in recs)
    found = total_pages + sum(r.dirty_pages for r in recs[1:])
    finals = [r for r in recs if r.final]
    if h.status == "completed":
        if len(finals) != 1 or not recs[-1].final:
            problems.append("a completed run ends with exactly one final sync")
        if sent != found:
            problems.append(f"completed but sent {sent} pages of {found} found dirty")
        if h.downtime is None:
            problems.append("completed without a downtime breakdown")
        else:
            d = h.downtime
            parts = (d.stop_vcpus_ms + d.final_sync_ms + d.last_pages_ms + d.device_state_ms
                     + d.destination_resume_ms)
            if abs(parts - d.total_ms) > 0.01:
                problems.append("downtime parts do not add up to the total")
            if h.total_time_ms is None or h.total_time_ms < recs[-1].time_ms:
                problems.append("total time ends before the final sync")
    else:
        if finals:
            problems.append(f"{h.status} run has a final (stopped) sync")
        if h.downtime is not None:
            problems.append(f"{h.status} run has a downtime")
        if sent > found:
            problems.append("sent more pages than were ever dirty")
    # QEMU switches over at the first sync where pending <= expected_bw x
    # downtime-limit, expected_bw being the bandwidth of the last window,
    # i.e. the previous row's (migration_iteration_run).
    live = [r for r in recs if not r.final]
    for prev, r in zip(live, live[1:]):
        threshold = prev.bandwidth_bytes_per_s * limit_ms / 1000
        fits = r.remaining_bytes <= threshold
        last = r is live[-1] and h.status == "completed"
        if fits != last:
            problems.append(f"iteration {r.iteration}: pending "
                            f"{'fits' if fits else 'exceeds'} the threshold but the run "
                            f"{'switches over' if last else 'goes on'}")
        expected = r.remaining_bytes / prev.bandwidth_bytes_per_s * 1000
        if abs(expected - r.expected_downtime_ms) > 0.001 * expected + 0.01:
            problems.append(f"iteration {r.iteration}: expected downtime != remaining / bw")
    return problems


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.stem)
def test_fixture_is_consistent(path):
    h = load_history(path)
    assert h.iterations
    assert consistency_problems(h) == []


def _tampered(h: MigrationHistory, how: str) -> MigrationHistory:
    h = copy.deepcopy(h)
    if how == "renumbered":
        h.iterations[2].iteration = 7
    elif how == "time-reversed":
        h.iterations[2].time_ms, h.iterations[3].time_ms = (h.iterations[3].time_ms,
                                                            h.iterations[2].time_ms)
    elif how == "switchover-late":
        del h.iterations[-2]  # the sync that fit the threshold
        for i, r in enumerate(h.iterations, 1):
            r.iteration = i
    elif how == "lost-pages":
        h.iterations[1].normal_pages -= 1
        h.iterations[1].bytes -= 4096 + 8
    elif how == "downtime-parts":
        h.downtime.device_state_ms += 5
    return h


@pytest.mark.parametrize("how", ["renumbered", "time-reversed", "switchover-late",
                                 "lost-pages", "downtime-parts"])
def test_consistency_check_catches_broken_history(how):
    assert consistency_problems(_tampered(load_history(CONVERGING), how))


def test_converging_fixture_shape():
    h = load_history(CONVERGING)
    live = [r for r in h.iterations if not r.final]
    assert h.status == "completed"
    assert all(b.remaining_bytes < a.remaining_bytes for a, b in zip(live, live[1:]))
    for r in live[1:]:
        assert r.dirty_rate_pages_per_s * 4096 < r.bandwidth_bytes_per_s


def test_nonconverging_fixture_shape():
    h = load_history(CANCELLED)
    recs = h.iterations
    assert h.status == "cancelled" and h.downtime is None
    assert max(r.throttle_pct for r in recs) == 0
    # The guest dirties at least as fast as the link sends...
    assert all(r.dirty_rate_pages_per_s * 4096 >= 0.97 * r.bandwidth_bytes_per_s
               for r in recs[1:])
    # ... so remaining is flat, far above the 300 ms threshold (~38 MiB).
    tail = [r.remaining_bytes for r in recs[3:]]
    assert max(tail) <= 1.05 * min(tail)
    assert min(tail) > 10 * 134217728 * 0.3


def test_autoconverge_fixture_shape():
    h = load_history(AUTOCONVERGE)
    params = h.setup["parameters"]
    throttles = [r.throttle_pct for r in h.iterations]
    assert h.status == "completed" and h.setup["capabilities"]["auto-converge"]
    steps = sorted(set(throttles) - {0})
    assert steps[0] == params["cpu-throttle-initial"]
    assert all(b - a == params["cpu-throttle-increment"] for a, b in zip(steps, steps[1:]))
    assert throttles == sorted(throttles)
    first = next(r for r in h.iterations if r.throttle_pct)
    assert h.iterations[-2].dirty_rate_pages_per_s < 0.8 * first.dirty_rate_pages_per_s


# --------------------------------------------------------------------------
# Report generation


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """One report per fixture, plus an overlay of two runs (rendered once)."""
    out = {}
    for path in ALL_FIXTURES:
        d = tmp_path_factory.mktemp(path.stem)
        out[path.stem] = (write_report([load_history(path)], d), [load_history(path)])
    pair = [load_history(CONVERGING), load_history(AUTOCONVERGE)]
    d = tmp_path_factory.mktemp("overlay")
    out["overlay"] = (write_report(pair, d, title="wp-all vs auto-converge"), pair)
    return out


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_MAGIC
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", [p.stem for p in ALL_FIXTURES] + ["overlay"])
def test_report_files(reports, name):
    paths, histories = reports[name]
    names = sorted(p.name for p in paths.out_dir.iterdir())
    assert names == sorted(["report.md", "report.html", "report.json", *PLOTS])
    assert [p.name for p in paths.plots] == list(PLOTS)
    for png in paths.plots:
        data = png.read_bytes()
        width, height = _png_size(data)
        assert width >= 600 and height >= 300
        assert len(data) > 10_000  # something was drawn, not a blank canvas

    rows = json.loads(paths.json.read_text())
    labels = [h.label for h in histories]
    assert [run["label"] for run in rows["runs"]] == labels
    for h in histories:
        mine = [row for row in rows["iterations"] if row["run"] == h.label]
        assert [{k: v for k, v in row.items() if k != "run"} for row in mine] == \
            [r.to_json() for r in h.iterations]
    assert len(rows["iterations"]) == sum(len(h.iterations) for h in histories)


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.stem)
def test_report_json_summary(reports, path):
    paths, _ = reports[path.stem]
    raw = _raw(path)
    summary = json.loads(paths.json.read_text())["runs"][0]["summary"]
    iters = raw["iterations"]
    assert summary["status"] == raw["status"]
    assert summary["converged"] is (raw["status"] == "completed")
    assert summary["iterations"] == len(iters)
    assert summary["total-bytes"] == sum(r["bytes"] for r in iters)
    assert summary["normal-pages"] == sum(r["normal-pages"] for r in iters)
    assert summary["zero-pages"] == sum(r["zero-pages"] for r in iters)
    assert summary["max-throttle-pct"] == max(r["throttle-pct"] for r in iters)
    assert summary["peak-dirty-rate-bytes-per-s"] == \
        max(r["dirty-rate-pages-per-s"] for r in iters) * 4096
    assert summary["downtime-ms"] == (raw["downtime"] or {}).get("total-ms")
    assert summary["mean-bandwidth-bytes-per-s"] == pytest.approx(
        sum(r["bytes"] for r in iters) / sum(r["duration-ms"] for r in iters) * 1000)


@pytest.mark.parametrize("name", [p.stem for p in ALL_FIXTURES] + ["overlay"])
def test_html_is_self_contained(reports, name):
    paths, _ = reports[name]
    text = paths.html.read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in paths.plots]
    assert 'src="http' not in text and "href=\"http" not in text
    assert "<link" not in text and "<script" not in text and "url(" not in text
    assert "<style>" in text and "How to read this" in text


@pytest.mark.parametrize("name", [p.stem for p in ALL_FIXTURES])
def test_markdown(reports, name):
    paths, (h,) = reports[name]
    text = paths.markdown.read_text()
    assert text.startswith("# Migration convergence report\n")
    assert "bandwidth x downtime-limit" in text
    assert f"|  | {h.label} |" in text
    for png in PLOTS:
        assert f"]({png})" in text
    # one table row per iteration, first column "N" or "N final"
    iter_rows = re.findall(r"^\| (\d+)( final)? \|", text, flags=re.M)
    assert [int(n) for n, _ in iter_rows] == [r.iteration for r in h.iterations]
    assert [bool(f) for _, f in iter_rows] == [r.final for r in h.iterations]
    assert ("Downtime breakdown:" in text) is (h.downtime is not None)


def test_overlay_has_both_runs(reports):
    paths, pair = reports["overlay"]
    md = paths.markdown.read_text()
    assert md.startswith("# wp-all vs auto-converge\n")
    assert "|  | converging | auto-converge |" in md
    assert "## Run: converging" in md and "## Run: auto-converge" in md
    html_text = paths.html.read_text()
    assert "<th>converging</th><th>auto-converge</th>" in html_text
    rows = json.loads(paths.json.read_text())
    assert {row["run"] for row in rows["iterations"]} == {"converging", "auto-converge"}
    summaries = {run["label"]: run["summary"] for run in rows["runs"]}
    assert summaries["converging"]["max-throttle-pct"] == 0
    assert summaries["auto-converge"]["max-throttle-pct"] == 60


def test_repeated_and_empty_labels_are_made_unique(tmp_path):
    a, b, c = load_history(CONVERGING), load_history(CONVERGING), load_history(CANCELLED)
    c.label = ""
    paths = write_report([a, b, c], tmp_path)
    labels = [run["label"] for run in json.loads(paths.json.read_text())["runs"]]
    assert labels == ["converging", "converging (2)", "run 3"]


def test_history_without_iterations(tmp_path):
    h = MigrationHistory(label="failed early", status="failed",
                         setup={"memory-bytes": 1 << 30, "page-size": 4096})
    paths = write_report([h], tmp_path)
    assert "No iterations recorded." in paths.markdown.read_text()
    assert json.loads(paths.json.read_text())["iterations"] == []
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in paths.plots)
    assert summarize(h).converged is False


def test_write_report_needs_a_history(tmp_path):
    with pytest.raises(ValueError):
        write_report([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------
# Loading


def test_demo_json_wrapper_is_accepted():
    raw = _raw(AUTOCONVERGE)
    wrapped = {"status": "completed", "history": raw, "query-migrate": {"status": "completed"}}
    assert history_from_document(wrapped) == history_from_document(raw)


@pytest.mark.parametrize("doc, reason", [
    ([1, 2], "expected a JSON object"),
    ({"history": [1]}, "'history' must be a JSON object"),
    ({"label": "x"}, "no 'schema' key"),
    ({"schema": 2}, "unsupported history schema 2"),
    ({"schema": 1, "iterations": {}}, "'iterations' must be list"),
    ({"schema": 1, "iterations": [{"iteration": 1, "dirty-pages": 3}]},
     "iterations[0]: missing 'time-ms'"),
    ({"schema": 1, "iterations": [{"iteration": 1, "time-ms": "soon", "dirty-pages": 3}]},
     "iterations[0].time-ms must be a number"),
    ({"schema": 1, "iterations": [{"iteration": 1, "time-ms": 1, "dirty-pages": 3,
                                   "final": 1}]}, "iterations[0].final must be true/false"),
    ({"schema": 1, "downtime": 5}, "'downtime' must be an object or null"),
    ({"schema": 1, "downtime": {"total-ms": None}}, "downtime.total-ms must be a number"),
    ({"schema": 1, "total-time-ms": "1s"}, "'total-time-ms' must be a number or null"),
])
def test_bad_documents_are_rejected_with_a_reason(doc, reason):
    with pytest.raises(ValueError, match=re.escape(reason)):
        history_from_document(doc)


def test_load_history_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ReportInputError) as info:
        load_history(bad)
    assert info.value.path == bad and info.value.reason.startswith("invalid JSON")
    with pytest.raises(ReportInputError, match="No such file"):
        load_history(tmp_path / "missing.json")
    with pytest.raises(ReportInputError, match="not UTF-8"):
        (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
        load_history(tmp_path / "bin.json")


# --------------------------------------------------------------------------
# CLI


def test_cli_writes_report(tmp_path, capsys):
    out = tmp_path / "nested" / "out"
    rc = report_main([str(CONVERGING), str(CANCELLED), "--out", str(out), "--title", "T & T"])
    assert rc == 0
    assert (out / "report.html").is_file() and (out / "remaining.png").is_file()
    assert "# T & T" in (out / "report.md").read_text()
    assert "<h1>T &amp; T</h1>" in (out / "report.html").read_text()
    assert str(out) in capsys.readouterr().out


def test_cli_label_defaults_to_file_stem(tmp_path, capsys):
    raw = _raw(CANCELLED)
    raw["label"] = ""
    src = tmp_path / "wp-off.json"
    src.write_text(json.dumps({"history": raw}))
    assert report_main([str(src), "-o", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [run["label"] for run in rows["runs"]] == ["wp-off"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    cases = {
        "missing": (tmp_path / "nope.json", "No such file or directory"),
        "bad-json": (tmp_path / "bad.json", "invalid JSON"),
        "bad-schema": (tmp_path / "schema.json", "unsupported history schema 9"),
        "a-directory": (tmp_path, ""),
    }
    cases["bad-json"][0].write_text('{"schema": 1,')
    cases["bad-schema"][0].write_text(json.dumps({"schema": 9}))
    return cases


@pytest.mark.parametrize("case", ["missing", "bad-json", "bad-schema", "a-directory"])
def test_cli_bad_file_exits_2_and_writes_nothing(tmp_path, capsys, case):
    path, reason = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    rc = report_main([str(CONVERGING), str(path), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"migrator report: error: {path}: {reason}")
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_reports_every_bad_file(tmp_path, capsys):
    cases = _bad_inputs(tmp_path)
    rc = report_main([str(cases["bad-json"][0]), str(cases["missing"][0]), "-o",
                      str(tmp_path / "out")])
    assert rc == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert [ln.split(": ")[2] for ln in lines] == [str(cases["bad-json"][0]),
                                                   str(cases["missing"][0])]


def test_cli_out_must_be_a_directory(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep me")
    assert report_main([str(CONVERGING), "--out", str(target)]) == 2
    assert f"migrator report: error: {target}: not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("argv", [[], ["--out", "x"], [str(CONVERGING)],
                                  [str(CONVERGING), "--out", "x", "--bogus"]])
def test_cli_usage_errors(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert report_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: migrator report") and "migrator report: error:" in err
    assert not (tmp_path / "x").exists()


def test_cli_help(capsys):
    assert report_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "HISTORY.json" in out and "--out DIR" in out


def test_importing_the_report_does_not_import_matplotlib():
    # matplotlib costs seconds cold; only rendering may import it.
    import subprocess
    import sys

    code = ("import sys, migrator.reports._report, migrator.reports._plots; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
