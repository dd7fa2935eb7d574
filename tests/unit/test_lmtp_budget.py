"""The process-wide LMTP session budget: its counting, and who hands it to every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from popsync import sync as sync_module
from popsync.config import Account, load_config
from popsync.daemon import Daemon
from popsync.deliver.budget import SessionBudget
from popsync.notify import Notifier
from popsync.seen import SeenStore
from popsync.sync import RunResult

__all__: list[str] = []


def test_first_sessions_are_always_counted_others_only_below_the_limit() -> None:
    """Per address: take(first=False) stops at the limit, take(first=True) never does."""
    budget = SessionBudget(2)
    assert budget.take("unix:/a", first=True)
    assert budget.take("unix:/a", first=False)
    assert not budget.take("unix:/a", first=False)
    assert budget.take("unix:/b", first=False)  # another server has its own count
    assert budget.take("unix:/a", first=True)  # an account's only session is never refused
    assert (budget.in_use("unix:/a"), budget.in_use("unix:/b")) == (3, 1)
    budget.give_back("unix:/a")
    budget.give_back("unix:/a")
    assert budget.take("unix:/a", first=False)
    budget.limit = 1  # a reload that lowers the limit stops new sessions, keeps open ones
    assert not budget.take("unix:/a", first=False)
    assert budget.in_use("unix:/a") == 2


def _config_text(state: Path, limit: int) -> str:
    account = (
        'host = "127.0.0.1"\nport = 1\ntls = "none"\nallow_plaintext = true\nauth = "apop"\n'
        'password_env = "P"\ndeliver = "lmtp"\nlmtp = "unix:/run/lmtp"\n'
        'lmtp_recipient = "u@example.org"\n'
    )
    return (
        f'state_dir = "{state}"\nlmtp_max_sessions = {limit}\n\n'
        f'[accounts.a]\nusername = "a"\n{account}\n[accounts.b]\nusername = "b"\n{account}'
    )


def test_the_daemon_hands_one_budget_to_every_run_and_a_reload_resizes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both accounts' runs get the daemon's budget (limit from the config); SIGHUP's reload
    changes the limit without a restart."""
    path = tmp_path / "c.toml"
    path.write_text(_config_text(tmp_path / "state", 3))
    path.chmod(0o600)
    config = load_config(path)
    budgets: list[Any] = []

    def spy(account: Account, store: Any, **kwargs: Any) -> RunResult:
        budgets.append(kwargs["lmtp_budget"])
        return RunResult(account=account.name)

    monkeypatch.setattr(sync_module, "sync_account", spy)
    with SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store:
        daemon = Daemon(path, config, store, notifier=Notifier(None))
        try:
            for name in ("a", "b"):
                assert daemon._run_account(config.accounts[name]).account == name
            assert budgets == [daemon.lmtp_budget] * 2
            assert daemon.lmtp_budget.limit == 3
            path.write_text(_config_text(tmp_path / "state", 5))
            daemon.reload()
            assert daemon.reload_failure is None
            assert daemon.lmtp_budget.limit == 5
        finally:
            daemon.close()
