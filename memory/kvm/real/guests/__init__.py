"""Test guests for real KVM: 64-bit CPL3 programs (``ab``, ``selftest``),
their image builder and QEMU's RAM check.  Sources: ``*.S`` next to the
assembled ``*.bin`` (rebuild with ``python -m memory.kvm.real.guests.build``)."""

from ._image import (LAYOUT, PROGRAMS, Ctrl, GuestEntry, GuestRAM, HostRAM, Segment, load_guest_image, program_bytes,
                     vcpu_ranges)
from .check import GuestRamCheck, ab_pages_written, check_guests_ram, check_guests_ram_loop

__all__ = [
    "LAYOUT", "PROGRAMS", "Ctrl", "GuestEntry", "GuestRAM", "HostRAM", "Segment", "load_guest_image", "program_bytes", "vcpu_ranges",
    "GuestRamCheck", "ab_pages_written", "check_guests_ram", "check_guests_ram_loop",
]
