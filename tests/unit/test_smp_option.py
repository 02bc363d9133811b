"""``--smp``: parsed in migrator/engine/_machine.py, QEMU's spelling, clear errors."""

from __future__ import annotations

import pytest

from migrator.cli._cli import build_parser
from migrator.engine._machine import SMP_MAX, parse_smp


@pytest.mark.parametrize("text,n", [("1", 1), ("2", 2), ("cpus=4", 4), (" 3 ", 3), (str(SMP_MAX), SMP_MAX)])
def test_parse_smp(text, n):
    assert parse_smp(text) == n


@pytest.mark.parametrize("text", ["0", "-1", "two", "", "2.0", "cpus=", str(SMP_MAX + 1), "sockets=2"])
def test_parse_smp_rejects(text):
    with pytest.raises(ValueError, match="smp"):
        parse_smp(text)


def test_cli_default_and_error(capsys):
    p = build_parser()
    assert p.parse_args(["run", "--qmp", "unix:/x"]).smp == 1
    assert p.parse_args(["run", "--qmp", "unix:/x", "--smp", "2"]).smp == 2
    with pytest.raises(SystemExit):
        p.parse_args(["run", "--qmp", "unix:/x", "--smp", "0"])
    assert "vCPU count must be between 1 and" in capsys.readouterr().err


def test_machine_takes_one_vcpu_count():
    from migrator.engine._machine import AccelConfig, Machine

    with pytest.raises(ValueError, match="disagree"):
        Machine(memory_bytes=4 << 20, accel=AccelConfig(kind="sim", smp=3), smp=2)
