"""QEMU's size syntax (qemu_strtosz): one parse_size, its default unit chosen by the caller."""

from __future__ import annotations

import pytest

from migrator.engine import parse_size


@pytest.mark.parametrize("text, default, expected", [
    ("4096", "B", 4096),                 # qemu_strtosz: a bare number is bytes (QMP sizes)
    ("4096", "M", 4096 << 20),           # qemu_strtosz_MiB: -m 4096 is 4 GiB
    ("4096B", "M", 4096),                # an explicit B wins over the default
    ("1k", "B", 1024),                   # case-insensitive, binary
    ("256M", "B", 256 << 20),
    ("1.5G", "B", 3 << 29),
    ("0.5K", "B", 512),
    ("1.5", "M", 3 << 19),               # a fraction with a multiplier above bytes
    ("  2M", "B", 2 << 20),              # leading whitespace is skipped, as strtod does
    ("1P", "B", 1 << 50),
    ("15E", "B", 15 << 60),
])
def test_rules(text: str, default: str, expected: int) -> None:
    assert parse_size(text, default_suffix=default) == expected


@pytest.mark.parametrize("text, why", [
    ("256MiB", "suffix"), ("1 G", "suffix"), ("2M ", "suffix"), ("", "suffix"), ("M", "suffix"),
    ("0x10", "suffix"), ("1e3", "suffix"), ("1.5", "fraction of a byte"), ("0.5B", "fraction of a byte"),
    ("-1M", "negative"), ("16E", "too large"), ("12Q", "unknown suffix"),
])
def test_bad_input_is_a_clear_error(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_size(text)


def test_bad_default_suffix() -> None:
    with pytest.raises(ValueError, match="default_suffix"):
        parse_size("1", default_suffix="X")


def test_cli_memory_is_qemu_dash_m() -> None:
    from migrator.cli import build_parser

    args = build_parser().parse_args(["run", "--memory", "64", "--qmp", "unix:/tmp/x.sock"])
    assert args.memory == 64 << 20
