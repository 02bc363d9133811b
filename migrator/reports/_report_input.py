"""``migrator report``'s input: reading history files and checking their shape.

A history file is a ``MigrationHistory`` JSON document
(``x-query-migration-history``) or ``migrator demo --json`` output, whose
``"history"`` key holds one.  Everything wrong with it becomes one
:class:`ReportInputError` naming the file and the reason, before anything
is rendered.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeGuard

from ..engine._history import (BOOL_FIELDS, LIST_FIELDS, DestinationTimeline, DowntimeBreakdown,
                               DowntimePrediction, IterationRecord, MigrationHistory)
from ..errors import MigratorError

__all__ = ["ReportInputError", "history_from_document", "is_number", "load_history"]


class ReportInputError(MigratorError, ValueError):
    """A history file that cannot be reported on (a :class:`MigratorError`).

    Attributes:
        path: the offending file.
        reason: what is wrong with it, for ``migrator report: error: PATH: REASON``.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


_REQUIRED_ITERATION_KEYS = ("iteration", "time-ms", "dirty-pages")


def history_from_document(data: Any) -> MigrationHistory:
    """Build a history from a parsed JSON document, checking its shape.

    Accepts a MigrationHistory object, or ``migrator demo --json`` output
    (an object whose ``"history"`` key holds one).

    Raises:
        ValueError: with a one-line reason, if the document is neither.
    """
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object (a migration history), got {_kind(data)}")
    if "schema" not in data and "history" in data:
        data = data["history"]
        if not isinstance(data, dict):
            raise ValueError(f"'history' must be a JSON object, got {_kind(data)}")
    if "schema" not in data:
        raise ValueError("not a migration history: no 'schema' key "
                         "(expected a MigrationHistory or `migrator demo --json` output)")
    for key, kind in (("label", str), ("status", str), ("setup", dict), ("iterations", list)):
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"'{key}' must be {kind.__name__}, got {_kind(data[key])}")
    for i, row in enumerate(data.get("iterations", [])):
        if not isinstance(row, dict):
            raise ValueError(f"iterations[{i}] must be an object, got {_kind(row)}")
        for key in _REQUIRED_ITERATION_KEYS:
            if key not in row and key.replace("-", "_") not in row:
                raise ValueError(f"iterations[{i}]: missing '{key}'")
    for key in ("downtime", "downtime-prediction", "destination"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise ValueError(f"'{key}' must be an object or null, got {_kind(data[key])}")
    for key in ("total-time-ms", "setup-time-ms", "start-unix-ms"):
        if data.get(key) is not None and not is_number(data[key]):
            raise ValueError(f"'{key}' must be a number or null, got {data[key]!r}")
    history = MigrationHistory.from_json(data)  # raises ValueError on a schema mismatch
    for i, rec in enumerate(history.iterations):
        _check_record_types(rec, f"iterations[{i}]")
    for name in ("downtime", "downtime_prediction", "destination"):
        part = getattr(history, name)
        if part is not None:
            _check_record_types(part, name.replace("_", "-"))
    return history


def load_history(path: Path) -> MigrationHistory:
    """Read and validate one history file.

    Raises:
        ReportInputError: unreadable file, bad JSON, or not a history.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportInputError(path, "not UTF-8 text") from None
    except OSError as exc:
        raise ReportInputError(path, exc.strerror or str(exc)) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportInputError(path, f"invalid JSON: {exc}") from exc
    try:
        return history_from_document(data)
    except ValueError as exc:
        raise ReportInputError(path, str(exc)) from exc


def _check_record_types(rec: IterationRecord | DowntimeBreakdown | DowntimePrediction | DestinationTimeline,
                        where: str) -> None:
    for f in fields(rec):
        value = getattr(rec, f.name)
        key = f.name.replace("_", "-")
        if f.name in BOOL_FIELDS:
            if not isinstance(value, bool):
                raise ValueError(f"{where}.{key} must be true/false, got {value!r}")
        elif f.name in LIST_FIELDS:
            if not isinstance(value, list) or not all(is_number(v) for v in value):
                raise ValueError(f"{where}.{key} must be a list of numbers, got {value!r}")
        elif not is_number(value):
            raise ValueError(f"{where}.{key} must be a number, got {value!r}")


def is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
