"""Shared test configuration.

pytest-trio runs every trio test inside a nursery, so with strict exception
groups (trio >= 0.25) a plain assertion failure arrives wrapped in an
ExceptionGroup.  Unwrap single leaves so failures read like ordinary pytest
failures and ``pytest.raises`` / ``xfail(raises=...)`` match.
"""

from __future__ import annotations

import functools
import inspect

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


def _budget(item) -> float:
    marker = item.get_closest_marker("trio_timeout")
    return marker.args[0] if marker else 60


def pytest_collection_modifyitems(config, items):
    """Arm a watchdog for every trio test, whether or not it asks for one.

    A module-level ``pytestmark = pytest.mark.trio_timeout(N)`` only sets the
    budget. pytest-trio starts only the fixtures a test names in its signature,
    so the ``trio_timeout`` fixture alone never armed for the others: each
    async test body runs under ``trio.fail_after`` instead (pytest-trio wraps
    this wrapper; the signature is kept through ``functools.wraps``).
    """
    for item in items:
        fn = getattr(item, "obj", None)
        if not inspect.iscoroutinefunction(fn) or hasattr(fn, "hypothesis"):
            continue
        seconds = _budget(item)

        @functools.wraps(fn)
        async def guarded(*args, __fn=fn, __seconds=seconds, **kwargs):
            with trio.fail_after(__seconds):
                return await __fn(*args, **kwargs)

        item.obj = guarded


@pytest.fixture
def trio_timeout(request) -> float:
    """The test's watchdog budget in seconds (``@pytest.mark.trio_timeout``,
    default 60). The watchdog itself is the wrapper armed for every trio test in
    ``pytest_collection_modifyitems``; tests that name this fixture get the
    number, e.g. to size their own waits."""
    return _budget(request.node)
