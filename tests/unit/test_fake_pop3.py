"""The scripted fake POP3 server, exercised with raw sockets."""

from __future__ import annotations

import re
import socket
import ssl
import time

import pytest

from tests.fake_pop3 import (
    Close,
    Drip,
    Expect,
    ExpectAny,
    FakePop3Server,
    Send,
    Stall,
    StartTLS,
    Step,
)

__all__: list[str] = []


def _connect(server: FakePop3Server) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=5)


def _recv_until_closed(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_script_runs_and_records_lines() -> None:
    """Sends, matches bytes and regexes, replies, and records raw lines."""
    script: list[Step] = [
        Send(b"+OK hello\r\n"),
        Expect(b"CAPA", reply=b"+OK\r\nUSER\r\n.\r\n"),
        Expect(re.compile(rb"USER \w+"), reply=b"+OK\r\n"),
        ExpectAny(reply=b"-ERR [AUTH] no\r\n"),
        Close(),
    ]
    with FakePop3Server(script) as server, _connect(server) as sock:
        sock.sendall(b"CAPA\r\nUSER alice\r\nPASS x\n")
        data = _recv_until_closed(sock)
    server.check()
    assert data == b"+OK hello\r\n+OK\r\nUSER\r\n.\r\n+OK\r\n-ERR [AUTH] no\r\n"
    assert server.received == [b"CAPA\r\n", b"USER alice\r\n", b"PASS x\n"]
    assert server.commands == [b"CAPA", b"USER alice", b"PASS x"]


def test_mismatch_is_reported_by_check() -> None:
    """A line that does not match aborts the script and makes check() raise."""
    with FakePop3Server([Expect(b"CAPA", reply=b"+OK\r\n.\r\n")]) as server:
        with _connect(server) as sock:
            sock.sendall(b"PASS secret\r\n")
            assert _recv_until_closed(sock) == b""
        with pytest.raises(AssertionError, match=r"wanted b'CAPA', got b'PASS secret\\r\\n'"):
            server.check()
    assert server.commands == [b"PASS secret"]


def test_lines_after_script_are_recorded() -> None:
    """After the script ends the server keeps recording what the client sends."""
    with FakePop3Server([Send(b"+OK\r\n")], linger=5) as server:
        with _connect(server) as sock:
            assert sock.recv(100) == b"+OK\r\n"
            sock.sendall(b"USER a\r\nPASS b\r\n")
        server.check()
    assert server.commands == [b"USER a", b"PASS b"]


def test_unconnected_script_is_an_error() -> None:
    """A script that no client ever ran is reported."""
    server = FakePop3Server([Send(b"+OK\r\n")])
    with pytest.raises(AssertionError, match="never connected"):
        server.check()


def test_start_tls_and_successive_connections() -> None:
    """StartTLS upgrades the connection; a second script serves a second connection."""
    first: list[Step] = [
        Send(b"+OK\r\n"),
        Expect(b"STLS", reply=b"+OK go\r\n"),
        StartTLS(),
        ExpectAny(),
    ]
    second: list[Step] = [StartTLS(), Send(b"+OK implicit\r\n"), Close()]
    with FakePop3Server(first, second) as server:
        ctx = server.client_context()
        with _connect(server) as raw:
            assert raw.recv(100) == b"+OK\r\n"
            raw.sendall(b"STLS\r\n")
            assert raw.recv(100) == b"+OK go\r\n"
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"CAPA\r\n")
        with ctx.wrap_socket(_connect(server), server_hostname="127.0.0.1") as tls:
            assert tls.recv(100) == b"+OK implicit\r\n"
        server.check()
    assert server.connections == 2
    assert server.commands == [b"STLS", b"CAPA"]


def test_untrusted_certificate_is_rejected() -> None:
    """StartTLS(untrusted=True) presents a certificate the client does not trust."""
    with FakePop3Server([StartTLS(untrusted=True)]) as server:
        with pytest.raises(ssl.SSLCertVerificationError):
            server.client_context().wrap_socket(_connect(server), server_hostname="localhost")
        with pytest.raises(AssertionError, match="TLS handshake failed"):
            server.check()


def test_data_before_tls_handshake_is_an_error() -> None:
    """Plaintext the client pipelines after STLS is flagged (it would be injectable)."""
    with FakePop3Server([Expect(b"STLS", reply=b"+OK\r\n"), StartTLS()]) as server:
        with _connect(server) as sock:
            sock.sendall(b"STLS\r\nUSER a\r\n")
            assert sock.recv(100) == b"+OK\r\n"
        with pytest.raises(AssertionError, match="before the TLS handshake"):
            server.check()


def test_stall_delays_and_reset_closes() -> None:
    """Stall holds the reply back; Close(reset=True) resets the connection."""
    with FakePop3Server([Stall(0.3), Send(b"+OK\r\n"), Close(reset=True)]) as server:
        with _connect(server) as sock:
            started = time.monotonic()
            assert sock.recv(100) == b"+OK\r\n"
            assert time.monotonic() - started >= 0.25
            with pytest.raises(ConnectionResetError):
                _recv_until_closed(sock)
        server.check()


def test_drip_sends_piecewise_and_a_client_that_leaves_ends_it_quietly() -> None:
    """Drip spaces its chunks out; the client closing mid-drip is not a script error."""
    with FakePop3Server([Drip(b"abcdef" * 1000, every=0.05, chunk=2)]) as server:
        with _connect(server) as sock:
            started = time.monotonic()
            got = b""
            while len(got) < 6:
                got += sock.recv(100)
            assert got.startswith(b"abcdef")
            assert time.monotonic() - started >= 0.09  # three chunks, two pauses
        server.check()
