"""A recording TCP proxy on 127.0.0.1: what a client sent, byte for byte, per connection.

Used to compare the bytes two POP3 client libraries put on the wire against a real
server (plain TCP only: TLS traffic would be ciphertext)::

    with WireTap(dovecot.host, dovecot.pop3_port) as tap:
        conn = poplib.POP3(tap.host, tap.port)
        ...
    tap.sent[0]   # everything the first connection sent to the server
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

__all__ = ["WireTap"]


class WireTap:
    """Forward 127.0.0.1:<free port> to ``target``, recording client-to-server bytes."""

    host = "127.0.0.1"

    def __init__(self, target_host: str, target_port: int, timeout: float = 10.0) -> None:
        self.target = (target_host, target_port)
        self.timeout = timeout
        self.sent: list[bytes] = []
        self._chunks: list[list[bytes]] = []
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._listener = socket.create_server((self.host, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="wire-tap", daemon=True)
        self._acceptor.start()

    def close(self) -> None:
        """Stop accepting, wait for open connections to end, fill :attr:`sent`."""
        self._stop.set()
        self._acceptor.join(self.timeout)
        for thread in self._threads:
            thread.join(self.timeout)
        for sock in self._sockets:
            sock.close()
        self._listener.close()
        self.sent = [b"".join(chunks) for chunks in self._chunks]

    def __enter__(self) -> WireTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.target, self.timeout)
            client.settimeout(self.timeout)
            self._sockets += [client, server]
            chunks: list[bytes] = []
            self._chunks.append(chunks)
            for src, dst, record in ((client, server, chunks), (server, client, None)):
                thread = threading.Thread(target=_pipe, args=(src, dst, record), daemon=True)
                thread.start()
                self._threads.append(thread)


def _pipe(src: socket.socket, dst: socket.socket, record: list[bytes] | None) -> None:
    """Copy ``src`` to ``dst`` until EOF, then half-close ``dst`` (close both on error)."""
    try:
        while data := src.recv(65536):
            if record is not None:
                record.append(data)
            dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
