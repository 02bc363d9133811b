"""Reports: the renderer and plots over recorded histories, and the seed's
case-2 comparison benchmark.

Consumes :mod:`migrator.engine`'s history records and public statistics;
never imports :mod:`migrator.cli`.
"""

from ._report import ReportInputError, ReportPaths, RunSummary, load_history, write_report

__all__ = ["ReportInputError", "ReportPaths", "RunSummary", "load_history", "write_report"]
