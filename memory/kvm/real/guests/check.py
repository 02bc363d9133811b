"""``check_guests_ram``: QEMU's RAM check for the a-b test guest.

QEMU's migration test (tests/qtest/migration/framework.c) reads byte 0 of
every 4 KiB page of [START, END) and accepts exactly one pattern: all pages
equal, or a prefix holding v followed by a suffix holding v-1 (mod 256),
since the guest increments the pages in ascending order.  The first page
that is neither the current value nor the single allowed step down by one
counts as bad and does *not* update ``last``.  There is no wrap from END
back to START and no comparison with the source: a lost dirty page shows up
as a page that missed increments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAGE_SIZE = 4096


@dataclass(frozen=True)
class GuestRamCheck:
    bad: int
    first_value: int
    hit_edge: bool
    #: guest-physical addresses of the first (at most 10) bad pages
    bad_addrs: list[int] = field(default_factory=list)


def check_guests_ram(ram: np.ndarray, start: int, end: int, *, base_gpa: int = 0) -> GuestRamCheck:
    """Check byte 0 of every page of ``[start, end)`` (guest-physical).

    ``ram`` is the uint8 host view whose byte 0 is at ``base_gpa``.
    Vectorised equivalent of the loop in ``check_guests_ram_loop``.
    """
    v = ram[start - base_gpa : end - base_gpa : PAGE_SIZE]
    if len(v) == 0:
        return GuestRamCheck(0, 0, False)
    first = int(v[0])
    below = (first - 1) % 256
    rest = v[1:]
    edges = np.flatnonzero(rest == below)
    if len(edges) == 0:
        bad_mask = rest != first
        hit_edge = False
    else:
        e = int(edges[0])
        bad_mask = np.concatenate([rest[:e] != first, [False], rest[e + 1 :] != below])
        hit_edge = True
    bad_idx = np.flatnonzero(bad_mask)
    addrs = [start + (int(i) + 1) * PAGE_SIZE for i in bad_idx[:10]]
    return GuestRamCheck(int(len(bad_idx)), first, hit_edge, addrs)


def check_guests_ram_loop(ram: np.ndarray, start: int, end: int, *, base_gpa: int = 0) -> int:
    """The check exactly as QEMU writes it (one page at a time); returns ``bad``."""
    first = int(ram[start - base_gpa])
    last = first
    hit_edge = False
    bad = 0
    for addr in range(start + PAGE_SIZE, end, PAGE_SIZE):
        b = int(ram[addr - base_gpa])
        if b != last:
            if (b + 1) % 256 == last and not hit_edge:
                hit_edge = True
                last = b
            else:
                bad += 1
    return bad


def ab_pages_written(ram: np.ndarray, start: int, end: int, published: int, *, base_gpa: int = 0) -> int:
    """Page writes of the ``ab`` vCPU whose share is ``[start, end)``.

    ``published`` is the vCPU's VC_WRITES: the guest adds the share's page
    count at the end of the zeroing pass and of every pass, so it equals
    ``share * (passes + 1)``.  The pass in progress is read from RAM:
    the pages of the share already holding ``passes + 1`` (the ab invariant;
    the value is distinct from the ``passes`` the others hold, mod 256).
    Exact while the vCPU is stopped; while it runs, a pass may complete
    between the load of VC_WRITES and the scan, so the figure can lag by at
    most one pass of the share.  0 during the zeroing pass.
    """
    share = (end - start) // PAGE_SIZE
    if published <= 0 or share <= 0:
        return 0
    passes = published // share - 1
    v = ram[start - base_gpa : end - base_gpa : PAGE_SIZE]
    ahead = int(np.count_nonzero(v == (passes + 1) % 256))
    return published + min(ahead, share)
