"""``CauseAccounting``: a cost meter that sums time, calls and counters per cause.

It implements :class:`memory.CostMeter`; set it as a VM's
``MemorySystem.cost_meter`` and every hook of ``memory/_cost.py`` reports to
it (global syncs, each dirty-log ioctl, memslot updates, ring reaps, the
VM's ``vm_stop``).  :meth:`CauseAccounting.snapshot` returns a frozen
:class:`AccountingSnapshot`.

Counters per cause: with a ``probe`` (a callable returning a backend's
counters, e.g. ``SimKVM.ioctl_statistics``: the VMM's own row, so vCPU
processes' concurrent faults are not charged to an ioctl), the probe is
read at the begin and end of every event that is not a sync, and the
difference is charged to the event's cause (summed, and the largest single
event kept).  Syncs are not probed: their events' deltas add up to theirs.

Syncs: a global sync (``GLOBAL_SYNC`` or ``FINAL_SYNC``) is recorded as a
:class:`SyncCost` with the dirty-log events that ran inside it (time,
pages, counter deltas), in order; that is where "the first dirty log"
comes from.

The meter never raises: an ``end`` without its ``begin`` (a token it does
not know) is counted in ``unmatched_ends`` and otherwise ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from memory import DIRTY_LOG_CAUSES, SYNC_CAUSES, Cause

__all__ = ["AccountingSnapshot", "CauseAccounting", "CauseCost", "SyncCost"]

_EMPTY: Mapping[str, int] = MappingProxyType({})
#: the causes whose ``pages`` are pages returned (a sync's ``pages``)
_FETCH_CAUSES = frozenset({Cause.GET_DIRTY_LOG, Cause.RING_HARVEST, Cause.RING_REAP})


def _frozen(d: Mapping[str, int]) -> Mapping[str, int]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, slots=True)
class CauseCost:
    """What the events of one cause (or a group of causes) cost.

    ``time_ns``: summed begin -> end wall time; ``max_time_ns``: the longest
    event; ``pages``: summed page counts (see ``memory/_cost.py``);
    ``first_begin_ns``: ``time.perf_counter_ns()`` at the first event's begin
    (None: no event); ``stats``/``max_stats``: the probe's counter deltas,
    summed / largest single event.
    """

    calls: int = 0
    time_ns: int = 0
    max_time_ns: int = 0
    pages: int = 0
    first_begin_ns: int | None = None
    stats: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    max_stats: Mapping[str, int] = field(default_factory=lambda: _EMPTY)

    def stat(self, name: str) -> int:
        return self.stats.get(name, 0)

    def max_stat(self, name: str) -> int:
        return self.max_stats.get(name, 0)

    @staticmethod
    def combine(costs: Iterable[CauseCost]) -> CauseCost:
        """The costs of several causes as one (sums; maxima of maxima)."""
        calls = time_ns = max_time = pages = 0
        first: int | None = None
        stats: dict[str, int] = {}
        maxs: dict[str, int] = {}
        for c in costs:
            calls += c.calls
            time_ns += c.time_ns
            max_time = max(max_time, c.max_time_ns)
            pages += c.pages
            if c.first_begin_ns is not None and (first is None or c.first_begin_ns < first):
                first = c.first_begin_ns
            for k, v in c.stats.items():
                stats[k] = stats.get(k, 0) + v
            for k, v in c.max_stats.items():
                maxs[k] = max(maxs.get(k, 0), v)
        return CauseCost(calls, time_ns, max_time, pages, first, _frozen(stats), _frozen(maxs))


@dataclass(frozen=True, slots=True)
class SyncCost:
    """One global sync.

    ``index``: 1-based among the syncs since the last reset; ``last_stage``:
    it was the ``FINAL_SYNC``; ``time_ns``: the whole sync; ``dirty_log_ns``,
    ``stats``: over the dirty-log events (``DIRTY_LOG_CAUSES``) inside it;
    ``events``: their count; ``pages``: the pages they returned (GET bits,
    ring entries harvested).
    """

    index: int
    last_stage: bool
    time_ns: int
    dirty_log_ns: int
    pages: int
    events: int
    stats: Mapping[str, int]

    def stat(self, name: str) -> int:
        return self.stats.get(name, 0)


@dataclass(frozen=True, slots=True)
class AccountingSnapshot:
    """Everything a :class:`CauseAccounting` measured, at one instant."""

    by_cause: Mapping[Cause, CauseCost]
    syncs: tuple[SyncCost, ...]
    unmatched_ends: int = 0

    def __getitem__(self, cause: Cause) -> CauseCost:
        """The cause's cost (all zero if it had no event)."""
        return self.by_cause.get(cause, _ZERO)

    def group(self, causes: Iterable[Cause]) -> CauseCost:
        """Several causes as one :class:`CauseCost`."""
        return CauseCost.combine(self[c] for c in causes)


_ZERO = CauseCost()


class _Open:
    __slots__ = ("cause", "t0", "before", "sync")

    def __init__(self, cause: Cause, t0: int, before: Mapping[str, int] | None, sync: _SyncAcc | None) -> None:
        self.cause = cause
        self.t0 = t0
        self.before = before
        self.sync = sync


class _CauseAcc:
    __slots__ = ("calls", "time_ns", "max_time_ns", "pages", "first", "stats", "max_stats")

    def __init__(self) -> None:
        self.calls = self.time_ns = self.max_time_ns = self.pages = 0
        self.first: int | None = None
        self.stats: dict[str, int] = {}
        self.max_stats: dict[str, int] = {}

    def freeze(self) -> CauseCost:
        return CauseCost(self.calls, self.time_ns, self.max_time_ns, self.pages, self.first,
                         _frozen(self.stats), _frozen(self.max_stats))


class _SyncAcc:
    __slots__ = ("index", "last_stage", "time_ns", "dirty_log_ns", "pages", "events", "stats")

    def __init__(self, index: int, last_stage: bool) -> None:
        self.index = index
        self.last_stage = last_stage
        self.time_ns = self.dirty_log_ns = self.pages = self.events = 0
        self.stats: dict[str, int] = {}

    def freeze(self) -> SyncCost:
        return SyncCost(self.index, self.last_stage, self.time_ns, self.dirty_log_ns, self.pages, self.events,
                        _frozen(self.stats))


class CauseAccounting:
    """A :class:`memory.CostMeter` that sums per cause (see the module docstring).

    Args:
        probe: returns a backend's counters; read around every non-sync
            event (None: no counters, only time, calls and pages).
        stat_names: the probe's counters to keep (None: all of them).
        clock: nanosecond clock (``time.perf_counter_ns``).
    """

    def __init__(self, probe: Callable[[], Mapping[str, int]] | None = None, *,
                 stat_names: Iterable[str] | None = None,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self._probe = probe
        self._names = tuple(stat_names) if stat_names is not None else None
        self._clock = clock
        self._next_token = 1
        self._open: dict[int, _Open] = {}
        self._open_syncs: list[_SyncAcc] = []
        self._by: dict[Cause, _CauseAcc] = {}
        self._syncs: list[_SyncAcc] = []
        self._unmatched = 0

    def _read(self) -> Mapping[str, int] | None:
        if self._probe is None:
            return None
        stats = self._probe()
        if self._names is None:
            return dict(stats)
        return {k: int(stats.get(k, 0)) for k in self._names}

    # -- CostMeter -------------------------------------------------------------
    def begin(self, cause: Cause) -> int:
        token = self._next_token
        self._next_token += 1
        sync: _SyncAcc | None = None
        before: Mapping[str, int] | None = None
        if cause in SYNC_CAUSES:
            if cause is not Cause.REGION_SYNC:
                sync = _SyncAcc(len(self._syncs) + len(self._open_syncs) + 1, cause is Cause.FINAL_SYNC)
                self._open_syncs.append(sync)
        else:
            before = self._read()
        self._open[token] = _Open(cause, self._clock(), before, sync)
        return token

    def end(self, cause: Cause, token: int, pages: int = 0) -> None:
        ev = self._open.pop(token, None)
        if ev is None or ev.cause is not cause:
            self._unmatched += 1
            return
        dt = self._clock() - ev.t0
        acc = self._by.get(cause)
        if acc is None:
            acc = self._by[cause] = _CauseAcc()
        acc.calls += 1
        acc.time_ns += dt
        acc.max_time_ns = max(acc.max_time_ns, dt)
        acc.pages += pages
        if acc.first is None:
            acc.first = ev.t0
        delta: dict[str, int] = {}
        if ev.before is not None:
            after = self._read()
            assert after is not None
            delta = {k: v - ev.before.get(k, 0) for k, v in after.items()}
            for k, v in delta.items():
                acc.stats[k] = acc.stats.get(k, 0) + v
                acc.max_stats[k] = max(acc.max_stats.get(k, v), v)
        if ev.sync is not None:
            ev.sync.time_ns = dt
            if ev.sync in self._open_syncs:
                self._open_syncs.remove(ev.sync)
            self._syncs.append(ev.sync)
        elif cause in DIRTY_LOG_CAUSES and self._open_syncs:
            sync = self._open_syncs[-1]
            sync.events += 1
            sync.dirty_log_ns += dt
            if cause in _FETCH_CAUSES:
                sync.pages += pages
            for k, v in delta.items():
                sync.stats[k] = sync.stats.get(k, 0) + v

    # -- reading ---------------------------------------------------------------
    def snapshot(self) -> AccountingSnapshot:
        """A frozen copy of everything measured since the last :meth:`reset`
        (events still open are not in it)."""
        return AccountingSnapshot(
            MappingProxyType({c: a.freeze() for c, a in self._by.items()}),
            tuple(s.freeze() for s in self._syncs),
            self._unmatched,
        )

    def reset(self) -> None:
        """Forget every finished event (open ones still end normally)."""
        self._by.clear()
        self._syncs.clear()
        self._unmatched = 0
