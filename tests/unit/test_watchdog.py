"""The suite's watchdog really arms: every trio test body runs under a deadline
(tests/conftest.py), with or without naming the ``trio_timeout`` fixture."""

import math

import pytest
import trio

pytestmark = pytest.mark.trio_timeout(42)


async def test_every_trio_test_has_a_deadline():
    remaining = trio.current_effective_deadline() - trio.current_time()
    assert not math.isinf(remaining)
    assert 0 < remaining <= 42


async def test_fixture_reports_the_budget(trio_timeout):
    assert trio_timeout == 42
    assert trio.current_effective_deadline() - trio.current_time() <= 42
