"""The MDA target: run a delivery command (procmail, maildrop, dovecot-lda) per message.

Guarantee: **at-least-once, with one named window.** The message is streamed into the
spool and fsynced, recorded pending, then the command runs with the spool file as its
stdin (the file itself, so nothing passes through popsync's memory), then the message is
marked delivered and its spool file removed. A crash after the command exited 0 and
before the batch's delivered commit is the only way to deliver it twice (the next run
runs the command again for the pending spool file).

The message reaches the command with the account's ``line_endings`` (LF by default, as
Unix MDAs expect; ``"crlf"`` passes the wire form). The command is an argv list, run
without a shell. ``{account}``, ``{user}`` and
``{uidl_hex}`` in an argument are replaced (``{{``/``}}`` give literal braces). Exit 0
is delivered; 75 (EX_TEMPFAIL) is temporary: the message stays pending and the run ends
75; any other status (or a signal) is an error: the message stays pending, the run ends
74 and the log shows the exit status and the end of the command's stderr (trimmed,
sanitized). A command running past ``mda_timeout`` is killed and counts as temporary.
Nothing an MDA says is ever taken as a permanent refusal: a broken procmail recipe must
not drop mail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from popsync.deliver.base import Delivered, Outcome, Spooled, SpoolTarget, Temporary, sanitize
from popsync.errors import describe_exit
from popsync.maildir import LineEndings

__all__ = ["EX_TEMPFAIL", "MdaTarget", "expand_argv"]

EX_TEMPFAIL = 75
#: Bytes of stderr kept for the log (the end of it: that is where errors are).
STDERR_KEPT = 4096


def _failed(reason: str) -> Temporary:
    """The command failed (not EX_TEMPFAIL): the message stays pending, the run ends 74."""
    return Temporary(reason, failed=True)


def expand_argv(argv: Sequence[str], *, account: str, user: str, uidl: bytes) -> list[str]:
    """Fill the placeholders in each argument (``str.format`` with three names)."""
    values = {"account": account, "user": user, "uidl_hex": uidl.hex()}
    return [arg.format_map(values) for arg in argv]


class MdaTarget(SpoolTarget):
    """Deliver by running a command per message; see the module docstring."""

    kind = "mda"

    def __init__(
        self,
        spool_path: Path,
        *,
        argv: Sequence[str],
        account: str,
        user: str,
        timeout: float = 300.0,
        line_endings: LineEndings = "lf",
    ) -> None:
        super().__init__(spool_path, line_endings)
        self.argv = list(argv)
        self.account = account
        self.user = user
        self.timeout = timeout

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for item in items:
            outcome = self._run(item)
            outcomes.append(outcome)
            if not isinstance(outcome, Delivered):
                # The MDA is broken or busy: do not hammer it with the rest of the batch.
                outcomes += [outcome] * (len(items) - len(outcomes))
                break
        return outcomes

    def _run(self, item: Spooled) -> Outcome:
        argv = expand_argv(self.argv, account=self.account, user=self.user, uidl=item.uidl)
        with (
            self.path(item.name).open("rb") as stdin,
            tempfile.TemporaryFile() as stderr,
        ):
            try:
                proc = subprocess.Popen(  # noqa: S603 - an argv list from the config, no shell
                    argv,
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    close_fds=True,
                    start_new_session=True,  # a timeout kills the command and its children
                )
            except OSError as exc:
                return _failed(f"MDA {argv[0]} cannot run: {exc.strerror or exc}")
            try:
                status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return Temporary(f"MDA {argv[0]} timed out after {self.timeout:g}s")
            if status == 0:
                return Delivered(f"mda:{item.uidl.hex()[:64]}")
            size = stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, size - STDERR_KEPT))
            said = sanitize(stderr.read(), 500, tail=True)
        detail = f"MDA {argv[0]} {describe_exit(status)}" + (f": {said}" if said else "")
        return Temporary(detail) if status == EX_TEMPFAIL else _failed(detail)
