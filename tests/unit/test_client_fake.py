"""Pop3Client and popsync.poplib against scripted servers: what Dovecot cannot show."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import io
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import popsync.poplib as our_poplib
from popsync import net
from popsync.client import (
    ConnectionLost,
    MessageTooLarge,
    PlaintextRefused,
    Pop3Client,
    StartTlsUnavailable,
)
from popsync.errors import CertificateError, ExitCode, NetworkError
from popsync.pop3 import (
    AuthFailed,
    LoginDelay,
    MailboxInUse,
    PermFailure,
    RemoteProtocolError,
    ServerError,
    TempFailure,
)
from tests.fake_pop3 import (
    Close,
    Expect,
    ExpectAny,
    FakePop3Server,
    Send,
    Stall,
    StartTLS,
    Step,
)

GREETING = Send(b"+OK fake POP3 ready\r\n")
OK = b"+OK\r\n"


def capa(*lines: bytes) -> bytes:
    """A CAPA reply listing ``lines``."""
    return b"+OK capabilities\r\n" + b"".join(line + b"\r\n" for line in lines) + b".\r\n"


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@pytest.fixture
def serve() -> Iterator[list[FakePop3Server]]:
    """Collects servers and closes them after the test."""
    servers: list[FakePop3Server] = []
    yield servers
    for server in servers:
        server.close()


def start(serve: list[FakePop3Server], *scripts: list[Step], **kw: float) -> FakePop3Server:
    server = FakePop3Server(*scripts, linger=kw.pop("linger", 1.0), **kw)
    serve.append(server)
    return server


def plain(server: FakePop3Server, timeout: float = 5.0) -> Pop3Client:
    return Pop3Client.connect(server.host, server.port, tls="none", timeout=timeout)


def login_plain(client: Pop3Client, mechanism: str, user: str = "bob", secret: str = "pw") -> str:
    return client.login(user, secret, mechanism=mechanism, allow_plaintext=True)


# --------------------------------------------------------------------- UTF8 / RPOP
def test_utf8_is_sent_before_auth_when_capa_lists_it(serve: list[FakePop3Server]) -> None:
    """CAPA lists UTF8: UTF8 goes first, then a UTF-8 user name; CAPA is re-asked after login."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"CAPA", capa(b"UTF8 USER", b"USER")),
            Expect(b"UTF8", b"+OK UTF8 enabled\r\n"),
            Expect("USER jösé".encode(), OK),
            Expect(b"PASS pw", b"+OK welcome\r\n"),
            Expect(b"CAPA", capa(b"UIDL", b"PIPELINING")),
            Expect(b"QUIT", OK),
        ],
    )
    with plain(server) as client:
        assert client.login("jösé", "pw", mechanism="user", allow_plaintext=True, utf8=True) == (
            "welcome"
        )
        assert client.utf8_enabled
        assert client.capabilities() == {"UIDL": (), "PIPELINING": ()}
        client.quit()
    server.check()


def test_utf8_is_not_sent_when_capa_lacks_it(serve: list[FakePop3Server]) -> None:
    """Without UTF8 in CAPA the login goes straight to USER."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"CAPA", capa(b"USER")),
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"QUIT", OK),
        ],
    )
    with plain(server) as client:
        client.login("bob", "pw", mechanism="user", allow_plaintext=True, utf8=True)
        assert not client.utf8_enabled
        client.quit()
    server.check()
    assert server.commands == [b"CAPA", b"USER bob", b"PASS pw", b"QUIT"]


def test_rpop_sends_user_then_rpop(serve: list[FakePop3Server]) -> None:
    """RPOP (RFC 1081) is used only when asked for: USER, then RPOP with the local name."""
    server = start(
        serve,
        [GREETING, Expect(b"USER bob", OK), Expect(b"RPOP localbob", b"+OK in\r\n")],
    )
    with plain(server) as client:
        assert login_plain(client, "rpop", secret="localbob") == "in"
    server.check()


# --------------------------------------------------------------------- SCRAM
def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


class ScramServer:
    """The server side of SCRAM-SHA-256 (RFC 5802), computed independently of the client."""

    def __init__(self, user: str, password: str, client_nonce: str) -> None:
        salt, self.iterations = b"NaCl-salt", 4096
        self.nonce = client_nonce + "server-part"
        self.client_first_bare = f"n={user},r={client_nonce}".encode()
        self.server_first = f"r={self.nonce},s={b64(salt).decode()},i={self.iterations}".encode()
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, self.iterations)
        self.stored_key = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
        self.server_key = _hmac(salted, b"Server Key")

    def auth_message(self, without_proof: bytes) -> bytes:
        return self.client_first_bare + b"," + self.server_first + b"," + without_proof

    def verify(self, client_final: bytes) -> bool:
        """Check the client proof the way a server does: recover ClientKey, hash, compare."""
        without_proof, _, proof = client_final.rpartition(b",p=")
        if without_proof != f"c=biws,r={self.nonce}".encode():
            return False
        signature = _hmac(self.stored_key, self.auth_message(without_proof))
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        return hashlib.sha256(client_key).digest() == self.stored_key

    def server_final(self) -> bytes:
        without_proof = f"c=biws,r={self.nonce}".encode()
        return b"v=" + b64(_hmac(self.server_key, self.auth_message(without_proof)))


@pytest.mark.parametrize("valid_signature", [True, False])
def test_scram_sha256(
    serve: list[FakePop3Server], monkeypatch: pytest.MonkeyPatch, valid_signature: bool
) -> None:
    """The client proof checks out on the server; a wrong server signature is refused."""
    monkeypatch.setattr("popsync.pop3.sasl.secrets.token_bytes", lambda n: b"\x07" * n)
    client_nonce = base64.b64encode(b"\x07" * 18).decode()
    scram = ScramServer("bob", "pencil", client_nonce)
    server_final = scram.server_final() if valid_signature else b"v=" + b64(b"\0" * 32)
    finish = (
        Expect(b"", b"+OK authenticated\r\n") if valid_signature else Expect(b"*", b"-ERR no\r\n")
    )
    server = start(
        serve,
        [
            GREETING,
            Expect(
                b"AUTH SCRAM-SHA-256 " + b64(b"n,," + scram.client_first_bare),
                b"+ " + b64(scram.server_first) + b"\r\n",
            ),
            ExpectAny(b"+ " + b64(server_final) + b"\r\n"),
            finish,
        ],
    )
    with plain(server) as client:
        if valid_signature:
            assert login_plain(client, "SCRAM-SHA-256", secret="pencil") == "authenticated"
        else:
            with pytest.raises(RemoteProtocolError, match="signature"):
                login_plain(client, "SCRAM-SHA-256", secret="pencil")
    server.check()
    assert scram.verify(base64.b64decode(server.commands[1]))


# --------------------------------------------------------------------- OAuth
XOAUTH2 = b"user=bob\x01auth=Bearer tok\x01\x01"


def test_xoauth2_initial_response(serve: list[FakePop3Server]) -> None:
    """XOAUTH2's one-step form puts the token on the AUTH line."""
    server = start(serve, [GREETING, Expect(b"AUTH XOAUTH2 " + b64(XOAUTH2), OK)])
    with plain(server) as client:
        login_plain(client, "XOAUTH2", secret="tok")
    server.check()


def test_xoauth2_two_step(serve: list[FakePop3Server]) -> None:
    """The two-step form (Office 365) sends the token after the empty challenge."""
    server = start(serve, [GREETING, Expect(b"AUTH XOAUTH2", b"+ \r\n"), Expect(b64(XOAUTH2), OK)])
    with plain(server) as client:
        client.login("bob", "tok", mechanism="XOAUTH2", allow_plaintext=True, oauth_two_step=True)
    server.check()


def test_xoauth2_error_challenge_gets_empty_response(serve: list[FakePop3Server]) -> None:
    """A JSON error challenge is answered with an empty line; the -ERR is AuthFailed."""
    error = json.dumps({"status": "401", "schemes": "bearer"}).encode()
    server = start(
        serve,
        [
            GREETING,
            Expect(b"AUTH XOAUTH2 " + b64(XOAUTH2), b"+ " + b64(error) + b"\r\n"),
            Expect(b"", b"-ERR [AUTH] invalid token\r\n"),
        ],
    )
    with plain(server) as client, pytest.raises(AuthFailed) as info:
        login_plain(client, "XOAUTH2", secret="tok")
    assert info.value.code == "AUTH"
    server.check()


def test_long_initial_response_waits_for_the_challenge(serve: list[FakePop3Server]) -> None:
    """An initial response that would exceed 255 octets is sent after an empty challenge."""
    token = "t" * 300
    message = b"user=bob\x01auth=Bearer " + token.encode() + b"\x01\x01"
    server = start(serve, [GREETING, Expect(b"AUTH XOAUTH2", b"+ \r\n"), Expect(b64(message), OK)])
    with plain(server) as client:
        login_plain(client, "XOAUTH2", secret=token)
    server.check()


def test_oauthbearer(serve: list[FakePop3Server]) -> None:
    """OAUTHBEARER sends the GS2 header, host, port and token; an error gets ^A back."""
    auth_line = re.compile(rb"AUTH OAUTHBEARER \S+")
    error = b'{"status":"invalid_token"}'
    server = start(
        serve,
        [GREETING, Expect(auth_line, OK)],
        [
            GREETING,
            Expect(auth_line, b"+ " + b64(error) + b"\r\n"),
            Expect(b64(b"\x01"), b"-ERR [AUTH] expired\r\n"),
        ],
    )
    with plain(server) as client:
        login_plain(client, "OAUTHBEARER", secret="tok")
    with plain(server) as client, pytest.raises(AuthFailed):
        login_plain(client, "OAUTHBEARER", secret="tok")
    server.check()
    sent = base64.b64decode(server.commands[0].split()[2])
    assert sent == b"n,a=bob,\x01host=127.0.0.1\x01port=%d\x01auth=Bearer tok\x01\x01" % server.port


# --------------------------------------------------------------------- pipelining
class LockstepServer:
    """A server that notes every command sent before the previous one was answered."""

    def __init__(self, caps: bytes, messages: list[bytes]) -> None:
        self.caps = caps
        self.messages = messages
        self.early = 0  # commands that arrived while an earlier one was unanswered
        self.commands: list[bytes] = []
        self.followed: list[bytes] = []  # commands whose successor was already waiting
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _reply(self, command: bytes) -> bytes:
        verb, *args = command.split()
        if verb == b"CAPA":
            return self.caps
        if verb == b"RETR":
            return b"+OK\r\n" + self.messages[int(args[0]) - 1] + b".\r\n"
        if verb in (b"UIDL", b"LIST") and not args:
            body = b"".join(
                b"%d %s\r\n" % (n, b"uid%d" % n if verb == b"UIDL" else b"%d" % len(m))
                for n, m in enumerate(self.messages, 1)
            )
            return b"+OK\r\n" + body + b".\r\n"
        return OK

    def _run(self) -> None:
        sock, _ = self._listener.accept()
        with sock:
            sock.settimeout(5)
            sock.sendall(b"+OK lockstep\r\n")
            buffer = b""
            while True:
                while b"\r\n" not in buffer:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buffer += data
                line, _, buffer = buffer.partition(b"\r\n")
                self.commands.append(line)
                time.sleep(0.02)  # give a pipelining client time to send more
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    buffer += sock.recv(65536)
                sock.settimeout(5)
                if buffer:
                    self.early += 1
                    self.followed.append(line)
                sock.sendall(self._reply(line))
                if line == b"QUIT":
                    return

    def join(self) -> None:
        self._thread.join(10)
        self._listener.close()


@pytest.mark.parametrize("offered", [False, True])
def test_pipelining_only_when_offered(offered: bool) -> None:
    """Without PIPELINING every command waits for its reply; with it, commands overlap."""
    messages = [b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n) for n in range(1, 9)]
    caps = capa(b"USER", b"PIPELINING") if offered else capa(b"USER")
    server = LockstepServer(caps, messages)
    got: dict[int, bytes] = {}
    with Pop3Client.connect("127.0.0.1", server.port, tls="none", timeout=5) as client:
        login_plain(client, "user")

        def done(n: int, sink: object, size: int) -> None:
            assert isinstance(sink, io.BytesIO)
            got[n] = sink.getvalue()

        client.retr_many(range(1, 9), lambda _n: io.BytesIO(), done)
        client.dele_many(range(1, 9))
        client.quit()
    server.join()
    assert [got[n] for n in range(1, 9)] == messages
    assert server.commands.count(b"DELE 8") == 1
    if offered:
        assert server.early > 0
    else:
        assert server.early == 0


def _listed(client: Pop3Client, separately: bool) -> tuple[list[tuple[int, bytes]], dict[int, int]]:
    if separately:
        return list(client.uidl_entries()), dict(client.scan_entries())
    return client.listings()


@pytest.mark.parametrize("offered", [False, True])
@pytest.mark.parametrize(
    ("separately", "pipelined"),
    [(False, [b"USER bob", b"CAPA", b"UIDL"]), (True, [b"USER bob", b"CAPA"])],
    ids=["listings", "uidl-then-list"],
)
def test_login_and_listings_share_round_trips_when_pipelining(
    offered: bool, separately: bool, pipelined: list[bytes]
) -> None:
    """With PIPELINING, USER+PASS go together and CAPA+UIDL(+LIST) go together.

    ``uidl_entries`` then ``scan_entries`` (a settled listing's order) send LIST by itself.
    """
    messages = [b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n) for n in range(1, 4)]
    caps = capa(b"USER", b"UIDL", b"PIPELINING") if offered else capa(b"USER", b"UIDL")
    server = LockstepServer(caps, messages)
    with Pop3Client.connect("127.0.0.1", server.port, tls="none", timeout=5) as client:
        client.capabilities()
        client.login("bob", "pw", mechanism="user", allow_plaintext=True)
        uidls, sizes = _listed(client, separately)
        client.quit()
    server.join()
    assert uidls == [(n, b"uid%d" % n) for n in range(1, 4)]
    assert sizes == {n: len(m) for n, m in enumerate(messages, 1)}
    assert server.commands == [b"CAPA", b"USER bob", b"PASS pw", b"CAPA", b"UIDL", b"LIST", b"QUIT"]
    assert server.followed == (pipelined if offered else [])


def test_retr_many_error_finishes_inflight_then_raises(serve: list[FakePop3Server]) -> None:
    """A -ERR in a pipelined batch: the other replies are delivered, then the error is raised."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"CAPA", capa(b"PIPELINING")),
            Expect(b"RETR 1", b"+OK\r\none\r\n.\r\n"),
            Expect(b"RETR 2", b"-ERR [SYS/TEMP] gone for now\r\n"),
            Expect(b"RETR 3", b"+OK\r\nthree\r\n.\r\n"),
            Expect(b"NOOP", b"+OK still here\r\n"),
        ],
    )
    done: list[tuple[int, bytes]] = []
    with plain(server) as client:
        login_plain(client, "user")
        with pytest.raises(TempFailure):
            client.retr_many(
                [1, 2, 3],
                lambda _n: io.BytesIO(),
                lambda n, sink, _size: done.append((n, sink.getvalue())),  # type: ignore[attr-defined]
            )
        assert client.noop() == "still here"
    server.check()
    assert done == [(1, b"one\r\n"), (3, b"three\r\n")]


# --------------------------------------------------------------------- odd bytes
def test_bare_lf_line_ends(serve: list[FakePop3Server]) -> None:
    """A server that ends lines with bare LF works; bodies keep the LF as sent."""
    server = start(
        serve,
        [
            Send(b"+OK hi\n"),
            Expect(b"USER bob", b"+OK\n"),
            Expect(b"PASS pw", b"+OK\n"),
            Expect(b"UIDL", b"+OK\n1 abc\n2 d/e\n.\n"),
            Expect(b"RETR 1", b"+OK\nline one\n..dot\nlast\n.\n"),
            Expect(b"QUIT", b"+OK bye\n"),
        ],
    )
    with plain(server) as client:
        login_plain(client, "user")
        assert client.uidl_listing() == [(1, b"abc"), (2, b"d/e")]
        sink = io.BytesIO()
        assert client.retr_into(1, sink) == len(b"line one\n.dot\nlast\n")
        assert sink.getvalue() == b"line one\n.dot\nlast\n"
        assert client.quit() == "bye"
    server.check()


def test_ten_megabyte_line(serve: list[FakePop3Server]) -> None:
    """One 10 MB line arrives whole, in chunks, without a line limit."""
    body = b"Subject: big\r\n\r\n" + b"A" * (10 * 1024 * 1024) + b"\r\n"
    server = start(
        serve,
        [
            GREETING,
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"RETR 1", b"+OK\r\n" + body + b".\r\n"),
        ],
    )
    writes: list[int] = []

    class Sink(io.BytesIO):
        def write(self, data: bytes, /) -> int:  # type: ignore[override]
            writes.append(len(data))
            return super().write(data)

    sink = Sink()
    with plain(server) as client:
        login_plain(client, "user")
        assert client.retr_into(1, sink) == len(body)
    server.check()
    assert sink.getvalue() == body
    assert len(writes) > 1  # streamed, not collected


def test_max_size_closes_the_connection(serve: list[FakePop3Server]) -> None:
    """A body beyond max_size raises MessageTooLarge and closes the session."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"RETR 1", b"+OK\r\n" + b"x" * 5000 + b"\r\n.\r\n"),
        ],
    )
    with plain(server) as client:
        login_plain(client, "user")
        with pytest.raises(MessageTooLarge):
            client.retr_into(1, io.BytesIO(), max_size=1000)
        assert client.closed
    server.check()


def test_disconnect_mid_retr_is_a_clear_error(serve: list[FakePop3Server]) -> None:
    """A connection dropped inside RETR raises ConnectionLost naming the server and RETR."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"RETR 1", b"+OK\r\nSubject: cut\r\n\r\npartial"),
            Close(),
        ],
    )
    sink = io.BytesIO()
    with plain(server) as client:
        login_plain(client, "user")
        with pytest.raises(ConnectionLost, match=rf"127\.0\.0\.1:{server.port}: .*RETR") as info:
            client.retr_into(1, sink)
        assert client.closed
    assert isinstance(info.value, NetworkError)
    assert info.value.exit_code == ExitCode.TEMPORARY
    # The partial message stays in the caller's sink for the caller to discard.
    assert b"Subject: cut\r\n\r\npartial".startswith(sink.getvalue())
    server.check()


def test_stalled_server_times_out_quickly(serve: list[FakePop3Server]) -> None:
    """A server that stops answering gives a NetworkError after the (small) timeout."""
    server = start(serve, [GREETING, Expect(b"CAPA"), Stall(5)], [Stall(5)])
    client = plain(server, timeout=0.3)
    began = time.monotonic()
    with pytest.raises(net.NetworkTimeout, match="timed out"):
        client.capabilities()
    assert time.monotonic() - began < 2
    assert client.closed
    began = time.monotonic()
    with pytest.raises(NetworkError, match="timed out"):
        plain(server, timeout=0.3)  # no greeting at all
    assert time.monotonic() - began < 2


@pytest.mark.parametrize(
    ("code", "cls", "temporary"),
    [
        (b"IN-USE", MailboxInUse, True),
        (b"LOGIN-DELAY", LoginDelay, True),
        (b"SYS/TEMP", TempFailure, True),
        (b"SYS/PERM", PermFailure, False),
        (b"AUTH", AuthFailed, False),
    ],
)
def test_response_codes_map_to_classes(
    serve: list[FakePop3Server], code: bytes, cls: type[ServerError], temporary: bool
) -> None:
    """[IN-USE], [LOGIN-DELAY], [SYS/TEMP], ... at PASS raise their own classes."""
    server = start(
        serve,
        [GREETING, Expect(b"USER bob", OK), Expect(b"PASS pw", b"-ERR [" + code + b"] no\r\n")],
    )
    with plain(server) as client, pytest.raises(cls) as info:
        login_plain(client, "user")
    assert type(info.value) is cls
    assert info.value.code == code.decode()
    assert info.value.temporary is temporary
    assert info.value.command == b"PASS"
    server.check()


# --------------------------------------------------------------------- TLS safety
def test_stls_injection_aborts_before_credentials(serve: list[FakePop3Server]) -> None:
    """Bytes after the STLS +OK abort the session; no credential is ever sent."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"CAPA", capa(b"STLS", b"USER")),
            Expect(b"STLS", b"+OK begin TLS\r\n+OK injected\r\n"),
        ],
    )
    with pytest.raises(RemoteProtocolError, match="injection"):
        Pop3Client.connect(
            server.host, server.port, tls="starttls", context=server.client_context(), timeout=5
        )
    server.check()
    assert server.commands == [b"CAPA", b"STLS"]


def test_stls_not_offered_while_required(serve: list[FakePop3Server]) -> None:
    """TLS required but no STLS in CAPA: fail before any credential, exit code 76."""
    server = start(serve, [GREETING, Expect(b"CAPA", capa(b"USER", b"SASL PLAIN"))])
    with pytest.raises(StartTlsUnavailable) as info:
        Pop3Client.connect(
            server.host, server.port, tls="starttls", context=server.client_context(), timeout=5
        )
    assert info.value.exit_code == ExitCode.PROTOCOL
    server.check()
    assert server.commands == [b"CAPA"]


def test_stls_then_capa_reasked_and_login(serve: list[FakePop3Server]) -> None:
    """A good STLS upgrade re-asks CAPA over TLS before choosing a mechanism."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"CAPA", capa(b"STLS", b"USER")),
            Expect(b"STLS", b"+OK begin\r\n"),
            StartTLS(),
            Expect(b"CAPA", capa(b"USER", b"SASL PLAIN")),
            Expect(b"AUTH PLAIN " + b64(b"\0bob\0pw"), b"+OK in\r\n"),
        ],
    )
    with Pop3Client.connect(
        server.host, server.port, tls="starttls", context=server.client_context(), timeout=5
    ) as client:
        assert client.is_tls
        assert client.login("bob", "pw") == "in"
    server.check()


def test_plaintext_refused_sends_nothing(serve: list[FakePop3Server]) -> None:
    """Over a clear-text connection login() refuses before sending a single byte."""
    server = start(serve, [GREETING])
    with plain(server) as client:
        for mechanism in ("auto", "user", "apop", "PLAIN", "CRAM-MD5", "XOAUTH2"):
            with pytest.raises(PlaintextRefused):
                client.login("bob", "pw", mechanism=mechanism)
    server.close()
    assert server.received == []


def test_untrusted_certificate_sends_nothing(serve: list[FakePop3Server]) -> None:
    """Implicit TLS with a certificate from an unknown CA fails with CertificateError."""
    server = start(serve, [StartTLS(untrusted=True), GREETING])
    with pytest.raises(CertificateError, match=r"certificate verify failed|unable to get"):
        Pop3Client.connect(
            server.host, server.port, tls="implicit", context=server.client_context(), timeout=5
        )
    server.close()
    assert server.received == []


# --------------------------------------------------------------------- choices
def test_capa_error_means_no_capabilities_and_apop_when_stamped(
    serve: list[FakePop3Server],
) -> None:
    """A -ERR to CAPA gives {}; auto then uses APOP because the greeting has a timestamp."""
    stamp = b"<1896.697170952@dbc.mtview.ca.us>"
    digest = hashlib.md5(stamp + b"tanstaaf").hexdigest().encode()
    server = start(
        serve,
        [
            Send(b"+OK POP3 server ready " + stamp + b"\r\n"),
            Expect(b"CAPA", b"-ERR unknown command\r\n"),
            Expect(b"APOP mrose " + digest, b"+OK maildrop has 1 message\r\n"),
        ],
    )
    with plain(server) as client:
        assert client.welcome.timestamp == stamp
        assert client.capabilities() == {}
        login_plain(client, "auto", user="mrose", secret="tanstaaf")
    server.check()


def test_auto_falls_back_to_user_pass(serve: list[FakePop3Server]) -> None:
    """No SASL and no timestamp over TLS: auto uses USER/PASS (never over clear text)."""
    server = start(
        serve,
        [
            StartTLS(),
            GREETING,
            Expect(b"CAPA", capa(b"USER")),
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
        ],
    )
    with Pop3Client.connect(
        server.host, server.port, tls="implicit", context=server.client_context(), timeout=5
    ) as client:
        client.login("bob", "pw")
    server.check()


def test_greeting_error_is_typed(serve: list[FakePop3Server]) -> None:
    """A -ERR greeting with [SYS/TEMP] raises TempFailure from connect."""
    server = start(serve, [Send(b"-ERR [SYS/TEMP] overloaded\r\n")])
    with pytest.raises(TempFailure):
        plain(server)
    server.check()


# --------------------------------------------------------------------- net
def test_connection_refused_names_the_server() -> None:
    """A closed port raises NetworkError naming host:port."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(NetworkError, match=rf"127\.0\.0\.1:{port}: connection refused"):
        net.connect("127.0.0.1", port, timeout=2, context=None)


def test_ipv6_loopback() -> None:
    """connect() works over IPv6 and names the server in brackets."""
    try:
        listener = socket.create_server(("::1", 0), family=socket.AF_INET6)
    except OSError:
        pytest.skip("no IPv6 loopback")
    with listener:
        port = listener.getsockname()[1]

        def greet() -> None:
            sock, _ = listener.accept()
            with sock:
                sock.sendall(b"+OK v6\r\n")
                sock.recv(100)

        thread = threading.Thread(target=greet, daemon=True)
        thread.start()
        with Pop3Client.connect("::1", port, tls="none", timeout=5) as client:
            assert client.welcome.text == "v6"
            assert client._stream is not None
            assert client._stream.where == f"[::1]:{port}"
        thread.join(5)


# --------------------------------------------------------------------- poplib
# The side-by-side comparison with stdlib poplib is in test_poplib_dropin.py.
def test_poplib_timeout_is_timeout_error(serve: list[FakePop3Server]) -> None:
    """A timeout through popsync.poplib is a TimeoutError, as with stdlib poplib."""
    server = start(serve, [GREETING, Expect(b"USER bob"), Stall(5)])
    conn = our_poplib.POP3(server.host, server.port, timeout=0.3)
    with pytest.raises(TimeoutError):
        conn.user("bob")


def test_sink_factory_failure_on_last_message_closes(serve: list[FakePop3Server]) -> None:
    """If sink_factory raises for the last message, its unread body cannot desync the session."""
    server = start(
        serve,
        [
            GREETING,
            Expect(b"USER bob", OK),
            Expect(b"PASS pw", OK),
            Expect(b"CAPA", capa(b"USER")),
            Expect(b"RETR 1", b"+OK\r\nbody\r\n.\r\n"),
        ],
    )

    def refuse(_n: int) -> io.BytesIO:
        raise OSError("disk full")

    with plain(server) as client:
        login_plain(client, "user")
        with pytest.raises(OSError, match="disk full"):
            client.retr_many([1], refuse, lambda *_: None)
        assert client.closed
    server.check()
