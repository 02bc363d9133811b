"""Ownership: who owns the guest at the end of a migration, and the rule that decides it.

Who owns the guest
==================

Rule: **at most one side runs the guest at any moment.**  There are states
in which *neither* may run it: the source in ``postmigrate`` (it committed
to never run the guest again, or it cannot know whether the destination
runs it), and a destination that loaded the guest but was not told it owns
it.  Zero running copies happens only when the outcome is truly unknown;
then the operator decides, with ``cont`` on exactly one side.

The source has one explicit point of no return, and the destination never
runs before the source has passed it:

* **With ``x-handover``** (set on both sides, as QEMU users set
  ``return-path``): the destination validates everything through EOF, loads
  the state, sends ``MIG_RP_MSG_X_LOADED(stream bytes)`` and waits, paused.
  The source, on LOADED (whose byte count must equal what it sent),
  **commits first** (``committed``: COMPLETED, ``postmigrate``) and only
  then sends ``GO``; the destination, on GO, resumes (if autostart and the
  source was running) and sends SHUT(0).  Before GO is on the wire, any
  failure, timeout, cancel, negative or garbled acknowledgement or loss lets
  the source resume, and it tells a waiting destination ``NOGO`` when it
  still can; the destination cannot run without GO.  After GO is on the
  wire the source never resumes by itself, whatever happens next (cancel is
  a no-op then).  A destination whose GO never comes (closed, timed out,
  half a GO, a GO for another byte count) stays paused, FAILED with an
  error-desc saying so; its state is complete, so ``cont`` there starts it:
  the operator's decision, after checking that the source is not running.
  This "GO sent, fate unknown" is the only zero-copies outcome.
  The source says it hands over in its device section's run-state header
  (``"handover": true``): a destination *without* the capability would run
  at EOF and only then send SHUT(0), which a hand-over source that times
  out never waits for (it resumes), so such a destination refuses the
  stream (SHUT(1)) and never runs.
* **Without it** (a peer that speaks QEMU's return path only): the
  destination may run as soon as it has the whole stream (QEMU's
  ``process_incoming_migration_bh`` starts the guest, then
  ``migration_incoming_state_destroy`` sends SHUT), so the point of no
  return is the moment the EOF byte was handed to the socket
  (``dest_may_run``).  A send that failed before it proves the destination
  cannot have the stream: resume.  After it: SHUT(0) -> COMPLETED,
  ``postmigrate``; SHUT(non-zero) -> the destination said it will not run
  -> FAILED, resume; no acknowledgement (closed, reset, garbled, or later
  than ``x-return-path-timeout``) or a cancel -> the outcome is unknown:
  FAILED, the guest stays paused in ``postmigrate`` and error-desc says the
  operator must decide.  Never a silent resume.
* **No return path** (``file:``, or ``x-ram-only`` / ``x-qemu-devices`` to a
  stock QEMU, which opens none by default; the session's
  :func:`transport.decide_return_path` decides): COMPLETED and
  ``postmigrate`` once EOF is written, as QEMU.

QEMU 7.2 for comparison (migration/migration.c): ``migration_completion``
joins the return-path thread in ``await_return_path_close_on_source``
without any timeout (a late SHUT is simply waited for); a return path that
errors or closes before SHUT (``mark_source_rp_bad``) fails the migration
and ``migration_iteration_finish`` then calls ``vm_start()`` on the source
although the destination may already run the guest: that is the unsafe case
this engine refuses.  Without the ``return-path`` capability QEMU ends in
``postmigrate`` after EOF, which is what we do without a return path.  Our
timeouts are migration parameters (``x-return-path-timeout``, ms, both
sides); expiry decides as above and never resumes a guest the peer may run.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from transport import ReturnPath

__all__ = ["Fate", "Ownership"]


class Fate(enum.Enum):
    """What the source does when its migration task ends."""

    DESTINATION = "destination"  #: committed: COMPLETED, ``postmigrate``; nothing changes that
    UNKNOWN = "unknown"  #: the destination may run it: FAILED, stays paused, the operator decides
    SOURCE = "source"  #: the destination cannot run it: CANCELLED or FAILED, the source resumes


@dataclass
class Ownership:
    """The source's record of who may run the guest (see the essay)."""

    committed: bool = False  #: the destination owns the guest; we never run it again
    dest_may_run: bool = False  #: the destination may run it (without our word)
    note: str = ""  #: query-migrate's ``x-handover`` ("destination confirmed", ...)

    def eof_due(self, return_path: ReturnPath) -> None:
        """The EOF byte is about to be handed to the channel.

        Without our hand-over a destination that has the whole stream may
        run: from now on the source can no longer know the guest is its own.
        """
        if return_path is not ReturnPath.HANDOVER:
            self.dest_may_run = True

    def eof_sent(self, return_path: ReturnPath) -> None:
        """EOF is written; without a return path that is QEMU's ``postmigrate``."""
        if return_path is ReturnPath.NONE:
            self.committed = True

    def fate(self) -> Fate:
        if self.committed:
            return Fate.DESTINATION
        return Fate.UNKNOWN if self.dest_may_run else Fate.SOURCE
