"""Stream.recv asks Linux for immediate ACKs after every read (see net.Stream._ack_at_once).

Without it Dovecot's reply to a pipelined USER+PASS waited ~40 ms for our delayed ACK (the
figures are in bench/RESULTS.md, cold start part 3); here the socket calls are checked.
Linux only, as popsync's deployments are (elsewhere `net` leaves ACKs to the system).
"""

from __future__ import annotations

import socket

from popsync.net import Stream

__all__: list[str] = []


class _Socket:
    """Just enough of a socket for Stream.recv: canned reads, recorded options."""

    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads
        self.options: list[tuple[int, int, int]] = []

    def gettimeout(self) -> float | None:
        return 5.0

    def settimeout(self, value: float | None) -> None:
        pass

    def recv(self, size: int) -> bytes:
        return self.reads.pop(0)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


def test_every_read_with_data_asks_for_quick_acks_again() -> None:
    """Each read that brought data sets TCP_QUICKACK (it is not sticky); EOF does not."""
    sock = _Socket([b"+OK\r\n", b"+OK Logged in.\r\n", b""])
    stream = Stream(sock, "127.0.0.1", 110)  # type: ignore[arg-type]
    quick = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    assert stream.recv() == b"+OK\r\n"
    assert sock.options == [quick]
    assert stream.recv() == b"+OK Logged in.\r\n"
    assert sock.options == [quick, quick]
    assert stream.recv() == b""
    assert sock.options == [quick, quick]
