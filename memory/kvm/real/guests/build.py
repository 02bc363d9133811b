"""Re-derive the guest programs' bytes from their assembly sources.

Each program ``NAME`` is ``NAME.S`` (GNU as, Intel syntax, including
``layout.inc`` and ``common.inc``) and ``NAME.bin``, the flat image loaded at
``CODE_GPA``.  The ``.bin`` files are committed so that running a guest needs
no toolchain; this script (and ``tests/kvm/test_guests_build.py``) rebuilds
them with ``as`` + ``objcopy -O binary`` and checks they match.

Usage::

    python -m memory.kvm.real.guests.build           # rewrite the .bin files
    python -m memory.kvm.real.guests.build --check   # exit 1 if any differs
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GUESTS_DIR = Path(__file__).resolve().parent
PROGRAMS = ("ab", "selftest", "pages")


def toolchain_available() -> bool:
    return shutil.which("as") is not None and shutil.which("objcopy") is not None


def assemble(program: str) -> bytes:
    """Assemble ``program``.S and return the flat ``.text`` bytes."""
    src = GUESTS_DIR / f"{program}.S"
    if not src.is_file():
        raise FileNotFoundError(src)
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / f"{program}.o"
        out = Path(tmp) / f"{program}.bin"
        subprocess.run(["as", "--64", "-I", str(GUESTS_DIR), "-o", str(obj), str(src)], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(obj), str(out)], check=True, capture_output=True)
        return out.read_bytes()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    status = 0
    for program in PROGRAMS:
        data = assemble(program)
        path = GUESTS_DIR / f"{program}.bin"
        if check:
            same = path.is_file() and path.read_bytes() == data
            print(f"{program}: {'ok' if same else 'DIFFERS'} ({len(data)} bytes)")
            status |= 0 if same else 1
        else:
            path.write_bytes(data)
            print(f"{program}: wrote {len(data)} bytes to {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
