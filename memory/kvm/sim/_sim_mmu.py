"""The simulated x86-64 direct-map MMU behind :class:`memory.kvm.SimKVM`.

The kernel facts and the ordering rules this code relies on are written up
at the top of :mod:`memory.kvm.sim.simulated`; this module is the data structure
and its vectorised operations.

Layout
======

A direct-map (TDP-like) 4-level table: level 4 is the root (PML4), level 1
holds the leaf sptes (one per 4 KiB gfn).  Every table has 512 entries
(``KVM_MMU_SP_ENTRY_NR``).  An entry at level ``L`` is identified by
``gfn >> 9*(L-1)`` (its *entry id*), the table that holds it by
``gfn >> 9*L`` (its *table id*); the child table of an upper entry has the
entry's id as table id, so the direct map needs no pointers.

Tables exist lazily, as ``kvm_mmu_get_page`` creates them on faults.  Per
level, :class:`_Level` keeps the tables as rows of a ``(rows, 512)`` uint8
array (one byte per spte), a sorted directory ``ids -> row`` and, per table,
the two fields the 2017 series adds to ``struct kvm_mmu_page``:
``possiable_writable_sptes`` (a counter, :attr:`_Level.pwc`) and
``mmu_write_protect_all_gen`` (:attr:`_Level.gen`).  The per-entry
``possible_writable_spte_bitmap`` is bit 4 of each spte byte.  Memory cost:
about one byte per mapped gfn (plus 1/512 of that per upper level).

Every spte store goes through :meth:`_Mmu.spte_write`, which keeps the
possible-writable bitmap and counter in step with the entries, as
``mmu_log_possible_writable_spte`` does in every ``mmu_spte_*`` helper of
patch 2/7.  The one exception is :meth:`_Mmu.load_tables`, which updates
whole tables at once and maintains both itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._sim_shm import FAULT_ORDERS
from ._sim_shm import H_DIR_SEQ as H_DIR_SEQ_WORD

if TYPE_CHECKING:
    from collections.abc import Iterator

    from numpy.typing import NDArray

    from ._sim_shm import SharedState, StatRow

#: entries per table (KVM_MMU_SP_ENTRY_NR) and its log2
SPTE_ENT_SHIFT = 9
SPTE_ENT_NR = 1 << SPTE_ENT_SHIFT
#: PT64_ROOT_LEVEL: a 4-level (48-bit) direct map
ROOT_LEVEL = 4
#: MAXPHYADDR reported by KVM_GET_SUPPORTED_CPUID on this host (reference/kvm.md);
#: kvm_mmu_max_gfn() = 2**(46-12) - 1.
MAXPHYADDR = 46
MAX_GFN = (1 << (MAXPHYADDR - 12)) - 1

# --- spte bits: one byte per entry ----------------------------------------
#: shadow_present_mask
SPTE_PRESENT = np.uint8(0x01)
#: PT_WRITABLE_MASK
SPTE_WRITABLE = np.uint8(0x02)
#: SPTE_HOST_WRITEABLE | SPTE_MMU_WRITEABLE: the spte may be made writable
#: locklessly by fast_page_fault (spte_can_locklessly_be_made_writable).
#: Only leaves carry it.
SPTE_MMU_WRITABLE = np.uint8(0x04)
#: shadow_dirty_mask, the D bit that PML hardware sets (leaves only)
SPTE_DIRTY = np.uint8(0x08)
#: this entry's bit in sp->possible_writable_spte_bitmap (patch 2/7)
SPTE_POSSIBLY_WRITABLE = np.uint8(0x10)

_NOT_W = np.uint8(0xFF ^ 0x02)
_NOT_D = np.uint8(0xFF ^ 0x08)
_NOT_PW = np.uint8(0xFF ^ 0x10)
_W_OR_MMUW = np.uint8(0x06)
_ZERO = np.uint8(0)
# the same bits in all 8 bytes of a uint64 (8 sptes at a time)
_W8 = np.uint64(0x0202020202020202)
_NOT_W8 = ~_W8
_PW8 = np.uint64(0x1010101010101010)
_NOT_W_PW8 = ~np.uint64(0x1212121212121212)
#: an upper entry as link_shadow_page() creates it: present and writable
UPPER_LINK = np.uint8(0x01 | 0x02)

# --- kvm->arch.mmu_write_protect_all_indicator (patch 3/7) -----------------
WP_ALL_ENABLE_BIT = 63
WP_ALL_ENABLE_MASK = 1 << WP_ALL_ENABLE_BIT
WP_ALL_GEN_MASK = WP_ALL_ENABLE_MASK - 1

_EMPTY_I64 = np.empty(0, dtype=np.int64)

#: the broken push-down order (rule 6 reversed), as a fault-order code
ORDER_UPPER_FIRST = FAULT_ORDERS.index("upper_first")


def is_write_protect_all_enabled(indicator: int) -> bool:
    return bool(indicator & WP_ALL_ENABLE_MASK)


def get_write_protect_all_gen(indicator: int) -> int:
    return indicator & WP_ALL_GEN_MASK


def run_starts(a: NDArray[np.int64]) -> NDArray[np.int64]:
    """Start index of each run of equal values in ``a`` (sorted or grouped)."""
    if a.size == 0:
        return _EMPTY_I64
    d = np.flatnonzero(a[1:] != a[:-1])
    out = np.empty(d.size + 1, dtype=np.int64)
    out[0] = 0
    np.add(d, 1, out=out[1:])
    return out


def sorted_unique(a: NDArray[np.int64]) -> NDArray[np.int64]:
    """``np.unique(a)`` by a sort (numpy 2.4's ``np.unique`` is far slower)."""
    s = np.sort(a)
    if s.size < 2:
        return s
    return s[np.r_[True, s[1:] != s[:-1]]]


def run_lengths(starts: NDArray[np.int64], n: int) -> NDArray[np.int64]:
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    if starts.size:
        ends[-1] = n
    return ends - starts


class _Level:
    """All tables of one level: rows of 512 one-byte sptes + per-table fields.

    The arrays are views of the shared mapping (:mod:`._sim_shm`), with a
    fixed capacity of rows; tables are never freed.  The directory (sorted
    table ids -> row) is changed only under mmu_lock, and is read locklessly
    by the fast path: writers bracket a change with the shared ``dir_seq``
    (odd while changing), lockless readers retry a lookup that saw it odd or
    changed (a seqcount, as the kernel's lockless walks retry on
    ``mmu_invalidate_seq``).  A table's row never changes once created, so a
    validated lookup stays valid.
    """

    __slots__ = ("level", "shift", "_ids", "_rows_of", "ent", "gen", "pwc", "tid", "_n", "_ni", "_hdr", "capacity")

    def __init__(self, level: int, views: dict[str, NDArray[Any]], n_ref: tuple[NDArray[np.int64], int],
                 hdr: NDArray[np.int64]) -> None:
        self.level = level
        #: entry id = gfn >> shift; table id = gfn >> (shift + 9)
        self.shift = SPTE_ENT_SHIFT * (level - 1) if level else 0
        self.ent: NDArray[np.uint8] = views["ent"]
        self.gen: NDArray[np.int64] = views["gen"]
        self.pwc: NDArray[np.int64] = views["pwc"]
        self.tid: NDArray[np.int64] = views["tid"]
        self._ids: NDArray[np.int64] = views["ids"]
        self._rows_of: NDArray[np.int64] = views["rows_of"]
        self._n, self._ni = n_ref
        self._hdr = hdr
        self.capacity = int(self.gen.size)

    @classmethod
    def placeholder(cls) -> _Level:
        """Level 0: no tables (it keeps ``levels[L]`` indexed by level), never used."""
        views = {k: np.zeros((1, SPTE_ENT_NR) if k == "ent" else 1, dtype=np.uint8 if k == "ent" else np.int64)
                 for k in ("ent", "gen", "pwc", "tid", "ids", "rows_of")}
        return cls(0, views, (np.zeros(1, dtype=np.int64), 0), np.zeros(8, dtype=np.int64))

    @property
    def n(self) -> int:
        return int(self._n[self._ni])

    @property
    def ids(self) -> NDArray[np.int64]:
        """Sorted table ids (a view; stable only under mmu_lock)."""
        return self._ids[: self.n]

    @property
    def rows_of(self) -> NDArray[np.int64]:
        return self._rows_of[: self.n]

    @property
    def flat(self) -> NDArray[np.uint8]:
        """All entries as one array; entry ``row*512 + index``.  A view."""
        return self.ent.reshape(-1)

    def lookup(self, tids: NDArray[np.int64]) -> NDArray[np.int64]:
        """Rows of the tables ``tids`` (-1 where the table does not exist).

        Safe without mmu_lock: retried while the directory changes."""
        hdr = self._hdr
        while True:
            seq = int(hdr[H_DIR_SEQ_WORD])
            if seq & 1:
                continue
            n = int(self._n[self._ni])
            ids = self._ids[:n]
            if n == 0:
                rows = np.full(tids.shape, -1, dtype=np.int64)
            else:
                pos = np.searchsorted(ids, tids)
                np.minimum(pos, n - 1, out=pos)
                hit = ids[pos] == tids
                rows = self._rows_of[:n][pos]
                if not hit.all():
                    rows = np.where(hit, rows, -1)
            if int(hdr[H_DIR_SEQ_WORD]) == seq:
                return rows

    def create(self, tids: NDArray[np.int64], gen: int) -> NDArray[np.int64]:
        """kvm_mmu_get_page() for tables that do not exist: empty, ``gen``.

        ``tids`` must be sorted, unique and absent.  Caller holds mmu_lock.
        """
        import errno

        k = int(tids.size)
        n = self.n
        need = n + k
        if need > self.capacity:
            raise OSError(errno.ENOMEM, f"ENOMEM: level {self.level} table capacity {self.capacity} exhausted")
        rows = np.arange(n, need, dtype=np.int64)
        # rows past n were never used (tables are never freed): all zero.
        # The row is complete before the directory publishes it.
        self.gen[rows] = gen
        self.pwc[rows] = 0
        self.tid[rows] = tids
        pos = np.searchsorted(self._ids[:n], tids)
        new_ids = np.insert(self._ids[:n], pos, tids)
        new_rows = np.insert(self._rows_of[:n], pos, rows)
        hdr = self._hdr
        hdr[H_DIR_SEQ_WORD] += 1  # odd: lockless lookups retry
        self._ids[:need] = new_ids
        self._rows_of[:need] = new_rows
        self._n[self._ni] = need
        hdr[H_DIR_SEQ_WORD] += 1
        return rows


class WalkResult:
    """What the vectorised walk of a batch found (per unique page, sorted)."""

    __slots__ = ("leaf_index", "slow", "flushes", "upper_slow_faults")

    def __init__(self, leaf_index: NDArray[np.int64], slow: NDArray[np.bool_] | None, flushes: int,
                 upper_slow_faults: int) -> None:
        #: flat index of each page's leaf spte in level 1
        self.leaf_index: NDArray[np.int64] = leaf_index
        #: pages whose fault took the slow path because of an upper entry
        #: (missing or read-only), or None if none did
        self.slow: NDArray[np.bool_] | None = slow
        #: faults that flushed the TLB because a table load protected sptes
        self.flushes: int = flushes
        self.upper_slow_faults: int = upper_slow_faults


class Mmu:
    """The tables of one address space (one direct-map root, shared by vCPUs)."""

    def __init__(self, stats: StatRow, state: SharedState, as_id: int, gen: int, *, create_root: bool) -> None:
        self.stats = stats
        hdr = state["hdr"]
        n = state["level_n"][as_id]
        levels = [_Level.placeholder()]
        for lv in range(1, ROOT_LEVEL + 1):
            pre = f"mmu{as_id}_l{lv}_"
            views = {k: state[pre + k] for k in ("ent", "gen", "pwc", "tid", "ids", "rows_of")}
            levels.append(_Level(lv, views, (n, lv), hdr))
        self.levels: list[_Level] = levels
        if create_root:
            # mmu_alloc_direct_roots(): the root exists from the start, with
            # the current write-protect-all generation (kvm_mmu_get_page).
            self.levels[ROOT_LEVEL].create(np.zeros(1, dtype=np.int64), gen)

    # ------------------------------------------------------------------
    # spte stores
    # ------------------------------------------------------------------
    def spte_write(
        self,
        level: int,
        flat_idx: NDArray[np.int64],
        new: NDArray[np.uint8],
        old: NDArray[np.uint8] | None = None,
    ) -> None:
        """Store ``new`` sptes and log their possible-writable state.

        mmu_spte_set / mmu_spte_update / mmu_spte_clear_* +
        mmu_log_possible_writable_spte (patch 2/7): an spte is *possibly
        writable* if present and (writable or locklessly made writable).
        ``flat_idx`` must be unique.
        """
        if flat_idx.size == 0:
            return
        lev = self.levels[level]
        flat = lev.flat
        if old is None:
            old = flat[flat_idx]
        new_pw = ((new & SPTE_PRESENT) != 0) & ((new & _W_OR_MMUW) != 0)
        new = np.where(new_pw, new | SPTE_POSSIBLY_WRITABLE, new & _NOT_PW)
        flat[flat_idx] = new
        old_pw = (old & SPTE_POSSIBLY_WRITABLE) != 0
        changed = old_pw != new_pw
        if changed.any():
            rows = flat_idx[changed] >> SPTE_ENT_SHIFT
            delta = np.where(new_pw[changed], 1, -1)
            np.add.at(lev.pwc, rows, delta)

    # ------------------------------------------------------------------
    # write-protect-all: mmu_load_shadow_page (patch 3/7)
    # ------------------------------------------------------------------
    def load_tables(self, level: int, rows: NDArray[np.int64], indicator: int) -> NDArray[np.int64]:
        """mmu_load_shadow_page() on the tables ``rows`` of ``level``.

        If write-protect-all is enabled and a table's generation is stale,
        make every possibly-writable entry read-only (upper entries lose W
        and so stop being possibly writable; leaves lose W but keep
        mmu-writable, so they stay possibly writable and the fast page fault
        can fix them), then set the table's generation.  Like the patch, a
        table with no possibly-writable entry is left alone, generation
        included.  Returns the number of sptes protected per table (a
        non-zero count means the fault must flush the TLB).
        """
        out = np.zeros(rows.size, dtype=np.int64)
        if rows.size == 0 or not is_write_protect_all_enabled(indicator):
            return out
        gen = get_write_protect_all_gen(indicator)
        lev = self.levels[level]
        sel = (lev.gen[rows] != gen) & (lev.pwc[rows] > 0)
        if not sel.any():
            return out
        r = rows[sel]
        blk = lev.ent[r]
        # 8 sptes per uint64.  W implies possibly writable, so dropping W
        # from every entry of the table is the kernel's walk over the set
        # bits of possible_writable_spte_bitmap, done as one AND.
        b64 = blk.view(np.uint64)
        if level == 1:
            # spte_write_protect(sptep, pt_protect=false): drop W only; the
            # leaf stays mmu-writable, hence possibly writable
            cnt = np.bitwise_count(b64 & _W8).sum(axis=1, dtype=np.int64)
            np.bitwise_and(b64, _NOT_W8, out=b64)
        else:
            # mmu_spte_update_no_track(sptep, spte & ~PT_WRITABLE_MASK): an
            # upper entry is possibly writable iff writable; both bits go
            cnt = np.bitwise_count(b64 & _PW8).sum(axis=1, dtype=np.int64)
            np.bitwise_and(b64, _NOT_W_PW8, out=b64)
            lev.pwc[r] -= cnt
        lev.ent[r] = blk
        lev.gen[r] = gen
        out[sel] = cnt
        self.stats["sptes_write_protected"] += int(cnt.sum())
        return out

    def load_root(self, indicator: int) -> int:
        """mmu_alloc_direct_roots() -> mmu_load_shadow_page(root)."""
        return int(self.load_tables(ROOT_LEVEL, np.zeros(1, dtype=np.int64), indicator)[0])

    # ------------------------------------------------------------------
    # the fault path, vectorised over a batch
    # ------------------------------------------------------------------
    def walk(
        self,
        u: NDArray[np.int64],
        first: NDArray[np.int64] | None,
        write: bool,
        indicator: int,
        order: int = 0,
    ) -> WalkResult:
        """:meth:`walk_phases` run through: the vectorised fault path's walk."""
        out: list[WalkResult] = []
        for _ in self.walk_phases(u, first, write, indicator, order, out):
            pass
        return out[0]

    def walk_phases(
        self,
        u: NDArray[np.int64],
        first: NDArray[np.int64] | None,
        write: bool,
        indicator: int,
        order: int,
        out: list[WalkResult],
    ) -> Iterator[str]:
        """Walk the upper levels for the sorted unique pages ``u``, one phase
        per ``yield`` (the phase's name); the :class:`WalkResult` is appended
        to ``out`` at the end.

        ``first[i]`` is the position of ``u[i]``'s first occurrence in the
        batch (None: the batch was ``u`` itself).  Level by level, top-down,
        over the unique entries on the batch's paths:

        * a missing entry: create the child table (current generation,
          empty) and link it writable (link_shadow_page): ``link_table_lN``;
        * on a write, a read-only entry: handle_readonly_upper_spte:
          mmu_load_shadow_page(child) first, THEN make the entry writable
          (one phase, ``push_down_lN``: both under mmu_lock, and no walker
          uses the entry before it is writable).  ``order``
          :data:`ORDER_UPPER_FIRST` is the broken variant the tests must
          catch: the entry first (``push_down_upper_lN``), then the child
          (``load_child_lN``).  Reads leave read-only entries alone.

        Every level re-reads its entries after the previous phase, so the
        step model (:mod:`._sim_steps`), which lets other actors run between
        phases, runs this same code; the vectorised path runs it through.

        The result is what feeding the pages one at a time would give: a
        table is loaded when its parent entry is first made writable, which
        is before any page of the batch reaches its entries, so a load never
        undoes an earlier page's work.  Which fault pays for a push-down is
        attributed to the first page of the batch (in batch order) through
        the entry.
        """
        n = int(u.size)
        gen = get_write_protect_all_gen(indicator)
        # group bottom-up (cheap: each level is 512x smaller), walk top-down
        e2_all = u >> SPTE_ENT_SHIFT
        s2 = run_starts(e2_all)
        e2 = e2_all[s2]
        f2 = s2 if first is None else np.minimum.reduceat(first, s2)
        e3_all = e2 >> SPTE_ENT_SHIFT
        s3 = run_starts(e3_all)
        e3 = e3_all[s3]
        f3 = np.minimum.reduceat(f2, s3)
        e4_all = e3 >> SPTE_ENT_SHIFT
        s4 = run_starts(e4_all)
        e4 = e4_all[s4]
        f4 = np.minimum.reduceat(f3, s4)

        slow_firsts: list[NDArray[np.int64]] = []
        flush_firsts: list[NDArray[np.int64]] = []
        for level, e, f in ((4, e4, f4), (3, e3, f3), (2, e2, f2)):
            lev = self.levels[level]
            child = self.levels[level - 1]
            rows = lev.lookup(e >> SPTE_ENT_SHIFT)
            flat_idx = rows * SPTE_ENT_NR + (e & (SPTE_ENT_NR - 1))
            fl = lev.flat[flat_idx]
            miss = (fl & SPTE_PRESENT) == 0
            if miss.any():
                child.create(e[miss], gen)
                self.spte_write(level, flat_idx[miss], np.full(int(miss.sum()), UPPER_LINK), fl[miss])
                self.stats["tables_created"] += int(miss.sum())
                slow_firsts.append(f[miss])
                yield f"link_table_l{level}"
            if not write:
                continue
            ro = ~miss & ((fl & SPTE_WRITABLE) == 0)
            if not ro.any():
                continue
            self.stats["faults_push_down"] += int(ro.sum())
            fr = f[ro]
            slow_firsts.append(fr)
            child_rows = child.lookup(e[ro])
            if order == ORDER_UPPER_FIRST:
                # BROKEN (rule 6 reversed, for the tests): the entry is
                # writable while its child table still holds the writable
                # entries of the old generation
                self.spte_write(level, flat_idx[ro], fl[ro] | SPTE_WRITABLE, fl[ro])
                yield f"push_down_upper_l{level}"
                protected = self.load_tables(level - 1, child_rows, indicator)
                flush_firsts.append(fr[protected > 0])
                yield f"load_child_l{level}"
                continue
            # handle_readonly_upper_spte: protect the child BEFORE making
            # this entry writable (rule 6 in simulated.py)
            protected = self.load_tables(level - 1, child_rows, indicator)
            self.spte_write(level, flat_idx[ro], fl[ro] | SPTE_WRITABLE, fl[ro])
            flush_firsts.append(fr[protected > 0])
            yield f"push_down_l{level}"
        rows1 = self.levels[1].lookup(e2)
        leaf_index = np.repeat(rows1 * SPTE_ENT_NR, run_lengths(s2, n)) + (u & (SPTE_ENT_NR - 1))

        slow = None
        upper_slow = 0
        flushes = 0
        if slow_firsts:
            sf = sorted_unique(np.concatenate(slow_firsts))
            upper_slow = int(sf.size)
            slow = np.zeros(n, dtype=np.bool_)
            if first is None:
                slow[sf] = True
            else:
                inv = np.empty(int(first.max()) + 1, dtype=np.int64)
                inv[first] = np.arange(n, dtype=np.int64)
                slow[inv[sf]] = True
            if flush_firsts:
                flushes = int(sorted_unique(np.concatenate(flush_firsts)).size)
        out.append(WalkResult(leaf_index, slow, flushes, upper_slow))

    # ------------------------------------------------------------------
    # leaves by gfn (rmap walks)
    # ------------------------------------------------------------------
    def leaf_index(self, gfns: NDArray[np.int64]) -> NDArray[np.int64]:
        """Flat level-1 index of the leaves of sorted ``gfns`` (-1: no table)."""
        n = int(gfns.size)
        if n == 0:
            return _EMPTY_I64
        t = gfns >> SPTE_ENT_SHIFT
        s = run_starts(t)
        rows = self.levels[1].lookup(t[s])
        rows_rep = np.repeat(rows, run_lengths(s, n))
        idx = rows_rep * SPTE_ENT_NR + (gfns & (SPTE_ENT_NR - 1))
        return np.where(rows_rep < 0, -1, idx)

    def _clear_leaf_bit(self, leaf_idx: NDArray[np.int64], bit: np.uint8, keep: np.uint8, stat: str) -> int:
        """Clear ``bit`` (``keep`` = ~bit) on the leaves that have it; count them in ``stat``."""
        if leaf_idx.size == 0:
            return 0
        f = self.levels[1].flat[leaf_idx]
        m = (f & bit) != 0
        if not m.any():
            return 0
        sel = leaf_idx[m]
        fm = f[m]
        self.spte_write(1, sel, fm & keep, fm)
        n = int(sel.size)
        self.stats[stat] += n
        return n

    def protect_leaves(self, leaf_idx: NDArray[np.int64]) -> int:
        """spte_write_protect(pt_protect=false) on leaves: W off, mmu-writable kept."""
        return self._clear_leaf_bit(leaf_idx, SPTE_WRITABLE, _NOT_W, "sptes_write_protected")

    def clear_dirty_leaves(self, leaf_idx: NDArray[np.int64]) -> int:
        """spte_clear_dirty (PML): D off, the spte stays writable."""
        return self._clear_leaf_bit(leaf_idx, SPTE_DIRTY, _NOT_D, "sptes_dirty_cleared")

    def zap_leaves(self, leaf_idx: NDArray[np.int64]) -> int:
        """drop_spte(): clear the leaves (the caller then drops the rmap)."""
        if leaf_idx.size == 0:
            return 0
        self.spte_write(1, leaf_idx, np.zeros(leaf_idx.size, dtype=np.uint8))
        n = int(leaf_idx.size)
        self.stats["sptes_zapped"] += n
        return n

    def _entry_flags(self, level: int, e: NDArray[np.int64]) -> NDArray[np.uint8]:
        """Flags of the level-``level`` entries with ids ``e`` (0: table missing)."""
        lev = self.levels[level]
        rows = lev.lookup(e >> SPTE_ENT_SHIFT)
        idx = rows * SPTE_ENT_NR + (e & (SPTE_ENT_NR - 1))
        return np.where(rows >= 0, lev.flat[np.maximum(idx, 0)], _ZERO)

    def path_writable(self, gfns: NDArray[np.int64]) -> NDArray[np.bool_]:
        """Every upper entry on the path is present and writable.

        Each upper entry is looked up once per run of equal entries (a
        batch of contiguous pages shares one level-2 entry per 512 pages):
        the per-page lookups of three levels were the vCPU process's
        hottest code under dirty logging (py-spy, tools/bench_vcpu.py)."""
        n = int(gfns.size)
        if n == 0:
            return np.ones(0, dtype=np.bool_)
        e = gfns >> SPTE_ENT_SHIFT  # level-2 entry ids, one per page
        s = run_starts(e)
        e = e[s]
        ok = np.ones(e.shape, dtype=np.bool_)
        # level 2 on the distinct level-2 entries, then 3 and 4 on theirs
        for level in (2, 3, 4):
            if level > 2:
                e = e >> SPTE_ENT_SHIFT
            ok &= (self._entry_flags(level, e) & UPPER_LINK) == UPPER_LINK
        return np.repeat(ok, run_lengths(s, n))
