"""The blocking POP3 client: a thin loop around the sans-I/O core and a socket stream.

:class:`Pop3Client` is what the sync engine drives. It reads whole network buffers
(256 KiB), lets :class:`~popsync.pop3.ClientConnection` cut them into events, and hands
message bodies to a caller's sink chunk by chunk, so no message is ever split into lines
or held in memory. Batches of RETR/TOP/DELE/LIST are pipelined (RFC 2449) when the
server offers PIPELINING.

Errors: a ``-ERR`` is raised as the core's typed :class:`~popsync.pop3.ServerError`
subclass and the session goes on; malformed server bytes raise
:class:`~popsync.pop3.RemoteProtocolError`, and network or TLS trouble the
:mod:`popsync.errors` classes from :mod:`popsync.net`; after either of those the
connection is closed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
from collections import deque
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Literal, Protocol, Self, TypeVar

from . import net
from .errors import ExitCode, NetworkError, PopsyncError, TlsError
from .pop3 import (
    DEFAULT_MAX_LINE,
    Capabilities,
    ClientConnection,
    Command,
    Continuation,
    Event,
    Greeting,
    LocalProtocolError,
    MessageChunk,
    MessageEnd,
    MessageStart,
    NeedData,
    Ok,
    Pop3Error,
    RemoteProtocolError,
    ScanEntries,
    ScanListing,
    ServerError,
    State,
    UidlEntries,
    UidlListing,
    commands,
    sasl,
)

__all__ = [
    "DEFAULT_PIPELINE_WINDOW",
    "DEFAULT_TIMEOUT",
    "MAX_SASL_ROUNDS",
    "ConnectionLost",
    "MessageTooLarge",
    "NoSafeMechanism",
    "PlaintextRefused",
    "Pop3Client",
    "Sink",
    "StartTlsUnavailable",
    "TlsMode",
]

#: Seconds to wait for the server on connect and on every read.
DEFAULT_TIMEOUT = 60.0

#: Commands kept in flight when pipelining. Each is ~12 octets, so the whole window
#: (about 3 KiB) is far below any TCP send buffer: sending can never block while replies pile up
#: unread, which is the deadlock RFC 2449 section 6.6 warns about.
DEFAULT_PIPELINE_WINDOW = 256

#: RFC 2449 section 4: a command line, CRLF included, is at most 255 octets.
_MAX_COMMAND = 255

TlsMode = Literal["implicit", "starttls", "none"]
T = TypeVar("T")


class Sink(Protocol):
    """Where a message body goes: anything with ``write(bytes)`` (a file, a BytesIO)."""

    def write(self, data: bytes, /) -> object: ...


class PlaintextRefused(LocalProtocolError):
    """A credential would have crossed an unencrypted connection; nothing was sent."""


class NoSafeMechanism(PlaintextRefused, PopsyncError):
    """``auto`` over clear text found no mechanism that keeps the password secret.

    Nothing was sent. Exit code 78 (configuration), not 77: the server refused nothing,
    and retrying cannot help; the user has to choose TLS or, knowingly, a revealing
    mechanism (``auth = "user"`` with ``allow_plaintext = true``). A server that suddenly
    stops offering SCRAM or APOP may also have a man in the middle stripping them.
    """

    exit_code = ExitCode.CONFIG


class MessageTooLarge(Pop3Error):
    """A message grew past ``max_size``; the connection was closed (RETR cannot be aborted).

    ``received`` is how many octets had arrived when it was cut off (a lower bound).
    """

    def __init__(self, message: str, received: int = 0) -> None:
        super().__init__(message)
        self.received = received


class ConnectionLost(NetworkError):
    """The server closed the connection while a reply was still expected."""


class StartTlsUnavailable(TlsError):
    """TLS was required but the server does not offer STLS; no credential was sent.

    Not retried silently: a server that stops offering STLS may be under a downgrade
    attack, so an operator has to look (exit code 76, like a bad certificate).
    """

    exit_code = ExitCode.PROTOCOL


_AUTO_ORDER = sasl.SASL_PREFERENCE
_LOGIN_VERBS = {"user", "apop", "rpop"}
#: What ``auto`` may pick over an unencrypted connection, strongest first (then APOP):
#: mechanisms that prove knowledge of the password without sending it.
_HIDING_ORDER = tuple(name for name in _AUTO_ORDER if name not in sasl.REVEALING)

#: Server challenges answered in one SASL exchange before popsync gives up. The longest
#: exchange it speaks (SCRAM, or PLAIN re-sent after an empty challenge) needs two.
MAX_SASL_ROUNDS = 10


class Pop3Client:
    """One POP3 session over a :class:`~popsync.net.Stream`; use :meth:`connect`."""

    def __init__(
        self,
        stream: net.Stream,
        *,
        max_line: int = DEFAULT_MAX_LINE,
        pipelining: bool = True,
        pipeline_window: int = DEFAULT_PIPELINE_WINDOW,
    ) -> None:
        self._stream: net.Stream | None = stream
        self._where = stream.where
        self.host = stream.host
        self.port = stream.port
        self._conn = ClientConnection(max_line=max_line)
        self._caps: dict[str, tuple[str, ...]] | None = None
        self._eof = False
        self.pipelining = pipelining
        self.pipeline_window = max(1, pipeline_window)
        self.utf8_enabled = False
        # Whether the server has said PIPELINING in any CAPA so far; survives the cache
        # reset at login, so the post-login CAPA can itself be pipelined (RFC 2449).
        self._pipelining_seen = False
        #: The last single-line ``+OK`` (its ``raw`` line is what poplib returns).
        self.last_ok: Ok | None = None
        self.welcome: Greeting = self._read_greeting()

    # ------------------------------------------------------------------ opening
    @classmethod
    def connect(
        cls,
        host: str,
        port: int,
        *,
        tls: TlsMode,
        context: net.SSLContext | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_line: int = DEFAULT_MAX_LINE,
        server_hostname: str | None = None,
        pipelining: bool = True,
        pace: net.Pace | None = None,
        on_activity: Callable[[], None] | None = None,
    ) -> Self:
        """Connect, read the greeting and, for ``tls="starttls"``, upgrade with STLS.

        ``context`` defaults to :func:`popsync.net.default_context` (verified) whenever
        TLS is used. With ``"starttls"`` a server that does not offer STLS raises
        :class:`StartTlsUnavailable` before anything but CAPA was sent. ``pace`` bounds
        the whole of it (and what follows, until :meth:`set_pace`): e.g. a login phase
        budget; ``on_activity`` is called whenever data arrives.
        """
        if tls not in ("implicit", "starttls", "none"):
            raise LocalProtocolError(f"tls must be implicit, starttls or none, not {tls!r}")
        if tls != "none" and context is None:
            context = net.default_context()
        stream = net.connect(
            host,
            port,
            timeout=timeout,
            context=context if tls == "implicit" else None,
            server_hostname=server_hostname,
            pace=pace,
        )
        stream.on_activity = on_activity
        try:
            client = cls(stream, max_line=max_line, pipelining=pipelining)
            if tls == "starttls":
                assert context is not None
                if "STLS" not in client.capabilities():
                    raise StartTlsUnavailable(
                        f"{stream.where}: TLS is required but the server does not offer STLS"
                    )
                client.stls(context, server_hostname or host)
        except BaseException:
            stream.close()
            raise
        return client

    def _read_greeting(self) -> Greeting:
        try:
            event = self._next()
        except ServerError:
            self.close()
            raise
        return self._expect(event, Greeting)

    # --------------------------------------------------------------- properties
    @property
    def is_tls(self) -> bool:
        """True when the session is encrypted."""
        return self._stream is not None and self._stream.is_tls

    @property
    def tls_version(self) -> str | None:
        """The TLS protocol version, for logs."""
        return self._stream.tls_version if self._stream is not None else None

    @property
    def cipher(self) -> str | None:
        """The TLS cipher suite, for logs."""
        return self._stream.cipher if self._stream is not None else None

    def peer_certificate(self) -> bytes | None:
        """The server's certificate (DER) once the session is encrypted, else None."""
        return self._stream.peer_certificate() if self._stream is not None else None

    @property
    def state(self) -> State:
        """The POP3 session state confirmed by the server."""
        return self._conn.state

    @property
    def closed(self) -> bool:
        """True once the connection is closed (by :meth:`close`, QUIT or an error)."""
        return self._stream is None

    def set_pace(self, pace: net.Pace) -> None:
        """Enter a new phase: its budget and minimum rate bound every read and send.

        Running out raises :class:`popsync.net.PhaseTimeout` (exit code 75) naming the
        phase, and closes the connection like any network error.
        """
        self._live_stream().set_pace(pace)

    # --------------------------------------------------------------- plumbing
    def _live_stream(self) -> net.Stream:
        if self._stream is None:
            raise LocalProtocolError("the POP3 connection is closed")
        return self._stream

    def _fill(self) -> None:
        data = self._live_stream().recv(net.DEFAULT_RECV_SIZE)
        if not data:
            self._eof = True
        self._conn.receive_data(data)

    def _next(self) -> Event:
        """Return the next event; close the connection on anything but a ``-ERR``."""
        try:
            while True:
                event = self._conn.next_event()
                if not isinstance(event, NeedData):
                    return event
                self._fill()
        except ServerError:
            raise
        except RemoteProtocolError as exc:
            self.close()
            if self._eof:
                raise ConnectionLost(f"{self._where}: {exc}") from exc
            raise
        except BaseException:
            self.close()
            raise

    def _expect(self, event: Event, kind: type[T]) -> T:
        if not isinstance(event, kind):
            self.close()
            if self._eof:
                raise ConnectionLost(f"{self._where}: connection closed by server")
            raise RemoteProtocolError(f"expected {kind.__name__} from server, got {event!r}")
        return event

    def _send(self, *cmds: Command) -> None:
        data = b"".join(self._conn.send(cmd) for cmd in cmds)
        stream = self._live_stream()
        try:
            stream.sendall(data)
        except BaseException:
            self.close()
            raise

    def request(self, command: Command) -> Event:
        """Send one command and return its first reply event (low level; used by poplib).

        For RETR/TOP the result is a :class:`MessageStart`; read the body with
        :meth:`read_body_into` before sending anything else.
        """
        self._send(command)
        return self._next()

    def simple(self, command: Command) -> Ok:
        """Send a single-line command and return its ``+OK``."""
        self.last_ok = self._expect(self.request(command), Ok)
        return self.last_ok

    def read_body_into(self, sink: Sink, max_size: int | None = None) -> int:
        """Stream the body after a :class:`MessageStart` into ``sink``; return its size.

        This is the hot path: whole chunks go straight to ``sink.write``.
        """
        conn = self._conn
        write = sink.write
        total = 0
        try:
            while True:
                event = conn.next_event()
                if type(event) is MessageChunk:
                    total += len(event.data)
                    if max_size is not None and total > max_size:
                        raise MessageTooLarge(
                            f"{self._where}: message is larger than the {max_size}-octet limit",
                            received=total,
                        )
                    write(event.data)
                elif isinstance(event, NeedData):
                    self._fill()
                elif isinstance(event, MessageEnd):
                    return total
                else:
                    raise RemoteProtocolError(f"unexpected {event!r} inside a message body")
        except RemoteProtocolError as exc:
            self.close()
            if self._eof:
                raise ConnectionLost(f"{self._where}: {exc}") from exc
            raise
        except BaseException:
            # Mid-body the session cannot continue (POP3 has no way to abort a RETR).
            self.close()
            raise

    # ------------------------------------------------------------ capabilities
    def capabilities(self, refresh: bool = False) -> dict[str, tuple[str, ...]]:
        """Return CAPA as ``{NAME: (args, ...)}``; cached until STLS or login.

        A server that answers CAPA with ``-ERR`` (RFC 1939-only) gives an empty dict.
        """
        if self._caps is None or refresh:
            try:
                event = self.request(commands.capa())
            except ServerError:
                self._caps = {}
            else:
                self._remember_caps(self._expect(event, Capabilities).caps)
        return dict(self._caps or {})

    def _remember_caps(self, caps: dict[str, tuple[str, ...]]) -> None:
        self._caps = dict(caps)
        self._pipelining_seen = self._pipelining_seen or "PIPELINING" in caps

    @property
    def may_pipeline(self) -> bool:
        """True when pipelining is enabled here and the server has announced PIPELINING."""
        return self.pipelining and self._pipelining_seen

    def stls(self, context: net.SSLContext, server_hostname: str | None = None) -> str:
        """Upgrade the session with STLS (RFC 2595); return the ``+OK`` text.

        Bytes that arrive with the ``+OK`` were not protected by TLS (a STARTTLS
        injection): the session is aborted with :class:`RemoteProtocolError`.
        """
        stream = self._live_stream()
        if stream.is_tls:
            raise LocalProtocolError("STLS: the session is already encrypted")
        ok = self.simple(commands.stls())
        if self._conn.pending_bytes:
            self.close()
            raise RemoteProtocolError("server sent data after its STLS reply (possible injection)")
        try:
            stream.start_tls(context, server_hostname or self.host)
        except BaseException:
            self.close()
            raise
        self._caps = None  # RFC 2595: what was learned in clear text is void
        return ok.text

    def utf8(self) -> str:
        """Switch the session to UTF-8 mode (RFC 6856); AUTHORIZATION state only."""
        ok = self.simple(commands.utf8())
        self.utf8_enabled = True
        return ok.text

    # ----------------------------------------------------------- authentication
    def login(
        self,
        user: str,
        secret: str,
        *,
        mechanism: str = "auto",
        allow_plaintext: bool = False,
        oauth_two_step: bool = False,
        utf8: bool = False,
    ) -> str:
        """Authenticate and return the server's ``+OK`` text.

        ``mechanism`` is ``"auto"``, ``"user"``, ``"apop"``, ``"rpop"`` (``secret`` is
        the RPOP argument, RFC 1081) or a SASL name (also XOAUTH2 and OAUTHBEARER, where
        ``secret`` is the token). An explicit mechanism is used as asked, never replaced
        by another. ``"auto"`` over TLS picks the strongest SASL mechanism offered among
        SCRAM-SHA-256, CRAM-MD5, PLAIN, LOGIN; then APOP when the greeting has a
        timestamp; then USER/PASS. Over clear text it only ever picks one that does not
        reveal the password (SCRAM-SHA-256, CRAM-MD5, then APOP) and raises
        :class:`NoSafeMechanism` when there is none.

        No credential is sent over a clear-text connection unless ``allow_plaintext``.
        With ``utf8`` the UTF8 command is sent first when CAPA lists it. A refusal raises
        :class:`~popsync.pop3.AuthFailed` (``[AUTH]``) or another
        :class:`~popsync.pop3.ServerError`; a server that fails SCRAM's proof of its own
        identity raises :class:`~popsync.pop3.SaslAuthError`.
        """
        if not self.is_tls and not allow_plaintext:
            raise PlaintextRefused(
                f"{self._where}: refusing to send credentials over an unencrypted connection "
                "(use TLS, or allow plaintext explicitly)"
            )
        if utf8 and not self.utf8_enabled and "UTF8" in self.capabilities():
            self.utf8()
        choice = self._choose_mechanism(mechanism)
        if choice == "user":
            text = self._user_pass(user, secret)
        elif choice == "apop":
            stamp = self.welcome.timestamp
            if stamp is None:
                raise LocalProtocolError("APOP: the server greeting has no timestamp")
            text = self.simple(commands.apop(user, sasl.apop_digest(stamp, secret))).text
        elif choice == "rpop":
            self.simple(commands.user(user))
            text = self.simple(commands.rpop(secret)).text
        else:
            text = self._authenticate(choice, user, secret, oauth_two_step)
        self._caps = None  # servers announce more (PIPELINING, TOP) after login
        return text

    def _user_pass(self, user: str, secret: str) -> str:
        """USER then PASS; in one round trip when the server announced PIPELINING."""
        if not (self.may_pipeline and "PIPELINING" in self.capabilities()):
            self.simple(commands.user(user))
            return self.simple(commands.pass_(secret)).text
        self._send(commands.user(user), commands.pass_(secret))
        try:
            self._expect(self._next(), Ok)
        except ServerError:
            # PASS was refused along with USER; read its reply to stay in step.
            with contextlib.suppress(ServerError):
                self._next()
            raise
        self.last_ok = self._expect(self._next(), Ok)
        return self.last_ok.text

    def listings(self) -> tuple[list[tuple[int, bytes]], dict[int, int]]:
        """UIDL and LIST (and CAPA, if not yet asked since login) in one round trip.

        Sequential when the server never announced PIPELINING.
        """
        uidls, sizes = self.listing_entries()
        return list(uidls), dict(sizes)

    def listing_entries(self) -> tuple[UidlEntries, ScanEntries]:
        """:meth:`listings` in the core's compact form (arrays, not a tuple per message).

        For mailboxes that list millions of messages: see :mod:`popsync.listing`.
        """
        if not self.may_pipeline:
            return self.uidl_entries(), self.scan_entries()
        self._send_after_capa(commands.uidl(), commands.list_())
        try:
            uidls = self._expect(self._next(), UidlListing).entries
        except ServerError:
            with contextlib.suppress(ServerError):
                self._next()  # LIST's reply is still on its way: stay in step
            raise
        return uidls, self._expect(self._next(), ScanListing).entries

    def uidl_entries(self) -> UidlEntries:
        """UIDL alone (and CAPA, if not yet asked since login), pipelined when allowed."""
        if not self.may_pipeline:
            self.capabilities()
            return self._expect(self.request(commands.uidl()), UidlListing).entries
        self._send_after_capa(commands.uidl())
        return self._expect(self._next(), UidlListing).entries

    def _send_after_capa(self, *sent: Command) -> None:
        """Send ``sent`` pipelined, after a CAPA (its reply read here) if none since login."""
        ask_caps = self._caps is None
        self._send(*([commands.capa()] if ask_caps else []), *sent)
        if ask_caps:
            try:
                self._remember_caps(self._expect(self._next(), Capabilities).caps)
            except ServerError:
                self._caps = {}

    def scan_entries(self) -> ScanEntries:
        """LIST alone, in the core's compact form."""
        return self._expect(self.request(commands.list_()), ScanListing).entries

    def _choose_mechanism(self, mechanism: str) -> str:
        """The one rule: explicit is honoured as is; ``auto`` never reveals over clear text."""
        choice = mechanism.lower()
        if choice in _LOGIN_VERBS:
            return choice
        if choice != "auto":
            if mechanism.upper() not in sasl.MECHANISMS:
                raise LocalProtocolError(f"unsupported authentication mechanism {mechanism!r}")
            return mechanism.upper()
        offered = {name.upper() for name in self.capabilities().get("SASL", ())}
        encrypted = self.is_tls
        for name in _AUTO_ORDER if encrypted else _HIDING_ORDER:
            if name in offered:
                return name
        if self.welcome.timestamp is not None:
            return "apop"
        if not encrypted:
            raise NoSafeMechanism(
                f"{self._where}: the server offers no login that keeps the password secret "
                f"over an unencrypted connection ({', '.join(_HIDING_ORDER)} or APOP), so "
                'auth = "auto" sent nothing; use TLS, or set auth = "user" together with '
                "allow_plaintext = true to send the password in clear text anyway"
            )
        return "user"

    def _authenticate(self, name: str, user: str, secret: str, two_step: bool) -> str:
        """Run one SASL exchange (RFC 5034)."""
        mech = sasl.make_mechanism(
            name, user, secret, two_step=two_step, host=self.host, port=self.port
        )
        initial = mech.initial()
        pending: bytes | None = None
        if initial is None:
            self._send(commands.auth(name))
        else:
            encoded = base64.b64encode(initial) or b"="
            if len(b"AUTH " + name.encode() + b" " + encoded + b"\r\n") <= _MAX_COMMAND:
                self._send(commands.auth(name, encoded))
            else:
                # Too long for the AUTH line: send it after the server's empty challenge.
                self._send(commands.auth(name))
                pending = base64.b64encode(initial)
        for _round in range(MAX_SASL_ROUNDS + 1):
            event = self._next()
            if isinstance(event, Ok):
                try:
                    mech.succeeded()
                except RemoteProtocolError:
                    # Logged in as far as the server is concerned, but it is not trusted:
                    # drop the connection without a single further command.
                    self.close()
                    raise
                return event.text
            challenge = self._expect(event, Continuation)
            if _round == MAX_SASL_ROUNDS:
                break
            if pending is not None:
                answer, pending = pending, None
            else:
                answer = self._sasl_step(mech, challenge.data)
            self._send_raw(self._conn.send_sasl(answer))
        with contextlib.suppress(Exception):
            self._cancel_sasl()
        self.close()
        raise RemoteProtocolError(
            f"{self._where}: AUTH {name}: server sent more than {MAX_SASL_ROUNDS} challenges"
        )

    def _sasl_step(self, mech: sasl.Mechanism, data: bytes) -> bytes:
        try:
            try:
                decoded = base64.b64decode(data, validate=True)
            except binascii.Error:
                raise RemoteProtocolError(f"SASL challenge is not base64: {data[:40]!r}") from None
            return base64.b64encode(mech.step(decoded))
        except RemoteProtocolError:
            # The first complaint is the one worth reporting, not a garbled cancel reply.
            with contextlib.suppress(Exception):
                self._cancel_sasl()
            self.close()
            raise

    def _cancel_sasl(self) -> None:
        """Send ``*`` and read the server's reply to it (RFC 5034 section 4)."""
        self._send_raw(self._conn.send_sasl(b"*"))
        try:
            event = self._next()
        except ServerError:
            return
        # Anything but -ERR after a cancel (even +OK) leaves a session we cannot trust.
        self.close()
        if isinstance(event, Ok):
            return
        raise RemoteProtocolError(f"unexpected reply to a SASL cancel: {event!r}")

    def _send_raw(self, data: bytes) -> None:
        try:
            self._live_stream().sendall(data)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------- transaction
    def stat(self) -> tuple[int, int]:
        """Return ``(message count, mailbox size in octets)``."""
        ok = self.simple(commands.stat())
        parts = ok.text.split()
        if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
            self.close()
            raise RemoteProtocolError(f"bad STAT reply: {ok.raw[:80]!r}")
        return int(parts[0]), int(parts[1])

    def scan_listing(self) -> dict[int, int]:
        """Return LIST as ``{message number: size in octets}``."""
        return dict(self._expect(self.request(commands.list_()), ScanListing).entries)

    def uidl_listing(self) -> list[tuple[int, bytes]]:
        """Return UIDL as ``[(message number, unique id bytes), ...]`` in server order."""
        return list(self._expect(self.request(commands.uidl()), UidlListing).entries)

    def retr_into(self, msgnum: int, sink: Sink, *, max_size: int | None = None) -> int:
        """RETR ``msgnum`` straight into ``sink``; return the number of octets written.

        On a ``-ERR`` nothing was written and the session goes on. If the connection
        drops midway (:class:`ConnectionLost`), the sink holds a partial message: the
        caller must discard it.
        """
        self._expect(self.request(commands.retr(msgnum)), MessageStart)
        return self.read_body_into(sink, max_size)

    def top(self, msgnum: int, lines: int) -> bytes:
        """Return the header and the first ``lines`` body lines of a message (TOP)."""
        buffer = io.BytesIO()
        self._expect(self.request(commands.top(msgnum, lines)), MessageStart)
        self.read_body_into(buffer)
        return buffer.getvalue()

    def retr_many(
        self,
        msgnums: Iterable[int],
        sink_factory: Callable[[int], Sink],
        on_done: Callable[[int, Sink, int], None],
        *,
        max_size: int | None = None,
    ) -> None:
        """RETR every message, pipelined when the server offers PIPELINING.

        ``sink_factory(n)`` is called when message ``n`` starts arriving (not for a
        ``-ERR``), ``on_done(n, sink, size)`` once it is complete. A ``-ERR`` stops new
        commands; the ones in flight are finished normally, then the first error is
        raised. Any other error closes the connection (the sink of the message being
        received then holds a partial message).
        """
        self._fetch_many(msgnums, commands.retr, sink_factory, on_done, max_size)

    def top_many(
        self,
        msgnums: Iterable[int],
        lines: int,
        sink_factory: Callable[[int], Sink],
        on_done: Callable[[int, Sink, int], None],
    ) -> None:
        """TOP ``lines`` of every message, pipelined like :meth:`retr_many`."""
        self._fetch_many(msgnums, lambda n: commands.top(n, lines), sink_factory, on_done, None)

    def _fetch_many(
        self,
        msgnums: Iterable[int],
        make: Callable[[int], Command],
        sink_factory: Callable[[int], Sink],
        on_done: Callable[[int, Sink, int], None],
        max_size: int | None,
    ) -> None:
        def read(msgnum: int) -> None:
            self._expect(self._next(), MessageStart)
            sink = sink_factory(msgnum)
            on_done(msgnum, sink, self.read_body_into(sink, max_size))

        self._pipeline(msgnums, make, read)

    def dele_many(
        self, msgnums: Iterable[int], *, keep_going: bool = False
    ) -> list[tuple[int, ServerError]]:
        """Mark messages deleted (pipelined when possible); QUIT commits them.

        By default the first ``-ERR`` stops new DELEs and is raised. With ``keep_going``
        every DELE is sent and the refusals are returned as ``(msgnum, error)`` pairs, so
        one message the server will not delete does not keep the others on it.
        """
        refused: list[tuple[int, ServerError]] = []

        def read(msgnum: int) -> None:
            try:
                self._expect(self._next(), Ok)
            except ServerError as exc:
                if not keep_going:
                    raise
                refused.append((msgnum, exc))

        self._pipeline(msgnums, commands.dele, read)
        return refused

    def scan_many(self, msgnums: Iterable[int]) -> dict[int, int]:
        """``LIST n`` for each message (pipelined when possible); ``{n: size}``."""
        sizes: dict[int, int] = {}

        def read(msgnum: int) -> None:
            parts = self._expect(self._next(), Ok).text.split()
            if len(parts) < 2 or not parts[1].isdigit():
                self.close()
                raise RemoteProtocolError(f"bad LIST reply for message {msgnum}: {parts!r}")
            sizes[msgnum] = int(parts[1])

        self._pipeline(msgnums, commands.list_, read)
        return sizes

    def _window(self) -> int:
        if self.pipelining and "PIPELINING" in self.capabilities():
            return self.pipeline_window
        return 1

    def _pipeline(
        self,
        items: Iterable[int],
        make: Callable[[int], Command],
        read: Callable[[int], object],
    ) -> None:
        """Keep up to a window of commands in flight; read replies strictly in order.

        New commands are sent only between replies, and only when half the window has
        drained, so writes are batched and never compete with unread replies.
        """
        window = self._window()
        todo = iter(items)
        inflight: deque[int] = deque()
        first_error: ServerError | None = None
        exhausted = False
        try:
            while True:
                if first_error is None and not exhausted and len(inflight) <= window // 2:
                    batch: list[Command] = []
                    while len(inflight) + len(batch) < window:
                        item = next(todo, None)
                        if item is None:
                            exhausted = True
                            break
                        batch.append(make(item))
                        inflight.append(item)
                    if batch:
                        self._send(*batch)
                if not inflight:
                    break
                item = inflight.popleft()
                try:
                    read(item)
                except ServerError as exc:
                    first_error = first_error or exc
        except BaseException:
            if self._conn.outstanding:
                # Replies (or the rest of a body) still unread: the session is out of step.
                self.close()
            raise
        if first_error is not None:
            raise first_error

    def noop(self) -> str:
        """NOOP; return the ``+OK`` text."""
        return self.simple(commands.noop()).text

    def rset(self) -> str:
        """Unmark every message marked deleted in this session."""
        return self.simple(commands.rset()).text

    def quit(self) -> str:
        """QUIT and close; return the ``+OK`` text.

        In TRANSACTION state the ``+OK`` means the server committed the DELEs; a
        ``-ERR`` (e.g. some could not be removed) is raised after closing.
        """
        try:
            return self.simple(commands.quit()).text
        finally:
            self.close()

    def close(self) -> None:
        """Close the connection without QUIT (nothing is deleted); safe to call twice."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
