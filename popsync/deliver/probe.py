"""Probes of a delivery target, for ``popsync check-config`` and ``popsync test``.

Without connecting (every ``check-config``): an MDA's command exists and is executable by
the user running the check; an mbox's directory is writable (the dotlock ``<mbox>.lock`` is
created there) and the mbox itself, if it exists, is a writable file. They read the raw
account keys, so they run even when another key of the account is invalid.

Connecting (``check-config --connect`` and ``popsync test``, like the POP3 probe): the LMTP
server greets 220, answers LHLO with 250, and accepts ``RCPT TO:<lmtp_recipient>`` after a
``MAIL FROM:<>`` (then RSET and QUIT: nothing is delivered).

Each problem is one line starting with the key it is about; the server's replies in it
are sanitized and bounded (`popsync.deliver.lmtp.Reply`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from popsync.errors import ConfigError, PopsyncError

if TYPE_CHECKING:
    from popsync.config import Account

__all__ = ["probe_lmtp", "static_problems"]


def static_problems(name: str, keys: Mapping[str, Any]) -> list[str]:
    """What keeps the account's MDA or mbox from working, one line per problem."""
    deliver = keys.get("deliver", "maildir")
    if deliver == "mda":
        argv = keys.get("mda")
        if isinstance(argv, list) and argv and isinstance(argv[0], str):
            problem = _command_problem(argv[0])
            if problem:
                return [f"accounts.{name}.mda: {problem}"]
    if deliver == "mbox":
        mbox = keys.get("mbox")
        if isinstance(mbox, str) and mbox.strip() and "\0" not in mbox:
            path = Path(os.path.expanduser(mbox))
            problem = _mbox_problem(path) if path.is_absolute() else None
            if problem:
                return [f"accounts.{name}.mbox: {problem}"]
    return []


def _command_problem(command: str) -> str | None:
    if not os.path.isabs(command):
        return None  # the config parser says so
    if not os.path.exists(command):
        return f"the command {command} does not exist"
    if os.path.isdir(command) or not os.access(command, os.X_OK):
        return f"the command {command} is not executable by {_user()}"
    return None


def _mbox_problem(path: Path) -> str | None:
    parent = path.parent
    if not parent.is_dir():
        return f"directory {parent} does not exist (popsync creates only the mbox file)"
    if not os.access(parent, os.W_OK | os.X_OK):
        lock = f"{path.name}.lock"
        return f"directory {parent} is not writable by {_user()} (the dotlock {lock} goes there)"
    if path.exists() and (not path.is_file() or not os.access(path, os.R_OK | os.W_OK)):
        return f"{path} is not a file {_user()} can read and write"
    return None


def probe_lmtp(account: Account) -> str:
    """Greeting, LHLO and the recipient; a line for the user, or `ConfigError` naming the key."""
    from popsync.deliver.lmtp import LmtpSession

    assert account.lmtp is not None
    assert account.lmtp_recipient is not None
    key = f"accounts.{account.name}.lmtp"
    try:
        session = LmtpSession.open(account.lmtp, timeout=min(account.timeout, 30.0))
    except (PopsyncError, ValueError) as exc:
        raise ConfigError([f"{key}: {_reason(exc)}"]) from None
    try:
        session.send(b"MAIL FROM:<>\r\n")
        mail = session.reply()
        session.send(f"RCPT TO:<{account.lmtp_recipient}>\r\n".encode())
        rcpt = session.reply()
        session.send(b"RSET\r\n")
        session.reply()
    except PopsyncError as exc:
        raise ConfigError([f"{key}: {_reason(exc)}"]) from None
    finally:
        session.close()
    if mail.code != 250:
        raise ConfigError([f"{key}: the server refused MAIL FROM:<>: {mail.text}"])
    if rcpt.code != 250:
        raise ConfigError(
            [f"accounts.{account.name}.lmtp_recipient: the LMTP server refused it: {rcpt.text}"]
        )
    extensions = " ".join(sorted(session.extensions)) or "none"
    return f"220, LHLO ok (extensions: {extensions}), recipient accepted"


def _reason(exc: BaseException) -> str:
    from popsync.deliver.base import sanitize

    return sanitize(str(exc))


def _user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
