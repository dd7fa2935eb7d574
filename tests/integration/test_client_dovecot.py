"""Pop3Client against a real Dovecot: TLS modes, every login method, pipelining, the corpus."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import pytest

from devtools.dovecot import Dovecot, MailUser
from popsync import net
from popsync.client import PlaintextRefused, Pop3Client
from popsync.errors import CertificateError
from popsync.pop3 import AuthFailed, ServerError, State
from tests.corpus import CORPUS, served

pytestmark = pytest.mark.dovecot


def _plain(dovecot: Dovecot) -> Pop3Client:
    return Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="none", timeout=10)


def _stls(dovecot: Dovecot, ca_file: Path) -> Pop3Client:
    return Pop3Client.connect(
        dovecot.host,
        dovecot.pop3_port,
        tls="starttls",
        context=net.default_context(ca_file),
        timeout=10,
    )


def _implicit(dovecot: Dovecot, ca_file: Path) -> Pop3Client:
    return Pop3Client.connect(
        dovecot.host,
        dovecot.pop3s_port,
        tls="implicit",
        context=net.default_context(ca_file),
        timeout=10,
    )


def _state(client: Pop3Client) -> State:
    """The session state (a call, so mypy does not narrow it across logins)."""
    return client.state


def _body(client: Pop3Client, msgnum: int) -> bytes:
    sink = io.BytesIO()
    size = client.retr_into(msgnum, sink)
    assert size == len(sink.getvalue())
    return sink.getvalue()


def test_plain_login_with_allow_plaintext(dovecot: Dovecot, mail_user: MailUser) -> None:
    """A clear-text session logs in with USER/PASS only when plaintext is allowed."""
    dovecot.deliver(mail_user, b"Subject: a\r\n\r\nhello\r\n")
    with _plain(dovecot) as client:
        assert not client.is_tls
        with pytest.raises(PlaintextRefused):
            client.login(mail_user.name, mail_user.password, mechanism="user")
        assert _state(client) is State.AUTHORIZATION
        client.login(mail_user.name, mail_user.password, mechanism="user", allow_plaintext=True)
        assert _state(client) is State.TRANSACTION
        assert client.stat() == (1, len(b"Subject: a\r\n\r\nhello\r\n"))
        client.quit()


def test_stls_drops_capabilities_and_reasks(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path
) -> None:
    """STLS disappears from CAPA after TLS, USER and SASL after login."""
    with _plain(dovecot) as client:
        before = client.capabilities()
        assert "STLS" in before
        client.stls(net.default_context(ca_file), "127.0.0.1")
        assert client.is_tls
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
        after_tls = client.capabilities()
        assert "STLS" not in after_tls
        assert "USER" in after_tls
        client.login(mail_user.name, mail_user.password)
        after_login = client.capabilities()
        assert "USER" not in after_login
        assert "SASL" not in after_login
        assert "PIPELINING" in after_login
        client.quit()


def test_implicit_tls_with_harness_ca(dovecot: Dovecot, mail_user: MailUser, ca_file: Path) -> None:
    """Implicit TLS verifies the server against the harness CA."""
    with _implicit(dovecot, ca_file) as client:
        assert client.is_tls
        assert client.cipher
        client.login(mail_user.name, mail_user.password)
        assert client.stat() == (0, 0)
        client.quit()


def test_wrong_ca_is_a_certificate_error(dovecot: Dovecot) -> None:
    """A server certificate from an unknown CA fails in connect(), before any login."""
    with pytest.raises(CertificateError, match="certificate verification failed"):
        Pop3Client.connect(dovecot.host, dovecot.pop3s_port, tls="implicit", timeout=10)
    with pytest.raises(CertificateError):
        Pop3Client.connect(dovecot.host, dovecot.pop3_port, tls="starttls", timeout=10)


def test_hostname_mismatch_is_a_certificate_error(dovecot: Dovecot, ca_file: Path) -> None:
    """The certificate names localhost/127.0.0.1, so another name is refused."""
    with pytest.raises(CertificateError, match=r"[Hh]ostname mismatch|IP address mismatch"):
        Pop3Client.connect(
            dovecot.host,
            dovecot.pop3s_port,
            tls="implicit",
            context=net.default_context(ca_file),
            server_hostname="mail.example.org",
            timeout=10,
        )


def _login_method(dovecot: Dovecot, user: MailUser) -> str:
    """The method Dovecot logged for the user's most recent login.

    Dovecot's log process writes the line a moment after the login: wait for it.
    """
    deadline = time.monotonic() + 5
    while True:
        lines = [
            line
            for line in dovecot.log_file.read_text(errors="replace").splitlines()
            if f"user=<{user.name}>" in line and "method=" in line
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert lines, "dovecot logged no login"
    return lines[-1].split("method=", 1)[1].split(",", 1)[0]


@pytest.mark.parametrize(
    ("mechanism", "logged"),
    [
        ("user", "PLAIN"),
        ("apop", "APOP"),
        ("PLAIN", "PLAIN"),
        ("LOGIN", "LOGIN"),
        ("CRAM-MD5", "CRAM-MD5"),
        ("SCRAM-SHA-256", "SCRAM-SHA-256"),
        ("auto", "SCRAM-SHA-256"),
    ],
)
def test_every_login_method(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path, mechanism: str, logged: str
) -> None:
    """Each method logs in; auto picks the strongest SASL mechanism Dovecot offers."""
    dovecot.deliver(mail_user, b"Subject: m\r\n\r\nbody\r\n")
    with _stls(dovecot, ca_file) as client:
        text = client.login(mail_user.name, mail_user.password, mechanism=mechanism)
        assert text.startswith("Logged in")
        assert client.stat()[0] == 1
        client.quit()
    assert _login_method(dovecot, mail_user) == logged


@pytest.mark.parametrize(
    "mechanism", ["user", "apop", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
)
def test_wrong_password_is_auth_failed(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path, mechanism: str
) -> None:
    """A refused password raises AuthFailed carrying the [AUTH] code; the session survives."""
    with _stls(dovecot, ca_file) as client:
        with pytest.raises(AuthFailed) as info:
            client.login(mail_user.name, "wrong", mechanism=mechanism)
        assert info.value.code == "AUTH"
        assert _state(client) is State.AUTHORIZATION
        client.login(mail_user.name, mail_user.password, mechanism=mechanism)
        assert _state(client) is State.TRANSACTION
        client.quit()


def test_pipelined_retr_many_is_byte_exact(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path
) -> None:
    """200 messages come back byte-exact, in order, through a pipelined batch."""
    messages = [
        b"Subject: %d\r\n\r\n" % i + b"line %d\r\n" % i * (1 + i % 37) + b".dot\r\n"
        for i in range(200)
    ]
    dovecot.deliver_many(mail_user, messages)
    got: dict[int, bytes] = {}
    order: list[int] = []

    def done(msgnum: int, sink: object, size: int) -> None:
        assert isinstance(sink, io.BytesIO)
        assert size == len(sink.getvalue())
        got[msgnum] = sink.getvalue()
        order.append(msgnum)

    with _implicit(dovecot, ca_file) as client:
        client.login(mail_user.name, mail_user.password)
        assert "PIPELINING" in client.capabilities()
        client.retr_many(range(1, 201), lambda _n: io.BytesIO(), done)
        assert client.noop() == ""  # the session is in step after the batch
        client.quit()
    assert order == list(range(1, 201))
    assert [got[n] for n in range(1, 201)] == messages


def test_listings_top_and_single_ops(dovecot: Dovecot, mail_user: MailUser, ca_file: Path) -> None:
    """LIST, UIDL, TOP, pipelined LIST n, NOOP and RSET give parsed results."""
    messages = [b"Subject: one\r\n\r\na\r\nb\r\n", b"Subject: two\r\nX: y\r\n\r\nc\r\n"]
    dovecot.deliver_many(mail_user, messages)
    with _stls(dovecot, ca_file) as client:
        client.login(mail_user.name, mail_user.password)
        assert client.scan_listing() == {1: len(messages[0]), 2: len(messages[1])}
        uids = client.uidl_listing()
        assert [n for n, _ in uids] == [1, 2]
        assert len({uid for _, uid in uids}) == 2
        assert all(isinstance(uid, bytes) for _, uid in uids)
        assert client.scan_many([2, 1]) == {1: len(messages[0]), 2: len(messages[1])}
        assert client.top(1, 1) == b"Subject: one\r\n\r\na\r\n"
        assert client.top(2, 0) == b"Subject: two\r\nX: y\r\n\r\n"
        client.dele_many([1])
        with pytest.raises(ServerError):
            client.retr_into(1, io.BytesIO())
        client.rset()
        assert _body(client, 1) == messages[0]
        client.quit()
    assert dovecot.messages(mail_user) == messages


def test_dele_many_and_quit_empty_the_mailbox(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path
) -> None:
    """DELEs are committed by QUIT; closing without QUIT deletes nothing."""
    dovecot.deliver_many(mail_user, [b"Subject: %d\r\n\r\nx\r\n" % i for i in range(120)])
    with _stls(dovecot, ca_file) as client:
        client.login(mail_user.name, mail_user.password)
        client.dele_many(range(1, 121))
        assert client.stat() == (0, 0)
    assert len(dovecot.messages(mail_user)) == 120  # closed without QUIT
    with _stls(dovecot, ca_file) as client:
        client.login(mail_user.name, mail_user.password)
        client.dele_many(range(1, 121))
        assert "deleted" in client.quit()
        assert client.closed
    assert dovecot.messages(mail_user) == []


def _raw_retr(dovecot: Dovecot, user: MailUser, msgnum: int) -> bytes:
    """RETR over a bare socket with no line limit: the reference for what Dovecot serves."""
    with socket.create_connection((dovecot.host, dovecot.pop3_port), timeout=10) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        for command in (b"USER " + user.name.encode(), b"PASS " + user.password.encode()):
            sock.sendall(command + b"\r\n")
            assert reader.readline().startswith(b"+OK")
        sock.sendall(b"RETR %d\r\nQUIT\r\n" % msgnum)
        assert reader.readline().startswith(b"+OK")
        body = bytearray()
        while (line := reader.readline()) != b".\r\n":
            assert line, "connection closed inside RETR"
            body += line[1:] if line.startswith(b".") else line
        return bytes(body)


def test_corpus_round_trips_byte_exact(
    dovecot: Dovecot, mail_user: MailUser, ca_file: Path
) -> None:
    """Every awkward corpus message arrives exactly as Dovecot serves it."""
    names = list(CORPUS)
    stored = [CORPUS[name]() for name in names]
    dovecot.deliver_many(mail_user, stored)
    references = [_raw_retr(dovecot, mail_user, n) for n in range(1, len(names) + 1)]
    with _stls(dovecot, ca_file) as client:
        client.login(mail_user.name, mail_user.password)
        sizes = client.scan_listing()
        for n, (name, message, reference) in enumerate(
            zip(names, stored, references, strict=True), 1
        ):
            body = _body(client, n)
            assert body == reference, name
            assert body == served(message), name
            # LIST counts the stored message (LF as CRLF) without the CRLF that
            # Dovecot appends to a message lacking a final line end.
            appended = 0 if message.endswith(b"\n") else 2
            assert sizes[n] == len(body) - appended, name
        client.quit()
