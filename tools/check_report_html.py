"""Open a report.html in headless Chromium and check that no image is broken.

The report itself carries no script (it is self-contained and static), so
the check runs on a copy: the copy gets a small script that, once the page
has loaded, writes every ``<img>``'s ``naturalWidth`` x ``naturalHeight``
and ``complete`` flag into a ``<pre id="img-check">`` element; Chromium's
``--dump-dom`` prints the DOM after load, and the JSON is read back from it.
An image that failed to decode has ``naturalWidth`` 0.  ``--screenshot
FILE.png`` also saves what the browser drew, to look at.

Usage::

    python tools/check_report_html.py report/report.html [--screenshot shot.png] [--json]

Exit status 0 if every image decoded, 1 if one did not, 2 if Chromium is
missing or failed.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PROBE = """
<script>
window.addEventListener("load", function () {
  var out = Array.prototype.map.call(document.images, function (img) {
    return {alt: img.alt, complete: img.complete, width: img.naturalWidth,
            height: img.naturalHeight};
  });
  var pre = document.createElement("pre");
  pre.id = "img-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _chromium_args(chromium: str, *extra: str) -> list[str]:
    return [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--hide-scrollbars", "--virtual-time-budget=5000", *extra]


def check_images(report_html: Path, *, chromium: str | None = None, timeout: float = 90.0) -> list[dict]:
    """Each ``<img>`` of ``report_html`` as Chromium loaded it: alt, complete, width, height.

    Raises:
        FileNotFoundError: no Chromium on PATH.
        RuntimeError: Chromium failed or printed no result.
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
    text = Path(report_html).read_text(encoding="utf-8")
    probed = text.replace("</body>", _PROBE + "</body>") if "</body>" in text else text + _PROBE
    with tempfile.TemporaryDirectory(prefix="report-check-") as tmp:
        page = Path(tmp) / "probe.html"
        page.write_text(probed, encoding="utf-8")
        proc = subprocess.run(_chromium_args(chromium, f"--user-data-dir={tmp}/profile", "--dump-dom",
                                             page.as_uri()),
                              capture_output=True, text=True, timeout=timeout)
    m = re.search(r'<pre id="img-check">(.*?)</pre>', proc.stdout, re.S)
    if m is None:
        raise RuntimeError(f"chromium printed no image check (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-400:]}")
    return json.loads(html.unescape(m.group(1)))


def screenshot(report_html: Path, out_png: Path, *, chromium: str | None = None,
               width: int = 1400, height: int = 4000, timeout: float = 90.0) -> None:
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH (apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        subprocess.run(_chromium_args(chromium, f"--user-data-dir={tmp}/profile",
                                      f"--window-size={width},{height}",
                                      f"--screenshot={Path(out_png).resolve()}",
                                      Path(report_html).resolve().as_uri()),
                       capture_output=True, text=True, timeout=timeout, check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report_html", type=Path)
    ap.add_argument("--screenshot", type=Path, metavar="FILE.png")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    try:
        images = check_images(args.report_html)
        if args.screenshot:
            screenshot(args.report_html, args.screenshot)
    except (FileNotFoundError, RuntimeError, subprocess.SubprocessError) as exc:
        print(f"check_report_html: {exc}", file=sys.stderr)
        return 2
    broken = [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    if args.json:
        print(json.dumps({"images": images, "broken": len(broken)}))
    else:
        for i in images:
            state = "ok" if i not in broken else "BROKEN"
            print(f"{state:6} {i['width']:>5} x {i['height']:<5} {i['alt']}")
        print(f"{len(images)} images, {len(broken)} broken")
    return 1 if broken or not images else 0


if __name__ == "__main__":
    sys.exit(main())
