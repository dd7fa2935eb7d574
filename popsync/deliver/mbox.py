"""The mbox target: append to one mbox file in mboxrd format, locked as Dovecot and mutt lock.

Guarantee: **at-least-once, with one named window, and never a half-written message.**
Messages are spooled and fsynced, recorded pending, then appended to the mbox under its
locks, the mbox is fsynced, and the batch is marked delivered. Before appending, the mbox
size and the planned end are written (fsynced) to a journal in the spool; the journal is
removed after the delivered commit. A failed append (disk full, say) truncates the mbox
back to its old size at once. After a crash the next run looks at the journal under the
locks: an mbox still exactly at the planned end means the append completed and only the
commit was lost, so the messages are marked delivered *without* appending them again; an
mbox between the old size and the planned end holds a partial append, which is cut off;
an mbox at the old size is appended to normally. Only when another program changed the
mbox in between (its size matches neither) does the journal not tell, and the messages
are appended again: that is the one window in which a duplicate can occur.

Format (mboxrd): each message starts with ``From <sender> <asctime date>`` (the
Return-Path address or ``MAILER-DAEMON``), every line matching ``^>*From `` gets one more
``>``, line ends are LF, and a blank line follows each message. Python's `mailbox.mbox`,
mutt and Dovecot (``mbox:`` mail_location) read it back; unquoting gives the message.

Locking, in Dovecot's default order for writes (``mbox_write_locks = dotlock fcntl``): a
``<mbox>.lock`` dotlock (created with O_EXCL, holding ``PID:HOST``; stale after
`DOTLOCK_STALE` seconds or at once when that process is gone), then an
fcntl write lock on the whole file; both are held across the append and the fsync.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from popsync.deliver.base import (
    Delivered,
    Outcome,
    Spooled,
    SpoolTarget,
    envelope_sender,
    unlink_quiet,
)
from popsync.errors import LocalIOError
from popsync.maildir import process_gone

__all__ = ["DOTLOCK_STALE", "MboxTarget", "from_line", "mboxrd_quoted"]

#: A dotlock older than this (and not refreshed) is taken over, as Dovecot and mutt do.
DOTLOCK_STALE = 300.0
LOCK_WAIT = 60.0
_CHUNK = 256 * 1024
_FROM = re.compile(rb"(?m)^(>*From )")
_JOURNAL = "mbox-append.json"


def from_line(sender: str, when: float) -> bytes:
    """``From sender Day Mon dd hh:mm:ss yyyy`` followed by LF."""
    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.gmtime(when))
    return f"From {sender or 'MAILER-DAEMON'} {stamp}\n".encode()


def mboxrd_quoted(path: Path, chunk: int = _CHUNK) -> Iterator[bytes]:
    """The spool file with LF line ends and ``>``-quoted From lines, ending in a blank line.

    Chunks are cut after a LF so that a ``From `` line start is never split.
    """
    carry = b""
    last = b"\n"
    with path.open("rb") as file:
        while data := file.read(chunk):
            data = carry + data
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                carry = data
                continue
            data, carry = data[:cut], data[cut:]
            out = _FROM.sub(rb">\1", data.replace(b"\r\n", b"\n"))
            last = out[-1:]
            yield out
    if carry:
        out = _FROM.sub(rb">\1", carry.replace(b"\r\n", b"\n"))
        last = out[-1:]
        yield out
    yield b"\n" if last == b"\n" else b"\n\n"


def _stale(lock: Path) -> bool:
    """A dotlock is stale when untouched for DOTLOCK_STALE, or its writer here is gone.

    Dovecot writes ``PID:HOST`` into its dotlocks and so do we; a killed popsync run must not
    block the next one for minutes.
    """
    if time.time() - lock.stat().st_mtime > DOTLOCK_STALE:
        return True
    try:
        pid_text, _, host = lock.read_text("ascii").strip().partition(":")
        pid = int(pid_text)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return host == os.uname().nodename and process_gone(pid)


@contextlib.contextmanager
def _dotlock(mbox: Path, wait: float = LOCK_WAIT) -> Iterator[None]:
    lock = mbox.with_name(mbox.name + ".lock")
    deadline = time.monotonic() + wait
    # The lock is linked from a file already holding "PID:HOST", so it is never seen empty:
    # an empty lock (a kill between create and write) could only be judged stale by age.
    own = mbox.with_name(f".{mbox.name}.lock.{os.getpid()}.{threading.get_ident()}")
    try:
        own.write_text(f"{os.getpid()}:{os.uname().nodename}\n", "ascii")  # as Dovecot writes
    except OSError as exc:
        raise LocalIOError(f"cannot create {own}: {exc.strerror}") from exc
    try:
        _link_lock(own, lock, mbox, deadline, wait)
    finally:
        unlink_quiet(own)
    try:
        yield
    finally:
        unlink_quiet(lock)


def _link_lock(own: Path, lock: Path, mbox: Path, deadline: float, wait: float) -> None:
    while True:
        try:
            os.link(own, lock)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if _stale(lock):
                    lock.unlink()
                    continue
            if time.monotonic() > deadline:
                raise LocalIOError(f"cannot lock {mbox}: {lock} held for {wait:g}s") from None
            time.sleep(0.1)
            continue
        except OSError as exc:
            raise LocalIOError(f"cannot create {lock}: {exc.strerror}") from exc
        return


class MboxTarget(SpoolTarget):
    """Append to an mbox file; see the module docstring."""

    kind = "mbox"

    def __init__(self, spool_path: Path, *, mbox: Path, file_mode: int = 0o600) -> None:
        super().__init__(spool_path, "lf")
        self.mbox = mbox
        self.file_mode = file_mode
        self._journal = self.spool.path / _JOURNAL

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        """The mbox open for appending, dotlocked and fcntl-locked."""
        try:
            with _dotlock(self.mbox):
                fd = os.open(self.mbox, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, self.file_mode)
                try:
                    deadline = time.monotonic() + LOCK_WAIT
                    while True:
                        try:
                            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                            break
                        except OSError as exc:
                            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                                raise
                            if time.monotonic() > deadline:
                                raise LocalIOError(f"cannot lock {self.mbox}: busy") from None
                            time.sleep(0.1)
                    yield fd
                finally:
                    os.close(fd)  # also drops the fcntl lock
        except OSError as exc:
            raise LocalIOError(f"cannot append to {self.mbox}: {exc.strerror}") from exc

    def _write_journal(self, start: int, end: int, names: Sequence[str]) -> None:
        data = json.dumps({"start": start, "end": end, "names": list(names)}).encode()
        tmp = self._journal.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self._journal)

    def _read_journal(self) -> tuple[int, int, list[str]] | None:
        try:
            data = json.loads(self._journal.read_bytes())
            return int(data["start"]), int(data["end"]), [str(n) for n in data["names"]]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a torn journal: nothing was appended after it

    def _rendered(self, items: Sequence[Spooled]) -> list[tuple[bytes, Path]]:
        # The From line is dated by the spool file (when the message arrived), not by the
        # clock at hand-over, so an append redone by recover() is byte-identical.
        rendered = []
        for item in items:
            spool = self.path(item.name)
            head = from_line(envelope_sender(spool), spool.stat().st_mtime)
            rendered.append((head, spool))
        return rendered

    def hand_over(self, items: Sequence[Spooled]) -> list[Outcome]:
        if not items:
            return []
        rendered = self._rendered(items)
        planned = sum(len(head) + sum(len(c) for c in mboxrd_quoted(p)) for head, p in rendered)
        with self._locked() as fd:
            start = os.lseek(fd, 0, os.SEEK_END)
            self._write_journal(start, start + planned, [i.name for i in items])
            try:
                for head, path in rendered:
                    _write_all(fd, head)
                    for chunk in mboxrd_quoted(path):
                        _write_all(fd, chunk)
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, start)  # never leave half a message behind
                os.fsync(fd)
                unlink_quiet(self._journal)
                raise LocalIOError(f"cannot append to {self.mbox}: {exc.strerror}") from exc
        return [Delivered(f"mbox:{start}") for _ in items]

    def recover(self, items: Sequence[Spooled]) -> list[Outcome | None]:
        journal = self._read_journal()
        if journal is not None:
            start, end, names = journal
            with self._locked() as fd:
                size = os.fstat(fd).st_size
                if size == end and set(names) >= {i.name for i in items}:
                    # The append completed; only the delivered commit was lost.
                    return [Delivered(f"mbox:{start}") for _ in items]
                if start < size < end:
                    os.ftruncate(fd, start)  # a partial append: cut it off
                    os.fsync(fd)
            unlink_quiet(self._journal)
        return super().recover(items)

    def release(self, names: Sequence[str]) -> None:
        unlink_quiet(self._journal)
        super().release(names)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
