"""The awkward-message corpus round-trips byte-exact; stdlib poplib is the comparison."""

from __future__ import annotations

import io
import poplib as std_poplib
import random

import pytest

import popsync.poplib as our_poplib
from popsync.client import Pop3Client
from popsync.pop3 import ClientConnection, MessageChunk, MessageEnd, MessageStart, NeedData
from popsync.pop3 import commands as cmd
from tests.corpus import CORPUS, served, stuff
from tests.fake_pop3 import Expect, FakePop3Server, Send, Step

NAMES = list(CORPUS)
OK = b"+OK\r\n"

#: The corpus messages stdlib poplib cannot fetch: every line over 2048 octets makes
#: it raise error_proto("line too long") (see docs/library.md).
STDLIB_FAILS = {"line_2100", "line_12000", "line_70000", "header_3000"}


def _wire(name: str) -> bytes:
    return b"+OK message follows\r\n" + stuff(served(CORPUS[name]()))


def _session(names: list[str]) -> list[Step]:
    steps: list[Step] = [Send(b"+OK corpus\r\n"), Expect(b"USER u", OK), Expect(b"PASS p", OK)]
    steps += [Expect(b"RETR %d" % n, _wire(name)) for n, name in enumerate(names, 1)]
    return steps


def test_stuffing_helper_round_trips_dots() -> None:
    """The test helper stuffs every line that starts with a dot, and only those."""
    assert stuff(b".a\r\nb.\r\n.\r\n") == b"..a\r\nb.\r\n..\r\n.\r\n"


def test_client_retr_into_is_byte_exact() -> None:
    """Every corpus message comes out of retr_into exactly as served."""
    server = FakePop3Server(_session(NAMES), linger=1.0)
    with Pop3Client.connect(server.host, server.port, tls="none", timeout=5) as client:
        client.login("u", "p", mechanism="user", allow_plaintext=True)
        for n, name in enumerate(NAMES, 1):
            sink = io.BytesIO()
            size = client.retr_into(n, sink)
            assert sink.getvalue() == served(CORPUS[name]()), name
            assert size == len(sink.getvalue()), name
    server.check()


def test_popsync_poplib_retr_reconstructs_every_message() -> None:
    """popsync.poplib.retr returns lines that join back to the exact message, with octets."""
    server = FakePop3Server(_session(NAMES), linger=1.0)
    conn = our_poplib.POP3(server.host, server.port)
    conn.user("u")
    conn.pass_("p")
    for n, name in enumerate(NAMES, 1):
        expected = served(CORPUS[name]())
        resp, lines, octets = conn.retr(n)
        assert resp == b"+OK message follows"
        assert b"".join(line + b"\r\n" for line in lines) == expected, name
        assert octets == len(expected), name
    conn.close()
    server.check()


@pytest.mark.parametrize("name", NAMES)
def test_stdlib_poplib_comparison(name: str) -> None:
    """Stdlib poplib fails exactly on the long-line messages and gets the rest right."""
    server = FakePop3Server(_session([name]), linger=1.0)
    conn = std_poplib.POP3(server.host, server.port, timeout=5)
    conn.user("u")
    conn.pass_("p")
    if name in STDLIB_FAILS:
        with pytest.raises(std_poplib.error_proto, match="line too long"):
            conn.retr(1)
    else:
        _resp, lines, octets = conn.retr(1)
        assert b"".join(line + b"\r\n" for line in lines) == served(CORPUS[name]())
        assert octets == len(served(CORPUS[name]()))
    conn.close()
    server.close()


@pytest.mark.parametrize("max_piece", [1, 7, 4096, 1 << 30])
def test_core_reassembles_corpus_from_any_split(max_piece: int) -> None:
    """Fed in pieces of random size, the core's chunks join to every message exactly."""
    names = [n for n in NAMES if max_piece > 1 or n not in ("line_12000", "line_70000")]
    conn = ClientConnection()
    conn.receive_data(b"+OK hi\r\n")
    conn.next_event()
    conn.send(cmd.user("u"))
    conn.send(cmd.pass_("p"))
    conn.receive_data(OK + OK)
    conn.next_event()
    conn.next_event()
    wire = b""
    for n, name in enumerate(names, 1):
        conn.send(cmd.retr(n))
        wire += _wire(name)
    rng = random.Random(max_piece)
    bodies: list[bytes] = []
    current = bytearray()
    pos = 0
    while len(bodies) < len(names):
        event = conn.next_event()
        if isinstance(event, NeedData):
            size = rng.randint(1, max_piece)
            conn.receive_data(wire[pos : pos + size])
            pos += size
        elif isinstance(event, MessageChunk):
            current += event.data
        elif isinstance(event, MessageEnd):
            bodies.append(bytes(current))
            current.clear()
        else:
            assert isinstance(event, MessageStart)
    assert bodies == [served(CORPUS[name]()) for name in names]
    assert pos >= len(wire)
