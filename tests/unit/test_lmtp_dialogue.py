"""The LMTP dialogue against a scripted server: verdict mixes, no PIPELINING, kept sessions.

Dovecot (tests/integration/test_deliver_lmtp.py) never refuses a MAIL FROM, never omits
PIPELINING and never drops an idle client within a test's time, so those cases are played
here by a small threaded server on a unix socket that decides each reply from a table.
"""

from __future__ import annotations

import io
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from popsync.deliver.base import Delivered, Rejected, Spooled, Temporary
from popsync.deliver.budget import SessionBudget
from popsync.deliver.lmtp import LmtpTarget

__all__: list[str] = []

#: reply(command, transaction) for MAIL/RCPT/DATA and the end of data; None = "250 ok".
Verdict = Callable[[str, int], bytes | None]


@dataclass
class _Connection:
    """What one client connection sent: commands and message bodies, in order."""

    commands: list[str] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)


class FakeLmtp:
    """An LMTP server on ``path`` whose replies come from ``verdict``; records every session."""

    def __init__(self, path: Path, verdict: Verdict, *, pipelining: bool = True) -> None:
        self.path = path
        self.verdict = verdict
        self.pipelining = pipelining
        self.connections: list[_Connection] = []
        self.transactions = 0
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        record = _Connection()
        self.connections.append(record)
        with sock, sock.makefile("rb") as reader:
            sock.sendall(b"220 fake LMTP\r\n")
            while line := reader.readline():
                command = line.rstrip(b"\r\n").decode()
                record.commands.append(command)
                verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
                if verb == "LHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    sock.sendall(b"250-fake\r\n" + extra + b"250 8BITMIME\r\n")
                elif verb == "QUIT":
                    sock.sendall(b"221 bye\r\n")
                    return
                elif verb == "RSET":
                    sock.sendall(b"250 reset\r\n")
                elif verb == "MAIL":
                    self.transactions += 1
                    sock.sendall(self._reply("MAIL", b"250 sender ok"))
                elif verb == "RCPT":
                    sock.sendall(self._reply("RCPT", b"250 recipient ok"))
                elif verb == "DATA":
                    answer = self._reply("DATA", b"354 go ahead")
                    sock.sendall(answer)
                    if answer.startswith(b"354"):
                        record.bodies.append(self._body(reader))
                        sock.sendall(self._reply("END", b"250 2.0.0 saved"))
                else:
                    sock.sendall(b"500 what\r\n")

    def _reply(self, command: str, default: bytes) -> bytes:
        return (self.verdict(command, self.transactions) or default) + b"\r\n"

    @staticmethod
    def _body(reader: io.BufferedReader) -> bytes:
        lines = []
        while (line := reader.readline()) != b".\r\n":
            lines.append(line[1:] if line.startswith(b"..") else line)
        return b"".join(lines)

    def drop_idle_clients(self) -> None:
        """Say 421 and close every connection, as a server does with idle clients."""
        for sock in self._sockets:
            try:
                sock.sendall(b"421 4.4.2 idle too long\r\n")
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def lmtp_at(tmp_path: Path) -> Iterator[Callable[..., FakeLmtp]]:
    """Start fake LMTP servers on sockets under ``tmp_path``; all are closed afterwards."""
    servers: list[FakeLmtp] = []

    def start(verdict: Verdict = lambda command, n: None, **kwargs: bool) -> FakeLmtp:
        server = FakeLmtp(tmp_path / f"lmtp{len(servers)}", verdict, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _spool(target: LmtpTarget, bodies: list[bytes]) -> list[Spooled]:
    items = []
    for n, body in enumerate(bodies):
        with target.open() as tmp:
            tmp.write(body)
        items.append(Spooled(b"u%d" % n, tmp.name, tmp.size))
    target.seal()
    return items


def _message(n: int) -> bytes:
    return b"Subject: m%d\r\n\r\n.dot line\r\nbody %d\r\n" % (n, n)


def _bodies(start: int) -> list[bytes]:
    """Four messages, numbered from ``start``: one small batch."""
    return [_message(start + n) for n in range(4)]


def _mixed(command: str, n: int) -> bytes | None:
    """Transaction 2: final 452; 3: RCPT 550; 4: MAIL 451 (so RCPT and DATA get 503)."""
    table = {
        (2, "END"): b"452 4.2.2 mailbox full",
        (3, "RCPT"): b"550 5.1.1 no such user",
        (3, "DATA"): b"503 5.5.1 no valid recipients",
        (4, "MAIL"): b"451 4.3.0 try later",
        (4, "RCPT"): b"503 5.5.1 MAIL first",
        (4, "DATA"): b"503 5.5.1 MAIL first",
    }
    return table.get((n, command))


@pytest.mark.parametrize("pipelining", [True, False])
def test_each_message_gets_its_own_verdict(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp], pipelining: bool
) -> None:
    """A 4xx after the data, a refused RCPT and a refused MAIL touch no other message."""
    server = lmtp_at(_mixed, pipelining=pipelining)
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x")
    bodies = [_message(n) for n in range(5)]
    outcomes = target.hand_over(_spool(target, bodies))
    target.close()
    assert [type(o) for o in outcomes] == [Delivered, Temporary, Rejected, Temporary, Delivered]
    assert outcomes[1] == Temporary("LMTP 452 4.2.2 mailbox full")
    assert outcomes[2] == Rejected("LMTP 550 5.1.1 no such user")
    assert outcomes[3] == Temporary("LMTP 451 4.3.0 try later")
    (connection,) = server.connections
    assert connection.bodies == [bodies[0], bodies[1], bodies[4]]  # dot-unstuffed: byte-exact
    assert connection.commands.count("RSET") == 2  # after each refused envelope
    assert connection.commands[-1] == "QUIT"


def test_sessions_stay_open_from_batch_to_batch(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """Three batches on two sessions open two connections, not six; close() says QUIT."""
    server = lmtp_at()
    target = LmtpTarget(
        tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x", sessions=2
    )
    for batch in range(3):
        items = _spool(target, _bodies(10 * batch))
        assert all(isinstance(o, Delivered) for o in target.hand_over(items))
    assert len(server.connections) == 2
    target.close()
    assert all(c.commands[-1] == "QUIT" for c in server.connections)
    assert sum(len(c.bodies) for c in server.connections) == 12


def test_a_session_the_server_dropped_while_idle_is_replaced(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """A kept session that got 421 and a close is not used again: nothing is deferred."""
    server = lmtp_at()
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x")
    assert target.hand_over(_spool(target, [_message(1)])) == [Delivered("lmtp:250 2.0.0 saved")]
    server.drop_idle_clients()
    outcomes = target.hand_over(_spool(target, [_message(2), _message(3)]))
    target.close()
    assert outcomes == [Delivered("lmtp:250 2.0.0 saved")] * 2
    assert [len(c.bodies) for c in server.connections] == [1, 2]


def test_a_large_message_is_streamed_in_chunks(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """A body several read chunks long arrives whole, followed by the next transaction."""
    server = lmtp_at()
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x")
    big = b"Subject: big\r\n\r\n" + b"".join(b".%07d\r\n" % n for n in range(100_000))
    bodies = [big, _message(1)]
    assert all(isinstance(o, Delivered) for o in target.hand_over(_spool(target, bodies)))
    target.close()
    assert server.connections[0].bodies == bodies


def test_a_batch_file_stays_until_its_last_message_is_done(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """A deferred message keeps the batch's file; the next run's recovery delivers it."""
    later = {2}

    def verdict(command: str, n: int) -> bytes | None:
        return b"452 4.2.2 full" if command == "END" and n in later else None

    server = lmtp_at(verdict)
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x")
    items = _spool(target, [_message(n) for n in range(3)])
    (batch_file,) = (tmp_path / "spool" / "tmp").iterdir()
    outcomes = target.hand_over(items)
    assert [type(o) for o in outcomes] == [Delivered, Temporary, Delivered]
    target.release([items[0].name, items[2].name])
    target.close()
    assert batch_file.exists()
    later.clear()  # the server has room again; a new run recovers the pending message
    again = LmtpTarget(tmp_path / "spool", address=f"unix:{server.path}", recipient="r@x")
    gone = Spooled(b"x", f"{batch_file.name},O=999999", 10)  # bytes the file does not hold
    assert again.recover([items[1], gone]) == [Delivered("lmtp:250 2.0.0 saved"), None]
    again.release([items[1].name])
    again.close()
    assert not batch_file.exists()
    assert sum(len(c.bodies) for c in server.connections) == 4  # 3, then the deferred one


def test_a_discarded_message_is_cut_off_its_batch_file(tmp_path: Path) -> None:
    """A message abandoned mid-RETR leaves nothing in the file; an empty batch leaves no file."""
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{tmp_path}/none", recipient="r@x")
    kept = target.open()
    kept.write(b"Subject: kept\r\n\r\nx\r\n")
    kept.finish(fsync=False)
    partial = target.open()
    partial.write(b"Subject: half" + b"y" * 100_000)  # flushed to the file in part
    partial.discard()
    target.seal()
    assert kept.path.read_bytes() == b"Subject: kept\r\n\r\nx\r\n"
    lone = target.open()
    assert lone.path != kept.path  # sealed: the next message starts a new file
    lone.write(b"Subject: lone\r\n")
    lone.discard()
    target.seal()
    assert list((tmp_path / "spool" / "tmp").iterdir()) == [kept.path]


def test_closing_drops_a_batch_file_never_sealed(tmp_path: Path) -> None:
    """A run that ends mid-batch leaves no open file and no spool file behind."""
    target = LmtpTarget(tmp_path / "spool", address=f"unix:{tmp_path}/none", recipient="r@x")
    open_files = len(os.listdir("/proc/self/fd"))
    tmp = target.open()
    tmp.write(b"Subject: never sealed\r\n\r\nx\r\n")
    tmp.finish(fsync=False)
    assert len(os.listdir("/proc/self/fd")) == open_files + 1
    target.close()
    assert len(os.listdir("/proc/self/fd")) == open_files
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_accounts_share_the_process_wide_session_budget(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """lmtp_max_sessions = 3: a second account gets its first session, not its second,
    until the first account's run closes its two; every count is given back at the end."""
    server = lmtp_at()
    address = f"unix:{server.path}"
    budget = SessionBudget(3)

    def target(name: str) -> LmtpTarget:
        spool = tmp_path / name
        return LmtpTarget(spool, address=address, recipient="r@x", sessions=2, budget=budget)

    first, second = target("a"), target("b")
    assert all(isinstance(o, Delivered) for o in first.hand_over(_spool(first, _bodies(0))))
    assert (len(server.connections), budget.in_use(address)) == (2, 2)
    assert all(isinstance(o, Delivered) for o in second.hand_over(_spool(second, _bodies(10))))
    assert (len(server.connections), budget.in_use(address)) == (3, 3)
    first.close()
    assert budget.in_use(address) == 1
    assert all(isinstance(o, Delivered) for o in second.hand_over(_spool(second, _bodies(20))))
    assert (len(server.connections), budget.in_use(address)) == (4, 2)
    second.close()
    assert budget.in_use(address) == 0
    assert sum(len(c.bodies) for c in server.connections) == 12


def test_an_account_always_gets_one_session_even_when_the_budget_is_spent(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """Other accounts hold the whole budget: this one still delivers, on one session."""
    server = lmtp_at()
    address = f"unix:{server.path}"
    budget = SessionBudget(2)
    assert budget.take(address, first=True)
    assert budget.take(address, first=False)
    target = LmtpTarget(tmp_path / "s", address=address, recipient="r@x", sessions=4, budget=budget)
    assert all(isinstance(o, Delivered) for o in target.hand_over(_spool(target, _bodies(0))))
    assert [len(c.bodies) for c in server.connections] == [4]
    target.close()
    assert budget.in_use(address) == 2


def test_sessions_that_failed_or_broke_give_their_count_back(
    tmp_path: Path, lmtp_at: Callable[..., FakeLmtp]
) -> None:
    """A refused connect and a session broken mid-batch both leave the budget as it was."""
    budget = SessionBudget(4)
    missing = f"unix:{tmp_path}/no-socket"
    target = LmtpTarget(tmp_path / "s", address=missing, recipient="r@x", sessions=3, budget=budget)
    outcomes = target.hand_over(_spool(target, _bodies(0)))
    assert len(outcomes) == 4
    assert all(isinstance(o, Temporary) for o in outcomes)
    assert budget.in_use(missing) == 0
    target.close()

    server = lmtp_at(lambda command, n: b"garbage" if command == "END" and n == 1 else None)
    address = f"unix:{server.path}"
    broken = LmtpTarget(tmp_path / "t", address=address, recipient="r@x", budget=budget)
    outcomes = broken.hand_over(_spool(broken, _bodies(0)))
    assert any(isinstance(o, Temporary) for o in outcomes)
    assert budget.in_use(address) == 0  # the broken session was dropped, not kept
    broken.close()
    assert budget.in_use(address) == 0
