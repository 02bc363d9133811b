"""Helpers for testing code that produces or consumes migration streams.

Like ``trio.testing``: small, public, used by this package's tests and
available to others (e.g. to compare a decoded stream with a model).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._decoder import ConnectionClosed, StreamDecoder
from ._events import NEED_DATA, Event, RamPages, RamZeroPages

__all__ = ["decode_all", "expand_pages", "materialise"]


def materialise(event: Any) -> Any:
    """Copy the arrays of a page event (its views die with the next decoder call)."""
    if isinstance(event, RamPages):
        return RamPages(event.block, event.offsets.copy(), np.array(event.data, copy=True))
    if isinstance(event, RamZeroPages):
        return RamZeroPages(event.block, event.offsets.copy())
    return event


def decode_all(
    data: bytes | bytearray | memoryview,
    *,
    cuts: Sequence[int] | None = None,
    close: bool = True,
    **decoder_kwargs: Any,
) -> list[Event | ConnectionClosed]:
    """Decode ``data`` fed in pieces split at ``cuts``; return materialised events.

    Feeds each piece, drains ``next_event()`` until ``NEED_DATA``, then (if
    ``close``) reports EOF and drains again up to :class:`ConnectionClosed`.
    Exceptions from the decoder propagate.
    """
    dec = StreamDecoder(**decoder_kwargs)
    events: list[Event | ConnectionClosed] = []
    mv = memoryview(data).cast("B")
    bounds = [0, *sorted(c for c in (cuts or ()) if 0 < c < len(mv)), len(mv)]

    def drain() -> None:
        while True:
            ev = dec.next_event()
            if ev is NEED_DATA:
                return
            events.append(materialise(ev))
            if isinstance(ev, ConnectionClosed):
                return

    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            dec.receive_data(mv[a:b])
            drain()
    if close:
        dec.receive_data(b"")
        drain()
    return events


def expand_pages(events: Iterable[Any]) -> list[Any]:
    """Normalise page runs to one tuple per page, so groupings compare equal.

    ``RamPages`` become ``("page", block, offset, bytes)`` and ``RamZeroPages``
    ``("zero", block, offset)``; other events pass through unchanged.
    """
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, RamPages):
            out.extend(("page", ev.block, int(o), bytes(d)) for o, d in zip(ev.offsets, ev.data))
        elif isinstance(ev, RamZeroPages):
            out.extend(("zero", ev.block, int(o)) for o in ev.offsets)
        else:
            out.append(ev)
    return out
