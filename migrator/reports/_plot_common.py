"""What the report's plots share: the values read from a history and axes helpers.

Used by ``_plots.py`` (remaining bytes, rates, pages) and ``_plots_phases.py``
(downtime, throttle, timeline); matplotlib is imported only inside the
helpers that draw, as in ``_plots.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ..engine._history import MigrationHistory

MIB = 1 << 20


#: DowntimeBreakdown fields in the order they happen, with legend labels.
DOWNTIME_PARTS: tuple[tuple[str, str], ...] = (
    ("stop_vcpus_ms", "stop vCPUs"),
    ("final_sync_ms", "final dirty sync"),
    ("last_pages_ms", "last pages"),
    ("device_state_ms", "device state"),
    ("destination_resume_ms", "destination resume"),
)


#: more runs than this in one plot: drop per-point annotations, slant labels
MANY_RUNS = 3


@dataclass(frozen=True, slots=True)
class PlotRun:
    """One history to draw, with its (unique) label."""

    label: str
    history: MigrationHistory


def page_size_bytes(history: MigrationHistory) -> int:
    """The run's target page size from ``setup`` (4096 if not recorded)."""
    value = history.setup.get("page-size", history.setup.get("page_size", 4096))
    return int(value) if isinstance(value, (int, float)) and value > 0 else 4096


def parameter(history: MigrationHistory, name: str) -> float | None:
    """A migration parameter from ``setup['parameters']`` (QAPI or snake name)."""
    params = history.setup.get("parameters")
    if not isinstance(params, dict):
        return None
    value = params.get(name, params.get(name.replace("-", "_")))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def exact_recorded(history: MigrationHistory) -> bool:
    """Whether the rows carry the engine's exact figures (interval, threshold...)."""
    return any(r.interval_ms > 0 or r.threshold_bytes > 0 for r in history.iterations)


def dirty_rates_pages_per_s(history: MigrationHistory) -> list[float | None]:
    """Each row's dirty rate: exact when recorded (None for the first and the
    stopped row), else (older histories) QEMU's ``dirty-pages-rate``."""
    if not exact_recorded(history):
        return [r.dirty_rate_pages_per_s for r in history.iterations]
    return [r.exact_dirty_rate_pages_per_s if r.interval_ms > 0 and not r.final else None
            for r in history.iterations]


def thresholds_bytes(history: MigrationHistory) -> list[float | None]:
    """The ``threshold_size`` each row's switchover test used (None if unknown).

    The recorded ``threshold-bytes`` when the history has it; else (older
    histories) ``expected_bw x downtime-limit`` rebuilt with ``expected_bw``
    the ``avail-switchover-bandwidth`` parameter when non-zero, or the
    bandwidth recorded on the previous row (see the module docstring).
    """
    if exact_recorded(history):
        return [float(r.threshold_bytes) if r.threshold_bytes > 0 else None
                for r in history.iterations]
    limit_ms = parameter(history, "downtime-limit")
    avail = parameter(history, "avail-switchover-bandwidth") or 0.0
    out: list[float | None] = []
    prev_bw: float | None = None
    for rec in history.iterations:
        bw = avail if avail > 0 else prev_bw
        out.append(None if limit_ms is None or not bw else bw * limit_ms / 1000.0)
        prev_bw = rec.bandwidth_bytes_per_s
    return out


def legend(ax: Axes, **kwargs: Any) -> None:
    # Only when something is labelled: an empty legend() warns, and the
    # test suite turns warnings into errors.
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize="small", **kwargs)


def palette(name: str) -> list[Any]:
    """The colours of matplotlib's listed colormap ``name`` (tab10, Set2...)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    cmap = colormaps[name]
    if not isinstance(cmap, ListedColormap):
        raise ValueError(f"colormap {name!r} is not a listed colormap")
    colors: list[Any] = list(cmap.colors)  # type: ignore[arg-type]  # matplotlib types .colors as ArrayLike; a ListedColormap holds a list
    return colors


def no_data(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.4")


def pos_or_nan(value: float) -> float:
    """A value for a log axis: non-positive ones become gaps."""
    return value if value > 0 else math.nan


def plain_log_ticks(ax: Axes) -> None:
    """1-2-5 ticks written as plain numbers (no 10^x) on a log y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, pos_or_nan: f"{v:,.6g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def integer_xticks(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
