"""Build an account's delivery target from its configuration."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from popsync.deliver.base import Target, spool_dir
from popsync.errors import ConfigError

if TYPE_CHECKING:
    from popsync.config import Account
    from popsync.deliver.budget import SessionBudget

__all__ = ["open_target"]


def open_target(
    account: Account, state_dir: Path, *, lmtp_budget: SessionBudget | None = None
) -> Target:
    """The target ``account.deliver`` names, with its spool under ``state_dir``.

    ``lmtp_budget`` caps the LMTP sessions of every account of the process together (see
    `popsync.deliver.budget`); None lets the account open all its ``lmtp_sessions``.
    """
    spool = spool_dir(state_dir, account.name)
    if account.deliver == "lmtp":
        from popsync.deliver.lmtp import LmtpTarget

        assert account.lmtp is not None
        assert account.lmtp_recipient is not None
        return LmtpTarget(
            spool,
            address=account.lmtp,
            recipient=account.lmtp_recipient,
            sessions=account.lmtp_sessions,
            timeout=account.timeout,
            budget=lmtp_budget,
        )
    if account.deliver == "mda":
        from popsync.deliver.mda import MdaTarget

        assert account.mda is not None
        return MdaTarget(
            spool,
            argv=account.mda,
            account=account.name,
            user=account.username,
            timeout=account.mda_timeout,
            line_endings=account.line_endings,
        )
    if account.deliver == "mbox":
        from popsync.deliver.mbox import MboxTarget

        assert account.mbox is not None
        return MboxTarget(spool, mbox=account.mbox, file_mode=account.file_mode)
    from popsync.deliver.maildir import MaildirTarget

    path = account.maildir
    assert path is not None
    # A missing parent directory is a config error (a typo), not disk trouble.
    if not path.exists() and not path.parent.is_dir():
        raise ConfigError(
            [
                f"accounts.{account.name}.maildir: parent directory {path.parent} does not "
                "exist (popsync creates only the Maildir itself): create it or fix the path"
            ]
        )
    return MaildirTarget(
        path,
        line_endings=account.line_endings,
        dir_mode=account.maildir_mode,
        file_mode=account.file_mode,
    )
