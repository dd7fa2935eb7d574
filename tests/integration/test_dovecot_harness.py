"""The private Dovecot harness behaves like the POP3 server the other tests rely on."""

from __future__ import annotations

import poplib
import re
import shutil
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest

from devtools.dovecot import Dovecot, DovecotError, MailUser

__all__: list[str] = []

pytestmark = pytest.mark.dovecot

MESSAGE = (
    b"From: a@example.org\r\nTo: b@example.org\r\nSubject: harness\r\n\r\n"
    b"line one\r\n.leading dot\r\n\r\n" + b"x" * 1500 + b"\r\nlast\r\n"
)


def _context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def _login(dovecot: Dovecot, user: MailUser) -> poplib.POP3:
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    client.user(user.name)
    client.pass_(user.password)
    return client


def _capa(reader: BinaryIO, sock: socket.socket) -> list[bytes]:
    sock.sendall(b"CAPA\r\n")
    lines: list[bytes] = []
    assert reader.readline().startswith(b"+OK")
    while (line := reader.readline()) != b".\r\n":
        assert line, "connection closed inside CAPA"
        lines.append(line.rstrip(b"\r\n"))
    return lines


def test_plain_port_greets_with_apop_timestamp_and_capabilities(dovecot: Dovecot) -> None:
    """The plain port greets with an APOP timestamp and offers UIDL, PIPELINING and STLS."""
    with socket.create_connection((dovecot.host, dovecot.pop3_port), timeout=10) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        caps = _capa(reader, sock)
    assert re.fullmatch(rb"\+OK .*<[^<>@\s]+@[^<>\s]+>\r\n", greeting)
    assert {b"UIDL", b"PIPELINING", b"STLS", b"TOP", b"RESP-CODES", b"USER"} <= set(caps)
    sasl = next(c for c in caps if c.startswith(b"SASL "))
    assert {b"PLAIN", b"LOGIN", b"CRAM-MD5"} <= set(sasl.split()[1:])


def test_stls_upgrades_with_harness_ca(dovecot: Dovecot, mail_user: MailUser) -> None:
    """STLS succeeds with the harness CA for "localhost", and STLS disappears afterwards."""
    client = poplib.POP3("localhost", dovecot.pop3_port, timeout=10)
    client.stls(_context(dovecot.ca_file))
    assert "STLS" not in client.capa()
    client.user(mail_user.name)
    client.pass_(mail_user.password)
    assert client.stat() == (0, 0)
    client.quit()


def test_implicit_tls_port(dovecot: Dovecot, ca_file: Path, mail_user: MailUser) -> None:
    """The POP3S port speaks TLS at once with a certificate valid for 127.0.0.1."""
    client = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=_context(ca_file))
    assert client.getwelcome().startswith(b"+OK")
    client.apop(mail_user.name, mail_user.password)
    assert client.stat() == (0, 0)
    client.quit()


def test_untrusted_client_rejects_certificate(dovecot: Dovecot) -> None:
    """Without the harness CA the certificate does not verify (so verification is real)."""
    with pytest.raises(ssl.SSLCertVerificationError):
        poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=ssl.create_default_context())


def test_delivered_message_is_retrieved_byte_exact(dovecot: Dovecot, mail_user: MailUser) -> None:
    """A delivered CRLF message comes back byte-exact through RETR, with a stable UIDL."""
    dovecot.deliver(mail_user, MESSAGE)
    client = _login(dovecot, mail_user)
    assert client.stat() == (1, len(MESSAGE))
    _resp, lines, octets = client.retr(1)
    assert b"\r\n".join(lines) + b"\r\n" == MESSAGE
    assert octets == len(MESSAGE)
    uidl = client.uidl(1)
    client.quit()
    again = _login(dovecot, mail_user)
    assert again.uidl(1) == uidl
    again.quit()
    assert re.fullmatch(rb"\+OK 1 [0-9a-f]{16}", uidl)


def test_dele_removes_from_server_in_delivery_order(dovecot: Dovecot, mail_user: MailUser) -> None:
    """Messages are listed in delivery order and DELE+QUIT removes them on the server."""
    bodies = [f"Subject: {n}\r\n\r\nbody {n}\r\n".encode() for n in range(5)]
    dovecot.deliver_many(mail_user, bodies)
    client = _login(dovecot, mail_user)
    assert [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in range(1, 6)] == bodies
    client.dele(2)
    client.dele(4)
    client.quit()
    assert dovecot.messages(mail_user) == [bodies[0], bodies[2], bodies[4]]


def test_wrong_password_is_auth_error(dovecot: Dovecot, mail_user: MailUser) -> None:
    """A wrong password is answered with an [AUTH] response code."""
    client = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    client.user(mail_user.name)
    with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[AUTH\] "):
        client.pass_(mail_user.password + "-wrong")
    client.close()


def test_users_are_independent(dovecot: Dovecot) -> None:
    """Mail delivered to one user is invisible to another."""
    alice, bob = dovecot.new_user("alice"), dovecot.new_user("bob")
    assert alice.name != bob.name
    dovecot.deliver(alice, b"Subject: for alice\r\n\r\nhi\r\n")
    a, b = _login(dovecot, alice), _login(dovecot, bob)
    assert a.stat()[0] == 1
    assert b.stat() == (0, 0)
    a.quit()
    b.quit()
    assert dovecot.messages(bob) == []


def _server_processes(server: Dovecot) -> list[int]:
    """Live processes of ``server``: the master (by config path) and its titled children."""
    marks = (server.instance.encode(), str(server.config_file).encode())
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if any(m in cmdline for m in marks) and state != "Z":
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def own_server_root() -> Iterator[Path]:
    """A traversable private directory for a second, short-lived Dovecot."""
    root = Path(tempfile.mkdtemp(prefix="popsync-dovecot-stop-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_stop_kills_every_process(dovecot: Dovecot, own_server_root: Path) -> None:
    """stop() ends the master and all its children and frees the ports."""
    server = Dovecot(own_server_root, password="pw")
    with server:
        user = server.new_user()
        client = poplib.POP3(server.host, server.pop3_port, timeout=10)
        client.user(user.name)
        client.pass_("pw")  # a logged-in session keeps a pop3 child process alive
        assert len(_server_processes(server)) >= 3
        assert _server_processes(dovecot)  # the session server is unaffected
    time.sleep(0.05)
    assert _server_processes(server) == []
    assert not server.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.pop3_port), timeout=2)
    client.close()


def test_extra_config_is_applied(dovecot: Dovecot, own_server_root: Path) -> None:
    """extra_config is appended to the generated configuration and takes effect."""
    with Dovecot(own_server_root, extra_config="login_greeting = harness says hi\n") as server:
        client = poplib.POP3(server.host, server.pop3_port, timeout=10)
        welcome = client.getwelcome()
        client.quit()
    assert welcome.startswith(b"+OK harness says hi <")


def test_bad_config_fails_with_log_tail(dovecot: Dovecot, own_server_root: Path) -> None:
    """A configuration Dovecot rejects raises DovecotError quoting Dovecot's complaint."""
    server = Dovecot(own_server_root, extra_config="no_such_setting_xyz = 1\n")
    with pytest.raises(DovecotError, match="no_such_setting_xyz"):
        server.start()
    assert not server.running
