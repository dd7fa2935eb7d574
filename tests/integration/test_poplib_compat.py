"""popsync.poplib and the standard library's poplib give the same results on one Dovecot.

The deliberate differences (line limit, certificate checks, non-ASCII CAPA, masked debug
output) are tested elsewhere; here stdlib poplib gets an unverified TLS context since it
cannot be given a CA by default, and popsync.poplib gets the harness CA.
"""

from __future__ import annotations

import poplib as std_poplib
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import popsync.poplib as our_poplib
from devtools.dovecot import Dovecot, MailUser
from popsync import net

pytestmark = pytest.mark.dovecot

MESSAGES = [
    b"Subject: one\r\nFrom: a@example.org\r\n\r\nfirst body\r\nsecond line\r\n",
    b"Subject: two\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\nend\r\n",
    b"Subject: three\r\n\r\n" + b"a reasonably long line of text here\r\n" * 40,
    b"Subject: four\r\n\r\n",
]

Result = tuple[str, Any]


def _welcome(welcome: bytes) -> bytes:
    """The greeting without its per-connection APOP timestamp."""
    return re.sub(rb"<[^>]*>", b"<stamp>", welcome)


def _session(module: ModuleType, conn: Any, user: MailUser) -> list[Result]:
    """Run every transaction command once and record each result or error_proto args."""
    results: list[Result] = []

    def rec(name: str, call: Callable[[], object]) -> None:
        try:
            results.append((name, call()))
        except module.error_proto as exc:
            results.append((name + " raised", exc.args))

    rec("welcome", lambda: _welcome(conn.getwelcome()))
    rec("capa", conn.capa)
    rec("user", lambda: conn.user(user.name))
    rec("pass_", lambda: conn.pass_(user.password))
    rec("capa after login", conn.capa)
    rec("stat", conn.stat)
    rec("list", conn.list)
    rec("list 1", lambda: conn.list(1))
    rec("list '2'", lambda: conn.list("2"))
    rec("list 99", lambda: conn.list(99))
    for n in range(1, len(MESSAGES) + 1):
        rec(f"retr {n}", _bind(conn.retr, n))
    rec("retr 99", lambda: conn.retr(99))
    rec("top 1 0", lambda: conn.top(1, 0))
    rec("top 3 2", lambda: conn.top(3, 2))
    rec("top 2 10", lambda: conn.top(2, 10))
    rec("uidl", conn.uidl)
    rec("uidl 2", lambda: conn.uidl(2))
    rec("noop", conn.noop)
    rec("dele 1", lambda: conn.dele(1))
    rec("dele 1 again", lambda: conn.dele(1))
    rec("retr deleted", lambda: conn.retr(1))
    rec("stat after dele", conn.stat)
    rec("rset", conn.rset)
    rec("stat after rset", conn.stat)
    rec("quit", conn.quit)
    return results


def _bind(method: Callable[[int], object], arg: int) -> Callable[[], object]:
    return lambda: method(arg)


@pytest.fixture
def mailbox(dovecot: Dovecot, mail_user: MailUser) -> MailUser:
    """A user whose mailbox holds MESSAGES."""
    dovecot.deliver_many(mail_user, MESSAGES)
    return mail_user


def test_plain_session_matches_stdlib(dovecot: Dovecot, mailbox: MailUser) -> None:
    """Every command over plain POP3 returns what stdlib poplib returns."""
    ours = _session(our_poplib, our_poplib.POP3(dovecot.host, dovecot.pop3_port), mailbox)
    theirs = _session(std_poplib, std_poplib.POP3(dovecot.host, dovecot.pop3_port), mailbox)
    assert ours == theirs
    assert dict(ours)["retr 2"][1][2:5] == [b".starts with a dot", b"..two dots", b"."]
    assert dovecot.messages(mailbox) == MESSAGES  # rset before quit: nothing deleted


def test_pop3_ssl_session_matches_stdlib(
    dovecot: Dovecot, mailbox: MailUser, ca_file: Path
) -> None:
    """POP3_SSL with a verifying context behaves like stdlib's with an unverified one."""
    ours_conn = our_poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=net.default_context(ca_file)
    )
    theirs_conn = std_poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=net.default_context(verify=False)
    )
    ours = _session(our_poplib, ours_conn, mailbox)
    theirs = _session(std_poplib, theirs_conn, mailbox)
    assert ours == theirs


def test_stls_matches_stdlib(dovecot: Dovecot, mailbox: MailUser, ca_file: Path) -> None:
    """stls() returns the same reply, drops STLS from CAPA, and refuses a second time."""
    results = []
    for module, context in (
        (our_poplib, net.default_context(ca_file)),
        (std_poplib, net.default_context(verify=False)),
    ):
        conn = module.POP3(dovecot.host, dovecot.pop3_port)
        resp = conn.stls(context)
        caps = conn.capa()
        with pytest.raises(module.error_proto) as again:
            conn.stls(context)
        results.append((resp, caps, again.value.args, _session(module, conn, mailbox)[2:]))
    assert results[0] == results[1]
    assert "STLS" not in results[0][1]


def test_pop3_ssl_stls_refused_like_stdlib(dovecot: Dovecot, ca_file: Path) -> None:
    """STLS on an implicit-TLS session raises error_proto with poplib's text."""
    conn = our_poplib.POP3_SSL(
        dovecot.host, dovecot.pop3s_port, context=net.default_context(ca_file)
    )
    with pytest.raises(our_poplib.error_proto) as info:
        conn.stls()
    assert info.value.args == ("-ERR TLS session already established",)
    conn.close()


def test_apop_matches_stdlib(dovecot: Dovecot, mailbox: MailUser) -> None:
    """APOP logs in through both modules with the same reply and mailbox."""
    replies = []
    for module in (our_poplib, std_poplib):
        conn = module.POP3(dovecot.host, dovecot.pop3_port)
        replies.append((conn.apop(mailbox.name, mailbox.password), conn.stat(), conn.quit()))
    assert replies[0] == replies[1]


def test_wrong_password_matches_stdlib(dovecot: Dovecot, mail_user: MailUser) -> None:
    """A refused PASS raises error_proto with the same args; ours is also AuthFailed."""
    errors = []
    for module in (our_poplib, std_poplib):
        conn = module.POP3(dovecot.host, dovecot.pop3_port)
        conn.user(mail_user.name)
        with pytest.raises(module.error_proto) as info:
            conn.pass_("wrong")
        errors.append(info.value)
        conn.quit()
    assert errors[0].args == errors[1].args
    assert isinstance(errors[0], our_poplib.AuthFailed)
    assert errors[0].code == "AUTH"


@pytest.mark.parametrize("method", ["utf8", "rpop"])
def test_unsupported_commands_match_stdlib(
    dovecot: Dovecot, mail_user: MailUser, method: str
) -> None:
    """Commands Dovecot lacks (UTF8, RPOP) raise error_proto with the same args."""
    errors = []
    for module in (our_poplib, std_poplib):
        conn = module.POP3(dovecot.host, dovecot.pop3_port)
        call = conn.utf8 if method == "utf8" else lambda c=conn: c.rpop(mail_user.name)
        with pytest.raises(module.error_proto) as info:
            call()
        errors.append(info.value.args)
        conn.quit()
    assert errors[0] == errors[1]


def test_debug_output_matches_stdlib_but_masks_the_password(
    dovecot: Dovecot, mailbox: MailUser, capsys: pytest.CaptureFixture[str]
) -> None:
    """Level 1 prints poplib's *cmd* lines, except that PASS shows *** instead of the secret."""
    outputs = []
    for module in (our_poplib, std_poplib):
        conn = module.POP3(dovecot.host, dovecot.pop3_port)
        conn.set_debuglevel(1)
        conn.user(mailbox.name)
        conn.pass_(mailbox.password)
        conn.stat()
        conn.quit()
        outputs.append(capsys.readouterr().out)
    ours, theirs = outputs
    assert mailbox.password not in ours
    assert f"*cmd* 'PASS {mailbox.password}'" in theirs
    assert ours == theirs.replace(f"PASS {mailbox.password}", "PASS ***")
