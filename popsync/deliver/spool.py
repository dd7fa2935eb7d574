"""One spool file per batch: a batch's messages appended to one file and fsynced once.

The LMTP target spools this way. A file per message costs a create, an fsync and an
unlink per message, and every fsync forces an ext4 journal commit that the LMTP server's
own fsyncs then queue behind; one file per batch costs one of each per batch.

Layout: ``tmp/<unique>`` (a maildir-style unique name) holds the messages back to back.
A message's spool name, recorded in its pending row, is ``<unique>,O=<offset>``; its
length is the row's size. A unique name never contains ``,`` (the hostname's is escaped),
so the file's name is the part before it. A name without ``,O=`` is not a message of a
batch file (a per-message spool file of another target): `locate` reports it, and the
caller treats it as gone (the message is fetched again; nothing pending was ever DELEd).

Durability: messages are appended as they arrive (`Segment`, a `TmpMessage`); `seal`
fsyncs the file once, and only then does ``sync._Batcher`` record the batch pending, so
a pending row always names bytes on disk. A run killed before that leaves a file that no
pending row names: debris that ``sync.clean_debris`` removes at the next start. The file
is removed once every message in it has a committed outcome (`release`); a message still
deferred keeps its file for the next run's recovery, which `adopt`\\ s it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from popsync.errors import LocalIOError
from popsync.maildir import Maildir, TmpMessage

__all__ = ["BatchSpool", "Segment", "locate"]

_MARK = ",O="


def locate(name: str) -> tuple[str, int] | None:
    """(file name, offset) of a batch file's message; None for any other spool name."""
    file, mark, offset = name.partition(_MARK)
    if not mark or not offset.isdigit() or not file or "/" in file:
        return None
    return file, int(offset)


@dataclass(eq=False)
class _Batch:
    """The file a batch is being appended to."""

    name: str
    fd: int
    path: Path
    end: int = 0
    broken: bool = False
    live: set[str] = field(default_factory=set)


class Segment(TmpMessage):
    """One message appended to its batch's spool file; the sink RETR streams into.

    It writes through the batch's descriptor (only one message of a batch is written at
    a time); `finish` leaves the file open and unsynced (`BatchSpool.seal` fsyncs it
    once), and `discard` cuts the file back to where the message began.
    """

    def __init__(self, spool: BatchSpool, batch: _Batch) -> None:
        super().__init__(spool.maildir, f"{batch.name}{_MARK}{batch.end}", batch.fd)
        self.offset = batch.end
        self._spool = spool
        self._batch = batch

    @property
    def path(self) -> Path:
        """The batch's file (the message is a stretch of it)."""
        return self._batch.path

    @property
    def file_name(self) -> str:
        return self._batch.name

    def _close(self, fd: int) -> None:
        self._batch.end = self.offset + self.size

    def _remove(self) -> None:
        self._spool.drop(self._batch, self)


class BatchSpool:
    """The batch files of one spool Maildir: appending, sealing, and removing when done."""

    def __init__(self, maildir: Maildir) -> None:
        self.maildir = maildir
        self._current: _Batch | None = None
        # Every batch file with messages whose outcome is not committed yet, by file name.
        self._files: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def open(self) -> Segment:
        """The next message of the current batch (a new file for a new batch)."""
        batch = self._current
        if batch is None:
            name, fd = self.maildir.create_tmp()
            batch = self._current = _Batch(name, fd, self.maildir.tmp / name)
        segment = Segment(self, batch)
        with self._lock:
            batch.live.add(segment.name)
            self._files[batch.name] = batch.live
        return segment

    def seal(self) -> None:
        """fsync the current batch's file and close it; the next message starts a new one.

        On failure nothing of the batch is durable: the file is removed and the error
        (`LocalIOError`) raised, so no message of it is recorded pending.
        """
        batch, self._current = self._current, None
        if batch is None:
            return
        try:
            if batch.broken:
                raise LocalIOError(f"cannot write {batch.path}: a failed message was not cut off")
            if batch.live:
                try:
                    os.fsync(batch.fd)
                except OSError as exc:
                    raise LocalIOError(f"cannot fsync {batch.path}: {exc.strerror}") from exc
        except BaseException:
            batch.live.clear()
            raise
        finally:
            os.close(batch.fd)
            if not batch.live:
                self._forget(batch.name)

    def abandon(self) -> None:
        """Close and remove a batch file never sealed (a run that failed mid-batch).

        No pending row can name it: rows are recorded only after `seal`.
        """
        batch, self._current = self._current, None
        if batch is not None:
            os.close(batch.fd)
            batch.live.clear()
            self._forget(batch.name)

    def drop(self, batch: _Batch, segment: Segment) -> None:
        """A message is discarded: cut it off the file being written, or forget it."""
        with self._lock:
            batch.live.discard(segment.name)
            if batch is not self._current:
                if not batch.live:
                    self._forget_locked(batch.name)
                return
        if segment.offset + segment.size < batch.end:
            return  # not the last message (never happens): its bytes stay, named by no row
        try:
            os.ftruncate(batch.fd, segment.offset)
            os.lseek(batch.fd, segment.offset, os.SEEK_SET)
        except OSError:
            batch.broken = True  # seal() refuses the batch
        batch.end = segment.offset

    def holds(self, name: str, size: int) -> bool:
        """True when a message's bytes are in the spool: its file is there and long enough."""
        found = locate(name)
        if found is None:
            return False
        try:
            return os.stat(self.maildir.tmp / found[0]).st_size >= found[1] + size
        except FileNotFoundError:
            return False

    def adopt(self, names: list[str]) -> None:
        """Track messages a recovery found pending, so `release` knows when a file is done."""
        with self._lock:
            for name in names:
                found = locate(name)
                if found is not None:
                    self._files.setdefault(found[0], set()).add(name)

    def release(self, names: list[str]) -> None:
        """These messages' outcomes are committed: remove each file none of them still needs."""
        with self._lock:
            for name in names:
                file = (locate(name) or ("", 0))[0]
                live = self._files.get(file)
                if live is None:
                    continue
                live.discard(name)
                current = self._current is not None and self._current.name == file
                if not live and not current:
                    self._forget_locked(file)

    def _forget(self, file: str) -> None:
        with self._lock:
            self._forget_locked(file)

    def _forget_locked(self, file: str) -> None:
        self._files.pop(file, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.maildir.tmp / file)
