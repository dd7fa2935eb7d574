"""popsync.poplib and the standard library's poplib give the same results on one Dovecot.

The deliberate differences (line limit, certificate checks, non-ASCII CAPA, masked debug
output) are tested elsewhere; here stdlib poplib gets an unverified TLS context since it
cannot be given a CA by default, and popsync.poplib gets the harness CA.
"""

from __future__ import annotations

import base64
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
from tests.poplib_side_by_side import Call, run_calls
from tests.wire_tap import WireTap

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
        except OSError as exc:  # e.g. the server hung up: must happen to both alike
            results.append((name + " raised " + type(exc).__name__, exc.args))

    rec("welcome", lambda: _welcome(conn.getwelcome()))
    rec("attributes", lambda: (type(conn.sock).__name__, type(conn.file), conn._debugging))
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
    rec("dele 'foo'", lambda: conn.dele("foo"))
    rec("retr 'foo'", lambda: conn.retr("foo"))
    rec("top 'x' 'y'", lambda: conn.top("x", "y"))
    rec("_shortcmd", lambda: conn._shortcmd("NOOP"))
    rec("_longcmd", lambda: conn._longcmd("UIDL"))
    rec("_putcmd", lambda: conn._putcmd("STAT"))
    rec("_getresp", conn._getresp)
    rec("_putline", lambda: conn._putline(b"LIST"))
    rec("_getlongresp", conn._getlongresp)
    rec("_shortcmd unknown", lambda: conn._shortcmd("XTND XLIST Subject"))
    rec("dele 1", lambda: conn.dele(1))
    rec("dele 1 again", lambda: conn.dele(1))
    rec("retr deleted", lambda: conn.retr(1))
    rec("stat after dele", conn.stat)
    rec("rset", conn.rset)
    rec("stat after rset", conn.stat)
    rec("quit", conn.quit)
    rec("after quit", lambda: (conn.sock, conn.file))
    return results


def _bind(method: Callable[[int], object], arg: int) -> Callable[[], object]:
    return lambda: method(arg)


@pytest.fixture
def mailbox(dovecot: Dovecot, mail_user: MailUser) -> MailUser:
    """A user whose mailbox holds MESSAGES."""
    dovecot.deliver_many(mail_user, MESSAGES)
    return mail_user


def test_plain_session_matches_stdlib(dovecot: Dovecot, mailbox: MailUser) -> None:
    """Every method and internal returns what stdlib poplib returns and sends the same bytes."""
    with WireTap(dovecot.host, dovecot.pop3_port) as tap:
        ours = _session(our_poplib, our_poplib.POP3(tap.host, tap.port), mailbox)
        theirs = _session(std_poplib, std_poplib.POP3(tap.host, tap.port), mailbox)
    assert ours == theirs
    assert len(tap.sent) == 2
    assert tap.sent[0] == tap.sent[1]
    assert b"DELE foo\r\nRETR foo\r\nTOP x y\r\n" in tap.sent[0]
    results = dict(ours)
    assert results["retr 2"][1][2:5] == [b".starts with a dot", b"..two dots", b"."]
    assert results["after quit"] == (None, None)
    assert dovecot.messages(mailbox) == MESSAGES  # rset before quit: nothing deleted


def test_commands_before_login_match_stdlib(dovecot: Dovecot) -> None:
    """Both send STAT/LIST/UIDL/TOP before login and get Dovecot's refusals alike."""
    outcomes = []
    with WireTap(dovecot.host, dovecot.pop3_port) as tap:
        for module in (our_poplib, std_poplib):
            conn = module.POP3(tap.host, tap.port)
            calls: list[Call] = [
                ("stat", lambda c: c.stat()),
                ("list", lambda c: c.list()),
                ("uidl", lambda c: c.uidl(1)),
                ("top", lambda c: c.top(1, 0)),  # the fourth bad command: Dovecot hangs up
            ]
            outcomes.append(run_calls(module, conn, calls))
            conn.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == ("stat", "error_proto", (b"-ERR Unknown command.",))
    assert tap.sent[0] == tap.sent[1] == b"STAT\r\nLIST\r\nUIDL 1\r\nTOP 1 0\r\n"


def test_custom_auth_through_internals_matches_stdlib(dovecot: Dovecot, mailbox: MailUser) -> None:
    """AUTH PLAIN written with _putline/_getresp logs in through both modules alike."""
    initial = base64.b64encode(f"\0{mailbox.name}\0{mailbox.password}".encode())
    results = []
    with WireTap(dovecot.host, dovecot.pop3_port) as tap:
        for module in (our_poplib, std_poplib):
            conn = module.POP3(tap.host, tap.port)
            conn._putline(b"AUTH PLAIN")
            challenge = conn._getresp()
            conn._putline(initial)
            results.append((challenge, conn._getresp(), conn.stat(), conn.quit()))
    assert results[0] == results[1]
    assert results[0][0] == b"+ "
    assert results[0][2] == (len(MESSAGES), sum(map(len, MESSAGES)))
    assert tap.sent[0] == tap.sent[1]


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
