"""Strict checks of untrusted vCPU state (a migration stream's JSON).

One set of helpers for every validator of saved vCPU state: the real KVM
blob's (:mod:`memory.kvm.real._state`) and the engine's device-section check
(``migrator.engine._devstate``), so both refuse the same input with the same
words.  Each takes ``error``, which builds the caller's exception from the
detail (a :class:`~memory.kvm.real.VCPUStateError`, or a protocol error with
the stream offset); nothing here knows who asked.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from typing import Any, NoReturn

__all__ = ["exact_keys", "int_in", "strict_json"]

#: builds the caller's exception for one detail
ErrorFn = Callable[[str], Exception]


def strict_json(raw: bytes, what: str, error: ErrorFn) -> Any:
    """JSON without NaN/Infinity, duplicate keys or invalid UTF-8."""
    def no_constant(name: str) -> NoReturn:
        raise ValueError(f"{name} is not a number JSON allows")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constant, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {str(exc)[:120]}") from None


def int_in(value: object, lo: int, hi: int, what: str, error: ErrorFn) -> int:
    """``value`` if it is an integer (not a bool) in [lo, hi]."""
    if type(value) is not int:  # bool is an int subclass: refuse it too
        raise error(f"{what} must be an integer, not {type(value).__name__} {str(value)[:40]!r}")
    if not lo <= value <= hi:
        raise error(f"{what} {str(value)[:40]} is out of range [{lo}, {hi}]")
    return value


def exact_keys(obj: object, required: Collection[str], what: str, error: ErrorFn) -> dict[str, Any]:
    """``obj`` if it is an object with exactly the ``required`` keys."""
    if not isinstance(obj, dict):
        raise error(f"{what} must be an object, not {type(obj).__name__}")
    if set(obj) != set(required):
        missing = sorted(set(required) - set(obj))
        extra = sorted(set(obj) - set(required))
        raise error(f"{what} has missing fields {missing} / unknown fields {extra}")
    return obj
