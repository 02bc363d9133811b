"""Real-KVM tests: every test that touches /dev/kvm uses ``require_kvm``,
which skips with the reason from ``kvm_usable()``."""

from __future__ import annotations

import pytest

from memory.kvm.real import kvm_usable


@pytest.fixture
def require_kvm():
    ok, reason = kvm_usable()
    if not ok:
        pytest.skip(f"real KVM unusable here: {reason}")
