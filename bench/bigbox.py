"""A synthetic POP3 mailbox of any size, for the scale-uidl scenario.

Dovecot takes hours to index a million messages, and what scale-uidl measures is what a
client does with a huge UIDL/LIST listing (parse it, diff it against its seen-store), not
the server. So this small threaded server on 127.0.0.1 streams a generated listing of
``count`` messages (UIDLs ~35 octets, ~45 octets a UIDL line like a real large mailbox) and
serves RETR of small generated messages. It speaks what mpop and popsync use: CAPA (with
PIPELINING), USER/PASS, STAT, UIDL, LIST, RETR, TOP, NOOP, RSET, DELE, QUIT.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading

__all__ = ["BigBox", "main", "message", "uidl"]

_CAPA = b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\nPIPELINING\r\nRESP-CODES\r\n.\r\n"


def uidl(n: int) -> bytes:
    """The unique id of message ``n``: 35 opaque octets, like a large provider's."""
    return b"%08X%08X-synthetic-%09d" % (n, (n * 2654435761) % 2**32, n)


def message(n: int) -> bytes:
    """A small RFC 5322 message, CRLF line ends, ~1 KiB."""
    body = b"".join(b"line %d of message %d, padding to make it realistic\r\n" % (i, n)
                    for i in range(18))  # fmt: skip
    return (
        b"From: bench <bench@example.org>\r\nTo: you@example.org\r\n"
        b"Subject: scale-uidl message %d\r\nMessage-ID: <%d@bench.example.org>\r\n"
        b"Date: Mon, 30 Nov 2026 00:00:00 +0000\r\n\r\n%s" % (n, n, body)
    )


def _stuffed(data: bytes) -> bytes:
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


class BigBox:
    """Serve ``count`` synthetic messages; ``with BigBox(n) as box: box.port``."""

    def __init__(self, count: int, *, host: str = "127.0.0.1") -> None:
        self.count = count
        # A message's size depends only on how many digits its number has.
        size = {d: len(message(10 ** (d - 1))) for d in range(1, len(b"%d" % count) + 1)}
        self._uidl = b"".join(b"%d %s\r\n" % (n, uidl(n)) for n in range(1, count + 1))
        self._list = b"".join(b"%d %d\r\n" % (n, size[len(b"%d" % n)])
                              for n in range(1, count + 1))  # fmt: skip
        self._sock = socket.create_server((host, 0))
        self.host, self.port = host, self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._closed = False

    @property
    def listing_octets(self) -> int:
        """Size of the UIDL listing on the wire."""
        return len(self._uidl)

    def __enter__(self) -> BigBox:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader, contextlib.suppress(OSError):
            conn.sendall(b"+OK bigbox ready\r\n")
            while line := reader.readline(1024):
                words = line.split()
                verb = words[0].upper() if words else b""
                arg = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
                conn.sendall(self._reply(verb, arg))
                if verb == b"QUIT":
                    return

    def _reply(self, verb: bytes, arg: int | None) -> bytes:
        n = self.count
        if verb == b"CAPA":
            return _CAPA
        if verb in (b"USER", b"PASS", b"NOOP", b"RSET", b"QUIT"):
            return b"+OK\r\n"
        if verb == b"STAT":
            return b"+OK %d %d\r\n" % (n, len(message(1)) * n)
        if arg is not None and not 1 <= arg <= n:
            return b"-ERR no such message\r\n"
        if verb == b"UIDL":
            if arg:
                return b"+OK %d %s\r\n" % (arg, uidl(arg))
            return b"+OK\r\n" + self._uidl + b".\r\n"
        if verb == b"LIST":
            if arg:
                return b"+OK %d %d\r\n" % (arg, len(message(arg)))
            return b"+OK\r\n" + self._list + b".\r\n"
        if verb in (b"RETR", b"TOP") and arg:
            return b"+OK\r\n" + _stuffed(message(arg)) + b".\r\n"
        if verb == b"DELE":
            return b"-ERR this mailbox is read-only\r\n"
        return b"-ERR unknown command\r\n"


def main() -> None:
    """``python -m bench.bigbox COUNT``: print the port, serve until stdin closes."""
    with BigBox(int(sys.argv[1])) as box:
        print(box.port, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
