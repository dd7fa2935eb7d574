"""A scripted, threaded fake POP3 server for hostile and unusual server behaviour.

A script is a list of steps run against one client connection::

    with FakePop3Server([
        Send(b"+OK hi\\r\\n"),
        Expect(b"CAPA", reply=b"+OK\\r\\nUSER\\r\\n.\\r\\n"),
        Expect(re.compile(rb"USER \\S+"), reply=b"+OK\\r\\n"),
        Close(),
    ]) as server:
        ...drive a client against server.host, server.port...
    server.check()                       # raises AssertionError listing every mismatch
    assert not any(c.startswith(b"PASS") for c in server.commands)

Several scripts serve successive connections, one each. ``StartTLS()`` as the first step
gives implicit TLS. When a script ends without ``Close()``, the server keeps reading (and
recording) until the client closes or ``linger`` seconds pass, so a test can see what a
client sent after the scripted part, e.g. a PASS it should never have sent.
"""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType

import trustme

__all__ = [
    "Close",
    "Drip",
    "Expect",
    "ExpectAny",
    "FakePop3Server",
    "Send",
    "Stall",
    "StartTLS",
    "Step",
    "fake_ca_file",
]

_MAX_LINE = 1 << 20


@dataclass(frozen=True)
class Send:
    """Send these bytes verbatim (include the CRLFs)."""

    data: bytes


@dataclass(frozen=True)
class Expect:
    """Read one command line; it must equal ``pattern`` (bytes) or fullmatch it (regex).

    The line is compared without its line ending. ``reply`` is sent after a match.
    """

    pattern: bytes | re.Pattern[bytes]
    reply: bytes | None = None


@dataclass(frozen=True)
class ExpectAny:
    """Read one line, whatever it is; then send ``reply`` if given."""

    reply: bytes | None = None


@dataclass(frozen=True)
class StartTLS:
    """Do a server-side TLS handshake; ``untrusted`` presents a cert from an unknown CA.

    ``legacy`` offers nothing newer than TLS 1.1; a client that refuses it ends the script
    there without an error (the refusal is what such a test expects).
    """

    untrusted: bool = False
    legacy: bool = False


@dataclass(frozen=True)
class Stall:
    """Say nothing for ``seconds`` (cut short when the server is closed)."""

    seconds: float


@dataclass(frozen=True)
class Drip:
    """Send ``data`` ``chunk`` bytes at a time, ``every`` seconds apart (a slow or hostile server).

    The client giving up (a failed send) ends the script quietly: that is what a test of a
    drip-fed client expects. Closing the server ends the drip too.
    """

    data: bytes
    every: float
    chunk: int = 1


@dataclass(frozen=True)
class Close:
    """Close the connection now; ``reset`` sends a TCP RST instead of a FIN."""

    reset: bool = False


Step = Send | Expect | ExpectAny | StartTLS | Stall | Drip | Close


class _ScriptAbort(Exception):
    """Internal: stop running the current script (the reason is already recorded)."""


@dataclass(frozen=True)
class _TlsFiles:
    ca_file: Path
    context: ssl.SSLContext
    untrusted_context: ssl.SSLContext
    legacy_context: ssl.SSLContext


def _server_context(ca: trustme.CA, *, legacy: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    if legacy:  # a server stuck at TLS 1.1 (OpenSSL 3 needs security level 0 for it)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@cache
def _tls_files() -> _TlsFiles:
    """One CA per test process: certificate generation is the slow part."""
    ca = trustme.CA()
    tmp = tempfile.mkdtemp(prefix="popsync-fake-pop3-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    ca_file = Path(tmp) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return _TlsFiles(
        ca_file,
        _server_context(ca),
        _server_context(trustme.CA()),
        _server_context(ca, legacy=True),
    )


def fake_ca_file() -> Path:
    """PEM file of the CA that signs the fake server's certificate."""
    return _tls_files().ca_file


class FakePop3Server:
    """Serve ``scripts`` (one per connection, in order) on 127.0.0.1:<free port>."""

    host = "127.0.0.1"

    def __init__(
        self, *scripts: Sequence[Step], timeout: float = 10.0, linger: float = 5.0
    ) -> None:
        self.scripts = [list(s) for s in scripts]
        self.timeout = timeout
        self.linger = linger
        self.received: list[bytes] = []
        self.errors: list[str] = []
        self.connections = 0
        #: Handshakes a client refused at a StartTLS(legacy=True) step.
        self.legacy_refused = 0
        self.ca_file = fake_ca_file()
        self._stop = threading.Event()
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="fake-pop3", daemon=True)
        self._thread.start()

    # -- test-facing API ---------------------------------------------------------

    @property
    def commands(self) -> list[bytes]:
        """Received lines without their line endings."""
        return [line.rstrip(b"\r\n") for line in self.received]

    def client_context(self) -> ssl.SSLContext:
        """A client SSL context that trusts this server's certificate."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def close(self) -> None:
        """Stop accepting, wait for the running script to finish, free the port."""
        self._stop.set()
        self._thread.join(self.timeout + self.linger + 5)
        self._listener.close()

    def check(self) -> None:
        """Finish like :meth:`close`, then raise AssertionError if any step mismatched."""
        self.close()
        if self._thread.is_alive():
            self.errors.append("server thread did not finish")
        if self.errors:
            raise AssertionError("fake POP3 server: " + "; ".join(self.errors))

    def __enter__(self) -> FakePop3Server:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- server thread -----------------------------------------------------------

    def _serve(self) -> None:
        for index, script in enumerate(self.scripts):
            sock = self._accept()
            if sock is None:
                self.errors.append(f"script {index}: client never connected")
                return
            self.connections += 1
            _Session(self, index, sock).run(script)

    def _accept(self) -> socket.socket | None:
        while not self._stop.is_set():
            try:
                sock, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return None
            sock.settimeout(self.timeout)
            return sock
        return None


class _Session:
    """One connection running one script."""

    def __init__(self, server: FakePop3Server, index: int, sock: socket.socket) -> None:
        self.server = server
        self.index = index
        self.sock: socket.socket = sock
        self.buffer = b""

    def fail(self, step: int, message: str) -> _ScriptAbort:
        self.server.errors.append(f"script {self.index} step {step}: {message}")
        return _ScriptAbort()

    def run(self, script: list[Step]) -> None:
        try:
            for n, step in enumerate(script):
                if isinstance(step, Close):
                    self.close(reset=step.reset)
                    return
                self.run_step(n, step)
            self.drain()
        except _ScriptAbort:
            pass
        finally:
            self.close(reset=False)

    def run_step(self, n: int, step: Step) -> None:
        if isinstance(step, Send):
            self.send(n, step.data)
        elif isinstance(step, Expect | ExpectAny):
            line = self.read_line(n, repr(step))
            if line is None:
                raise self.fail(n, f"client closed the connection; wanted {step!r}")
            if isinstance(step, Expect) and not _matches(step.pattern, line.rstrip(b"\r\n")):
                raise self.fail(n, f"wanted {step.pattern!r}, got {line!r}")
            if step.reply is not None:
                self.send(n, step.reply)
        elif isinstance(step, StartTLS):
            self.start_tls(n, step)
        elif isinstance(step, Stall):
            self.server._stop.wait(step.seconds)
        elif isinstance(step, Drip):
            self.drip(step)

    def drip(self, step: Drip) -> None:
        for start in range(0, len(step.data), step.chunk):
            try:
                self.sock.sendall(step.data[start : start + step.chunk])
            except OSError:
                raise _ScriptAbort from None  # the client gave up, as it should
            if self.server._stop.wait(step.every):
                raise _ScriptAbort

    def send(self, n: int, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise self.fail(n, f"send failed: {exc!r}") from None

    def read_line(self, n: int, wanted: str, deadline: float | None = None) -> bytes | None:
        """Return one line with its ending, or None at EOF (or at ``deadline``)."""
        while b"\n" not in self.buffer:
            if len(self.buffer) > _MAX_LINE:
                raise self.fail(n, f"line longer than {_MAX_LINE} bytes")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if deadline is not None:
                    return None
                raise self.fail(n, f"timed out waiting for {wanted}") from None
            except OSError as exc:
                raise self.fail(n, f"receive failed: {exc!r}") from None
            if not data:
                if self.buffer:  # an unterminated last line is still worth recording
                    self.server.received.append(self.buffer)
                    self.buffer = b""
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        line += b"\n"
        self.server.received.append(line)
        return line

    def start_tls(self, n: int, step: StartTLS) -> None:
        if self.buffer:
            raise self.fail(n, f"client sent {self.buffer!r} before the TLS handshake")
        files = _tls_files()
        ctx = files.untrusted_context if step.untrusted else files.context
        if step.legacy:
            ctx = files.legacy_context
        try:
            self.sock = ctx.wrap_socket(self.sock, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            if step.legacy:
                self.server.legacy_refused += 1
                raise _ScriptAbort from None
            raise self.fail(n, f"TLS handshake failed: {exc!r}") from None

    def drain(self) -> None:
        """Record whatever the client still sends until it closes or linger runs out."""
        deadline = time.monotonic() + self.server.linger
        with contextlib.suppress(_ScriptAbort):
            while self.read_line(-1, "anything", deadline) is not None:
                pass

    def close(self, *, reset: bool) -> None:
        with contextlib.suppress(OSError):
            if reset:
                # SO_LINGER with a zero timeout turns close() into a TCP RST.
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()


def _matches(pattern: bytes | re.Pattern[bytes], line: bytes) -> bool:
    if isinstance(pattern, bytes):
        return line == pattern
    return pattern.fullmatch(line) is not None
