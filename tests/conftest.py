"""Shared test configuration.

pytest-trio runs every trio test inside a nursery, so with strict exception
groups (trio >= 0.25) a plain assertion failure arrives wrapped in an
ExceptionGroup.  Unwrap single leaves so failures read like ordinary pytest
failures and ``pytest.raises`` / ``xfail(raises=...)`` match.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import settings

# No per-example deadlines: CI machines are shared and timing is not what
# these properties test (speed is measured by tools/, never asserted).
settings.register_profile("migrator", deadline=None)
settings.load_profile("migrator")


def _leaves(eg: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    except BaseExceptionGroup as eg:
        leaves = _leaves(eg)
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


@pytest.fixture
async def trio_timeout(request, nursery):
    """Watchdog: ``@pytest.mark.trio_timeout(SECONDS)`` (default 60 s)."""
    marker = request.node.get_closest_marker("trio_timeout")
    seconds = marker.args[0] if marker else 60

    async def watchdog():
        await trio.sleep(seconds)
        raise trio.TooSlowError(f"test exceeded {seconds}s")

    nursery.start_soon(watchdog)
