#!/usr/bin/env python3
"""Case 2 of the 2017 "KVM: MMU: fast write protect" series on the simulated KVM.

A thin wrapper around ``migrator compare`` (see migrator/reports/_compare.py): four
migrations, {fresh, pre-written guest} x {write-protect-all off, on}, under
a greedy ``stream`` writer; prints the table with the seed's figures beside
ours and, with ``--out DIR``, writes the convergence report (report.md,
report.html, report.json, PNGs) plus compare.json / compare.md.

    python tools/compare_write_protect.py --quick            # ~5 s
    python tools/compare_write_protect.py --out /tmp/wp      # 1G, 2 repeats, ~2 min
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from migrator.cli._cli import main  # noqa: E402  (the `migrator` command line)

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
