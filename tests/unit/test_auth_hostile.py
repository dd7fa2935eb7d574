"""Authentication policy, SCRAM impostors, endless SASL and hostile server text (fake server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from popsync.client import MAX_SASL_ROUNDS, NoSafeMechanism, PlaintextRefused, Pop3Client
from popsync.config import Account, Config, parse_config
from popsync.errors import ExitCode
from popsync.pop3 import AuthFailed, RemoteProtocolError, SaslAuthError, sasl
from popsync.seen import SeenStore
from popsync.status import collect_status, render_status
from popsync.sync import classify_error, sync_account
from tests.fake_pop3 import Expect, ExpectAny, FakePop3Server, Send, StartTLS, Step
from tests.synchelp import toml_config

__all__: list[str] = []

GREETING = Send(b"+OK fake POP3 ready\r\n")
STAMPED = Send(b"+OK ready <1896.697170952@fake>\r\n")
OK = b"+OK\r\n"
PASSWORD = "hunter2-Secret"


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


def start(serve: list[FakePop3Server], *scripts: list[Step]) -> FakePop3Server:
    server = FakePop3Server(*scripts, linger=1.0)
    serve.append(server)
    return server


def plain(server: FakePop3Server) -> Pop3Client:
    return Pop3Client.connect(server.host, server.port, tls="none", timeout=5)


def tls(server: FakePop3Server) -> Pop3Client:
    return Pop3Client.connect(
        server.host, server.port, tls="implicit", context=server.client_context(), timeout=5
    )


def login(client: Pop3Client, mechanism: str, secret: str = "pw") -> str:
    return client.login("bob", secret, mechanism=mechanism, allow_plaintext=True)


# ------------------------------------------------------------------ the one rule
def test_auto_over_clear_text_never_picks_a_revealing_mechanism(
    serve: list[FakePop3Server],
) -> None:
    """Only PLAIN, LOGIN and USER offered over clear text: fail with the fix, send nothing."""
    server = start(serve, [GREETING, Expect(b"CAPA", capa(b"USER", b"SASL PLAIN LOGIN"))])
    with plain(server) as client, pytest.raises(NoSafeMechanism) as info:
        login(client, "auto")
    server.close()
    assert server.commands == [b"CAPA"]
    message = str(info.value)
    assert 'auth = "user" together with allow_plaintext = true' in message
    assert "\n" not in message
    assert info.value.exit_code == ExitCode.CONFIG
    assert classify_error(info.value, during_login=True) == ExitCode.CONFIG
    assert isinstance(info.value, PlaintextRefused)


@pytest.mark.parametrize(
    ("greeting", "sasl_line", "expected"),
    [
        (GREETING, b"SASL PLAIN LOGIN CRAM-MD5 SCRAM-SHA-256", b"AUTH SCRAM-SHA-256 "),
        (GREETING, b"SASL PLAIN CRAM-MD5", b"AUTH CRAM-MD5"),
        (STAMPED, b"SASL PLAIN LOGIN", b"APOP bob "),
    ],
)
def test_auto_over_clear_text_picks_the_strongest_hiding_mechanism(
    serve: list[FakePop3Server], greeting: Send, sasl_line: bytes, expected: bytes
) -> None:
    """SCRAM-SHA-256, then CRAM-MD5, then APOP; never PLAIN although it comes first."""
    refusal = ExpectAny(b"-ERR [AUTH] no\r\n")
    server = start(serve, [greeting, Expect(b"CAPA", capa(b"USER", sasl_line)), refusal])
    with plain(server) as client, pytest.raises(AuthFailed):
        login(client, "auto")
    server.close()
    assert server.commands[1].startswith(expected)
    assert not any(c.startswith((b"USER", b"PASS", b"AUTH PLAIN")) for c in server.commands)


def test_auto_over_tls_still_uses_user_pass_as_a_last_resort(
    serve: list[FakePop3Server],
) -> None:
    """Encrypted, no SASL and no timestamp: auto falls back to USER/PASS."""
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
    with tls(server) as client:
        client.login("bob", "pw")
    server.check()


def test_explicit_user_is_honoured_over_clear_text(serve: list[FakePop3Server]) -> None:
    """auth = user with allow_plaintext logs in with USER/PASS although SCRAM is offered."""
    server = start(
        serve,
        [GREETING, Expect(b"USER bob", OK), Expect(b"PASS pw", b"+OK in\r\n")],
    )
    with plain(server) as client:
        assert login(client, "user") == "in"
    server.check()


def test_explicit_mechanism_never_falls_back(serve: list[FakePop3Server]) -> None:
    """A refused explicit SCRAM-SHA-256 is an auth failure, not a retry with USER/PASS."""
    server = start(serve, [GREETING, ExpectAny(b"-ERR [AUTH] unsupported mechanism\r\n")])
    with plain(server) as client, pytest.raises(AuthFailed):
        login(client, "SCRAM-SHA-256")
    server.close()
    assert len(server.commands) == 1
    assert server.commands[0].startswith(b"AUTH SCRAM-SHA-256 ")


# ------------------------------------------------------------------ SCRAM impostors
NONCE = base64.b64encode(b"\x07" * 18).decode()


def _scram_first(iterations: int = 4096) -> bytes:
    return f"r={NONCE}srv,s={base64.b64encode(b'salt').decode()},i={iterations}".encode()


def _server_signature(password: str) -> bytes:
    """What a real server that knows ``password`` would send as v= (RFC 5802)."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), b"salt", 4096)
    without_proof = f"c=biws,r={NONCE}srv".encode()
    auth_message = f"n=bob,r={NONCE},".encode() + _scram_first() + b"," + without_proof
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    return hmac.digest(server_key, auth_message, "sha256")


@pytest.fixture
def fixed_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """The client nonce is predictable, so a script can continue the exchange."""
    monkeypatch.setattr("popsync.pop3.sasl.secrets.token_bytes", lambda n: b"\x07" * n)


def _scram_script(*after_first: Step) -> list[Step]:
    return [
        GREETING,
        Expect(
            b"AUTH SCRAM-SHA-256 " + b64(f"n,,n=bob,r={NONCE}".encode()),
            b"+ " + b64(_scram_first()) + b"\r\n",
        ),
        *after_first,
    ]


@pytest.mark.usefixtures("fixed_nonce")
def test_scram_ok_without_server_signature_is_refused(serve: list[FakePop3Server]) -> None:
    """+OK straight after the client proof (no v=): auth failure, the session is dropped."""
    server = start(serve, _scram_script(ExpectAny(b"+OK welcome, impostor accepted\r\n")))
    with plain(server) as client:
        with pytest.raises(SaslAuthError, match="without proving"):
            login(client, "SCRAM-SHA-256", secret="pencil")
        assert client.closed
    server.close()
    assert len(server.commands) == 2  # AUTH and the proof; nothing after the +OK
    assert classify_error(SaslAuthError("x"), during_login=True) == ExitCode.AUTH


@pytest.mark.usefixtures("fixed_nonce")
@pytest.mark.parametrize(
    "final", [b"v=" + b64(b"\0" * 32), b"x=nothing", b"e=invalid-proof", b"v=***"]
)
def test_scram_bad_server_final_is_an_auth_failure(
    serve: list[FakePop3Server], final: bytes
) -> None:
    """A wrong, missing or non-base64 v=, or an e=, fails the login as 77 after a cancel."""
    server = start(
        serve,
        _scram_script(ExpectAny(b"+ " + b64(final) + b"\r\n"), Expect(b"*", b"-ERR cancelled\r\n")),
    )
    with plain(server) as client, pytest.raises(SaslAuthError) as info:
        login(client, "SCRAM-SHA-256", secret="pencil")
    server.check()
    assert classify_error(info.value, during_login=True) == ExitCode.AUTH


@pytest.mark.usefixtures("fixed_nonce")
def test_scram_good_server_signature_is_accepted(serve: list[FakePop3Server]) -> None:
    """The control case: the real signature, then +OK, logs in."""
    signature = _server_signature("pencil")
    server = start(
        serve,
        _scram_script(
            ExpectAny(b"+ " + b64(b"v=" + b64(signature)) + b"\r\n"),
            Expect(b"", b"+OK verified\r\n"),
        ),
    )
    with plain(server) as client:
        assert login(client, "SCRAM-SHA-256", secret="pencil") == "verified"
    server.check()


@pytest.mark.usefixtures("fixed_nonce")
@pytest.mark.parametrize("iterations", [1, 1000, 4095])
def test_scram_weak_iteration_count_is_refused(
    serve: list[FakePop3Server], iterations: int
) -> None:
    """Fewer than 4096 iterations (RFC 7677): no proof is sent, only the cancel."""
    server = start(
        serve,
        [
            GREETING,
            Expect(
                b"AUTH SCRAM-SHA-256 " + b64(f"n,,n=bob,r={NONCE}".encode()),
                b"+ " + b64(_scram_first(iterations)) + b"\r\n",
            ),
            Expect(b"*", b"-ERR cancelled\r\n"),
        ],
    )
    with plain(server) as client, pytest.raises(SaslAuthError, match="iterations"):
        login(client, "SCRAM-SHA-256", secret="pencil")
    server.check()


# ------------------------------------------------------------------ bounded rounds
def _credential_count(server: FakePop3Server, secret: bytes) -> int:
    return sum(1 for c in server.commands if secret in c)


def test_endless_empty_challenges_get_the_credential_at_most_twice(
    serve: list[FakePop3Server],
) -> None:
    """2,000 empty '+' challenges to AUTH PLAIN: a protocol error, the password sent twice."""
    credential = b64(b"\0bob\0pw")
    server = start(serve, [GREETING, Expect(b"AUTH PLAIN " + credential, b"+ \r\n" * 2000)])
    with plain(server) as client, pytest.raises(RemoteProtocolError) as info:
        login(client, "PLAIN")
    server.close()
    assert _credential_count(server, credential) == 2
    assert len(server.commands) <= 4
    assert classify_error(info.value, during_login=True) == ExitCode.PROTOCOL


@pytest.mark.parametrize("mechanism", ["LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER"])
def test_every_mechanism_answers_a_bounded_number_of_challenges(
    serve: list[FakePop3Server], mechanism: str
) -> None:
    """However many challenges come, each mechanism stops after its own few answers."""
    server = start(serve, [GREETING, ExpectAny(b"+ \r\n" * 2000)])
    with plain(server) as client, pytest.raises(RemoteProtocolError):
        login(client, mechanism)
    server.close()
    assert 1 < len(server.commands) <= 4


def test_sasl_rounds_are_bounded_by_the_client(
    serve: list[FakePop3Server], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a mechanism that would answer forever stops after MAX_SASL_ROUNDS challenges."""

    class Endless:
        name = "PLAIN"

        def initial(self) -> bytes | None:
            return None

        def step(self, challenge: bytes) -> bytes:
            return b"again"

        def succeeded(self) -> None:
            pass

    monkeypatch.setattr(sasl, "make_mechanism", lambda *a, **k: Endless())
    server = start(serve, [GREETING, ExpectAny(b"+ \r\n" * 2000)])
    with plain(server) as client, pytest.raises(RemoteProtocolError, match="more than 10"):
        login(client, "PLAIN")
    server.close()
    assert server.commands.count(b64(b"again")) == MAX_SASL_ROUNDS
    assert server.commands[-1] == b"*"


# ------------------------------------------------------------------ hostile text
def _account(tmp_path: Path, server: FakePop3Server, **extra: str | int | bool) -> Account:
    keys: dict[str, str | int | bool] = {
        "host": server.host,
        "port": server.port,
        "tls": "implicit",
        "tls_ca_file": str(server.ca_file),
        "username": "me",
        "password": PASSWORD,
        "auth": "user",
        "maildir": str(tmp_path / "Maildir"),
        "timeout": "2s",
    }
    keys.update(extra)
    return parse_config(toml_config(tmp_path / "state", {"acct": keys}), "t.toml").accounts["acct"]


HOSTILE_ERR = (
    b"-ERR [AUTH] \x1b]0;owned\x07\x1b[2Jwrong password "
    + PASSWORD.encode()
    + b" (base64 "
    + b64(b"\0me\0" + PASSWORD.encode())
    + b")\r\n"
)


@pytest.mark.parametrize("auth", ["user", "plain"])
def test_echoed_password_and_escapes_never_reach_result_log_or_status(
    tmp_path: Path, auth: str
) -> None:
    """A -ERR that echoes the password (plain or base64) and carries ESC: shown clean."""
    login_step = (
        [Expect(b"USER me", OK), ExpectAny(HOSTILE_ERR)]
        if auth == "user"
        else [ExpectAny(HOSTILE_ERR)]
    )
    script = [StartTLS(), GREETING, Expect(b"CAPA", capa(b"USER", b"SASL PLAIN")), *login_step]
    with (
        FakePop3Server(script, linger=1.0) as server,
        SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store,
    ):
        account = _account(tmp_path, server, auth=auth)
        with capture_logs() as logs:
            result = sync_account(account, store)
        config = Config(state_dir=tmp_path / "state", accounts={"acct": account})
        rows = collect_status(config, store)
    assert result.exit_code == ExitCode.AUTH
    assert result.error is not None
    shown = [result.error, result.summary(), str(rows[0].error), repr(logs)]
    out = io.StringIO()
    render_status(rows, out)
    shown.append(out.getvalue())
    b64_secret = b64(b"\0me\0" + PASSWORD.encode()).decode()
    for text in shown:
        assert PASSWORD not in text
        assert b64_secret not in text
        assert "\x1b" not in text
        assert "\x07" not in text
    assert "\\x1b]0;owned\\x07\\x1b[2Jwrong password [redacted]" in result.error


def test_flood_of_server_text_is_capped(tmp_path: Path) -> None:
    """A 15 kB -ERR line (under the 16 KiB line limit) is cut short in the run result."""
    flood = b"-ERR [SYS/PERM] " + b"A" * 15_000 + b"\r\n"
    script: list[Step] = [StartTLS(), GREETING, Expect(b"CAPA", capa(b"USER")), ExpectAny(flood)]
    with (
        FakePop3Server(script, linger=1.0) as server,
        SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store,
    ):
        result = sync_account(_account(tmp_path, server), store)
    assert result.outcome != "ok"
    assert result.error is not None
    assert len(result.error) < 1000


def test_explicit_revealing_auth_over_none_logs_in_with_one_warning(tmp_path: Path) -> None:
    """tls = none, allow_plaintext and auth = user: USER/PASS as asked, one warning per run."""
    script: list[Step] = [
        GREETING,
        Expect(b"CAPA", capa(b"USER", b"SASL SCRAM-SHA-256")),
        Expect(b"USER me", OK),
        Expect(b"PASS " + PASSWORD.encode(), OK),
        Expect(b"CAPA", capa(b"USER", b"UIDL")),
        Expect(b"UIDL", b"+OK\r\n.\r\n"),
        Expect(b"LIST", b"+OK\r\n.\r\n"),
        Expect(b"QUIT", b"+OK bye\r\n"),
    ]
    with (
        FakePop3Server(script, linger=1.0) as server,
        SeenStore.open(tmp_path / "state" / "popsync.sqlite3") as store,
    ):
        account = _account(tmp_path, server, tls="none", allow_plaintext=True)
        with capture_logs() as logs:
            result = sync_account(account, store)
    server.check()
    assert result.outcome == "ok", result.error
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == ["sending the password unencrypted"]


def test_popsync_test_never_prints_an_echoed_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`popsync test` shows the server's refusal escaped and without the password."""
    from popsync.cli import main

    script: list[Step] = [
        StartTLS(),
        GREETING,
        Expect(b"CAPA", capa(b"USER", b"SASL PLAIN \x1b[2J")),
        Expect(b"USER me", OK),
        ExpectAny(HOSTILE_ERR),
    ]
    with FakePop3Server(script, linger=1.0) as server:
        keys: dict[str, str | int | bool] = {
            "host": server.host,
            "port": server.port,
            "tls": "implicit",
            "tls_ca_file": str(server.ca_file),
            "username": "me",
            "password": PASSWORD,
            "auth": "user",
            "maildir": str(tmp_path / "Maildir"),
            "timeout": "2s",
        }
        config = tmp_path / "popsync.toml"
        config.write_text(toml_config(tmp_path / "state", {"acct": keys}))
        config.chmod(0o600)
        code = main(["test", "acct", "-c", str(config)])
    out = capsys.readouterr()
    shown = out.out + out.err
    assert code == ExitCode.AUTH, shown
    assert "wrong password [redacted]" in shown
    assert PASSWORD not in shown
    assert b64(b"\0me\0" + PASSWORD.encode()).decode() not in shown
    assert "\x1b" not in shown
