"""Log in and read the listing while the rest of popsync is still being imported.

A nothing-new ``popsync --once`` is mostly start-up: ~0.2 s of imports (structlog, the sync
engine, the delivery targets) against ~0.06 s in which the server logs us in and sends its
UIDL and LIST. `PreLogin` starts that server work first: the CLI opens the store, starts one
`PreLogin` per account it will run at once, waits until each is on the wire, and only then
imports the engine, so the imports run while the server answers (the GIL is free while a
thread waits on a socket).

The order of a run is unchanged where it matters: the account's lock is taken before the
server is contacted (a second popsync never logs in beside a running one: with a server's
session lock it would make the running one fail), the secret is resolved with the lock held
(OAuth2 accounts are not started early: a token refresh logs), and
`popsync.sync.sync_account` takes over the lock, the secret, the session and the listing as if
it had made them itself: each failure is re-raised at the point of the run where it would
have happened, so outcomes and exit codes do not change. Only the Maildir and recovery checks
now follow the login instead of preceding it; a run that fails them closes the session
without a command, which commits nothing on the server.

This module is imported before structlog: it must not log, and imports only what a login needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from popsync.client import Pop3Client
    from popsync.config import Account
    from popsync.net import Pace
    from popsync.plan import Policy
    from popsync.pop3 import ScanEntries, UidlEntries
    from popsync.store import Store

__all__ = [
    "PreLogin",
    "hide_secret",
    "pace",
    "policy_of",
    "read_listing",
    "resolve_secret",
    "starts_early",
]

#: How long the CLI waits for a `PreLogin` to reach the server before importing anyway.
ON_THE_WIRE_PATIENCE = 2.0


def pace(account: Account, phase: str, budget: float | None = None, key: str = "") -> Pace:
    """The limits of one phase of a run: an optional budget, and the minimum rate."""
    from popsync.net import Pace

    limit, period = account.low_speed_limit, account.low_speed_time
    if budget is None:
        return Pace(phase, low_speed_limit=limit, low_speed_time=period)
    return Pace.budget(phase, budget, key, low_speed_limit=limit, low_speed_time=period)


def resolve_secret(account: Account, state_dir: Path) -> str:
    """The password, or with oauth2_provider a valid access token (refreshed if need be).

    Called with the account's lock held, so one process at a time refreshes its token.
    """
    if account.oauth2_provider is not None:
        from popsync.oauth2 import access_token

        return access_token(account, state_dir)
    from popsync.secrets import resolve_secret as resolve

    return resolve(account)


def hide_secret(account: Account, secret: str) -> None:
    """Scrub ``secret``, in every form it is sent, from server text in the current scope."""
    from popsync.pop3.sasl import credential_forms
    from popsync.textsafe import add_secrets

    add_secrets(credential_forms(account.username, secret, host=account.host, port=account.port))


#: Salts the listing digest with its own format: a change here makes every stored one stale.
_DIGEST_VERSION = b"popsync-listing-1\0"


def policy_of(account: Account) -> Policy:
    """The planner's rules for ``account``."""
    from popsync.plan import Policy

    return Policy(
        delete=account.delete,
        delete_after_days=account.delete_after_days,
        max_message_size=account.max_message_size or None,
        allow_uidl_reset=account.allow_uidl_reset,
        forget_after=account.forget_after,
    )


def read_listing(
    client: Pop3Client, account: Account, settled: bytes | None
) -> tuple[UidlEntries, ScanEntries | None, bytes]:
    """UIDL and LIST, and the UIDL listing's digest (`popsync.listing.uidl_digest`).

    With ``settled`` (the digest the last complete run left, see `popsync.plan.settled`)
    UIDL is asked alone, and LIST only when the digest differs: a nothing-new run then
    skips LIST (the server's work and ours); a run after new mail pays one round trip more.
    LIST is None exactly when the digest equals ``settled``.
    """
    from popsync.listing import uidl_digest

    if settled is None:
        uidl, scan = client.listing_entries()  # one round trip with CAPA
        return uidl, scan, uidl_digest(uidl, _salt(account))
    uidl = client.uidl_entries()
    digest = uidl_digest(uidl, _salt(account))
    return uidl, None if digest == settled else client.scan_entries(), digest


def _salt(account: Account) -> bytes:
    return _DIGEST_VERSION + repr(policy_of(account)).encode()


def starts_early(account: Account) -> bool:
    """Whether `PreLogin` may run ``account`` (not OAuth2: a token refresh logs)."""
    return account.oauth2_provider is None


class _Step:
    """A result or the exception that replaced it, re-raised where the run asks for it."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.value: object = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def get(self) -> object:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


class PreLogin:
    """Lock, secret, login and listing of one account, in a thread of its own.

    `popsync.sync.sync_account` calls `held_lock`, `secret`, `client` and `entries` in its
    run's order; each waits for its step and returns its result or raises its exception.
    `discard` closes whatever was not taken over (always call it).
    """

    def __init__(self, account: Account, store: Store) -> None:
        self.account = account
        self._store = store
        self._lock: AbstractContextManager[None] | None = None
        self._steps = {name: _Step() for name in ("lock", "secret", "client", "entries")}
        self._client: Pop3Client | None = None
        self.on_the_wire = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"popsync-prelogin-{account.name}", daemon=True
        )
        self._thread.start()

    # -------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            self._go()
        finally:
            self.on_the_wire.set()
            for step in self._steps.values():  # steps after a failure never run
                step.done.set()

    def _go(self) -> None:
        account = self.account
        lock = self._store.lock(account.mailbox, account.name)
        if not self._step("lock", lock.__enter__):
            return
        self._lock = lock
        if not self._step("secret", lambda: resolve_secret(account, self._store.state_dir)):
            return
        if self._step("client", lambda: self._login(str(self._steps["secret"].value))):
            self._step("entries", self._listing)

    def _step(self, name: str, action: Callable[[], object]) -> bool:
        """Run one step; False (and the exception kept) when it failed."""
        step = self._steps[name]
        try:
            step.value = action()
        except BaseException as exc:  # re-raised in the run's own thread
            step.error = exc
            return False
        finally:
            step.done.set()
        return True

    def _login(self, secret: str) -> Pop3Client:
        from popsync.session import open_session

        hide_secret(self.account, secret)  # this thread's own scope: nothing it keeps shows it
        self.on_the_wire.set()  # connecting: the server's time starts now
        self._client = open_session(self.account, secret)
        return self._client

    def _listing(self) -> tuple[UidlEntries, ScanEntries | None, bytes]:
        account = self.account
        client = cast("Pop3Client", self._steps["client"].value)  # the login step succeeded
        client.set_pace(pace(account, "listing", account.listing_timeout, "listing_timeout"))
        return read_listing(client, account, self._store.listing_digest(account.mailbox))

    # ---------------------------------------------------------- taken over by the run
    def _result(self, name: str) -> object:
        """Wait for one step only: the run checks its Maildir while the server lists."""
        return self._steps[name].get()

    @contextmanager
    def held_lock(self) -> Iterator[None]:
        """The account's lock, already held (raises as `Store.lock` would have); its block's
        end is `discard`, which gives it back."""
        self._result("lock")
        try:
            yield
        finally:
            self.discard()

    def secret(self) -> str:
        """The resolved secret (raises as `resolve_secret` would have)."""
        return str(self._result("secret"))

    def client(self) -> Pop3Client:
        """The logged-in session, now the caller's to close (raises as the login would have)."""
        client = cast("Pop3Client", self._result("client"))
        self._client = None
        return client

    def entries(self) -> tuple[UidlEntries, ScanEntries | None, bytes]:
        """The listing as `read_listing` returned it."""
        return cast("tuple[UidlEntries, ScanEntries | None, bytes]", self._result("entries"))

    def discard(self) -> None:
        """End it all: wait for the thread, close a session nobody took over, give back the
        lock (`held_lock`'s exit; idempotent). The lock goes last, so no other popsync logs
        in while this thread may still be talking to the server.
        """
        self._thread.join()
        client, self._client = self._client, None
        if client is not None:
            client.close()
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.__exit__(None, None, None)
