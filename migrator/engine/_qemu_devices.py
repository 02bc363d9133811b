"""The device sections of a stock ``qemu-system-x86_64 -M none``, for our VM.

Which device sections a stream carries (decided here, documented in the
README):

* ``x-ram-only``: none (RAM only).
* a VM that was itself loaded from a QEMU stream (it holds QEMU device
  state), or the ``x-qemu-devices`` capability: the sections a ``-M none``
  QEMU expects -- ``timer``, ``slirp`` when the source QEMU had a ``-netdev
  user`` (carried unchanged), ``globalstate`` (our run state) -- and *not*
  our ``migrator-vcpus`` section, which QEMU refuses.  A stock QEMU
  destination started like the source loads the whole stream.
* otherwise (ours -> ours): ``migrator-vcpus`` (vCPU/workload state and the
  run state).

The ``timer`` section's two offsets are the guest's virtual clock and tick
count at the stop (QEMU: ``cpu_disable_ticks``).  Carried from a QEMU source
they continue from its values plus the time the VM ran here (ns for both:
our vCPUs have no TSC to read); for a VM of ours they start at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from transport import VMStateSection
from transport._vmstate import decode_globalstate, decode_timer, encode_globalstate, encode_timer

from ..errors import MigrationError

__all__ = ["QemuDeviceState"]


@dataclass
class QemuDeviceState:
    """QEMU device state held by a VM: timer offsets, slirp bytes, run state."""

    cpu_ticks_offset: int = 0
    cpu_clock_offset: int = 0
    timer_payload: bytes | None = None  # as received (keeps an icount subsection)
    slirp: bytes | None = None
    runstate: str | None = None  # from globalstate; None = not received

    @classmethod
    def from_sections(cls, sections: list[VMStateSection]) -> QemuDeviceState:
        st = cls()
        for sec in sections:
            try:
                if sec.idstr == "timer":
                    st.cpu_ticks_offset, st.cpu_clock_offset = decode_timer(sec.data)
                    st.timer_payload = sec.data
                elif sec.idstr == "globalstate":
                    st.runstate = decode_globalstate(sec.data)
                elif sec.idstr == "slirp":
                    st.slirp = sec.data
                else:  # pragma: no cover - the decoder only yields known sections
                    raise MigrationError(f"Unknown savevm section or instance '{sec.idstr}' {sec.instance_id}")
            except ValueError as exc:
                raise MigrationError(f"error while loading state for instance 0x0 of device '{sec.idstr}': "
                                     f"{exc}") from None
        return st

    def sections(self, *, ran_ns: int, runstate: str) -> list[tuple[str, bytes]]:
        """``(idstr, payload)`` in QEMU's order: timer, [slirp], globalstate."""
        if self.timer_payload is not None and ran_ns == 0:
            timer = self.timer_payload  # unchanged, subsections included
        else:
            timer = encode_timer(self.cpu_ticks_offset + ran_ns, self.cpu_clock_offset + ran_ns)
        out = [("timer", timer)]
        if self.slirp is not None:
            out.append(("slirp", self.slirp))
        out.append(("globalstate", encode_globalstate(runstate)))
        return out
