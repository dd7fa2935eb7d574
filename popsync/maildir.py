"""Maildir writer: stream into tmp/, fsync, rename into new/, fsync the directory once per batch.

The engine follows the durability order in ARCHITECTURE.md with group commit::

    msgs = [md.open_tmp() for each message]; write...; msg.finish()    # file data durable
    store.add_pending(account, [(uidl, msg.name, msg.size), ...])     # one transaction
    finals = md.deliver([msg.name, ...])                             # K renames, one fsync(new/)
    store.mark_delivered(account, list(zip(uidls, finals)), at=now)   # one transaction

Names follow the maildir spec (https://cr.yp.to/proto/maildir.html) with Dovecot's fields::

    <seconds>.M<usec>P<pid>Q<counter>R<random hex>.<hostname>        (tmp/)
    <unique>,S=<size>,W=<vsize>                                     (new/, after deliver())
    <unique>,S=<size>,W=<vsize>:2,<flags>                           (cur/, moved by a reader)

``S`` is the stored size and ``W`` Dovecot's "virtual" size, the size with every line end
as CRLF (what IMAP RFC822.SIZE and POP3 LIST report), so Dovecot need not read the file to
learn it.

Line ends: POP3 sends CRLF, but every Unix mail store (Dovecot's own delivery, procmail,
maildrop, mpop, getmail6) writes LF, and readers such as mutt show a stray ``^M`` otherwise.
``line_endings="lf"`` (the default) turns each CRLF into LF while streaming (a CR not
followed by LF is kept as it is); ``"crlf"`` keeps the wire form byte for byte.

Modes: directories are created with ``dir_mode`` and files with ``file_mode`` (defaults
0700 and 0600), and the kernel applies the process umask to both, as for any program. A
Maildir another user must read (Dovecot's ``vmail``) therefore needs group bits in the
modes *and* a umask that keeps them (``UMask=0027``), plus a setgid top directory owned by
that group so new files inherit it (docs/deployment.md has the recipe).

Why these names are unique even when the spec's assumptions break: time + PID is what the
spec relies on, but a container restarts with the same PID and a clock can jump back, so two
processes can agree on seconds, microseconds and PID. The per-process counter ``Q`` makes names
from one process distinct no matter what the clock does, and ``R`` (64 random bits from
`os.urandom`, the OS CSPRNG, drawn once per process and again in every fork child) makes names from
different processes distinct even with an identical PID and clock. Finally tmp files are
created with O_EXCL, so a collision is retried with a fresh name instead of overwriting. A UIDL
never appears in a name: it may hold ``/`` and other bytes the filesystem dislikes.

The hostname is escaped per Dovecot (``/`` -> ``\\057``, ``:`` -> ``\\072``) and we also escape
``,`` (``\\054``) so the unique part can always be recovered by cutting at the first ``,``.

OSError caused by the environment (disk full, quota, read-only, permissions, EIO) is raised as
`popsync.errors.LocalIOError`; anything else propagates (it is a bug).
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import threading
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Literal, NoReturn, Self

from popsync.errors import LocalIOError

__all__ = [
    "STALE_TMP_SECONDS",
    "LineEndings",
    "Location",
    "Maildir",
    "MessageMissing",
    "TmpMessage",
    "base_name",
    "new_unique_name",
    "process_gone",
    "sanitize_host",
    "virtual_size",
]

Location = Literal["tmp", "new", "cur"]
LineEndings = Literal["lf", "crlf"]

#: The maildir spec's rule: tmp/ files untouched for 36 hours are debris.
STALE_TMP_SECONDS = 36 * 3600.0

_WRITE_BUFFER = 64 * 1024  # RETR chunks can be single lines; batch them into fewer syscalls
_LOCAL_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}
)
_counter = itertools.count(1)
_counter_lock = threading.Lock()


def virtual_size(path: Path) -> int:
    """A file's size with every bare LF counted as CRLF (Dovecot's W=), read in chunks."""
    total = bare = 0
    last_cr = False
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            total += len(chunk)
            lfs = chunk.count(b"\n")
            if lfs:
                bare += lfs - chunk.count(b"\r\n") - (last_cr and chunk[0] == 0x0A)
            last_cr = chunk[-1] == 0x0D
    return total + bare


class MessageMissing(FileNotFoundError):
    """deliver() was asked for names that are in none of tmp/, new/ or cur/."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        super().__init__(errno.ENOENT, f"not in the Maildir: {', '.join(self.names)}")


def _raise_local(exc: OSError, action: str) -> NoReturn:
    """Re-raise an environmental OSError as LocalIOError; leave bugs alone."""
    if exc.errno in _LOCAL_ERRNOS:
        reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
        where = f" {exc.filename}" if exc.filename else ""
        raise LocalIOError(f"cannot {action}{where}: {reason}") from exc
    raise exc


@contextmanager
def _local_io(action: str) -> Iterator[None]:
    """Map environmental OSErrors raised inside the block to LocalIOError."""
    try:
        yield
    except OSError as exc:
        _raise_local(exc, action)


def sanitize_host(host: str) -> str:
    """Escape the characters that would break a maildir name."""
    host = host or "localhost"
    return host.replace("/", r"\057").replace(":", r"\072").replace(",", r"\054")


def _new_process_random() -> None:
    global _process_random  # noqa: PLW0603 - one value per process, renewed in a fork child
    _process_random = os.urandom(8).hex()  # what secrets.token_hex(8) does, without its imports


_process_random = ""
_new_process_random()
os.register_at_fork(after_in_child=_new_process_random)


def new_unique_name(hostname: str | None = None) -> str:
    """A fresh `<seconds>.M<usec>P<pid>Q<counter>R<random>.<host>` basename.

    ``R`` is 64 random bits drawn once per process (and again in every fork child), so
    names of two processes differ even with the same PID and clock; ``Q`` makes the names
    of one process differ. One random draw per process instead of per name: getrandom()
    cost ~20 us a message on the hot path.
    """
    with _counter_lock:
        count = next(_counter)
    ns = time.time_ns()
    seconds, usec = ns // 1_000_000_000, (ns // 1000) % 1_000_000
    host = sanitize_host(os.uname().nodename if hostname is None else hostname)
    return f"{seconds}.M{usec}P{os.getpid()}Q{count}R{_process_random}.{host}"


def base_name(name: str) -> str:
    """The unique part of a maildir name, without `:2,FLAGS` info or `,S=` style fields."""
    return name.split(":", 1)[0].split(",", 1)[0]


def _check_name(name: str) -> None:
    """Refuse anything that could escape the directory."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ValueError(f"invalid maildir file name {name!r}")


def _fsync_dir(path: Path) -> None:
    """fsync a directory so renames and creations in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TmpMessage:
    """A message being written into tmp/; a binary sink for `Pop3Client.retr_into`."""

    def __init__(self, maildir: Maildir, name: str, fd: int) -> None:
        self.name = name
        self._dir = maildir.tmp
        #: Octets stored so far (after any CRLF -> LF conversion): the ``S=`` size.
        self.size = 0
        #: The size with every line end as CRLF: Dovecot's ``W=`` size.
        self.vsize = 0
        self._fd: int | None = fd
        self._buffer = bytearray()
        self._finished = False
        self._to_lf = maildir.line_endings == "lf"
        self._held_cr = False  # a CR ending the last chunk: converted once the next byte is seen
        self._last_cr = False  # the last stored octet was a CR (for W= across chunks)

    @property
    def path(self) -> Path:
        """The file in tmp/ (built on demand: a Path per message costs on the hot path)."""
        return self._dir / self.name

    @property
    def file_name(self) -> str:
        """The name of the file in tmp/ the message is written to."""
        return self.name

    @property
    def closed(self) -> bool:
        """True once finished or discarded."""
        return self._fd is None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append bytes (CRLF -> LF with ``line_endings="lf"``); flushes every 64 KiB."""
        if self._fd is None:
            raise ValueError(f"write to closed message {self.name}")
        taken = len(data)
        if self._to_lf:
            data = self._convert(data)
        self._store(data)
        if len(self._buffer) >= _WRITE_BUFFER:
            self._flush()
        return taken

    def _convert(self, data: bytes | bytearray | memoryview) -> bytes:
        """CRLF -> LF for one chunk; a CR at its end waits to see whether LF follows."""
        chunk = bytes(data)
        if self._held_cr:
            chunk = b"\r" + chunk
            self._held_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._held_cr = True
        return chunk.replace(b"\r\n", b"\n") if b"\r" in chunk else chunk

    def _store(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data
        self.size += len(data)

    def _count_vsize(self) -> None:
        """Add the buffer to W=: a LF without a CR before it counts two octets (Dovecot)."""
        data = self._buffer
        if not data:
            return
        bare = data.count(b"\n")
        if bare:
            bare -= data.count(b"\r\n")
            if self._last_cr and data[0] == 0x0A:
                bare -= 1
        self.vsize += len(data) + bare
        self._last_cr = data[-1] == 0x0D

    def _flush(self) -> None:
        """Write the buffer out; on failure delete the partial file and raise LocalIOError."""
        assert self._fd is not None
        self._count_vsize()
        view = memoryview(self._buffer)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            view.release()
            self.discard()
            _raise_local(exc, f"write {self.path}")
        view.release()
        self._buffer.clear()

    def finish(self, *, fsync: bool = True) -> None:
        """Flush, fsync (unless told not to) and close; the file stays in tmp/ for deliver()."""
        if self._finished:
            return
        if self._fd is None:
            raise ValueError(f"message {self.name} was discarded")
        if self._held_cr:  # the message ended in a lone CR: it stays
            self._held_cr = False
            self._store(b"\r")
        self._flush()
        fd = self._fd
        try:
            if fsync:
                os.fsync(fd)
        except OSError as exc:
            self.discard()
            _raise_local(exc, f"fsync {self.path}")
        self._fd = None
        self._finished = True
        self._close(fd)

    def discard(self) -> None:
        """Close (if open) and delete the tmp file; safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._close(fd)
        self._buffer.clear()
        self._remove()

    def _close(self, fd: int) -> None:
        """Let go of the file descriptor (a message sharing a batch's file keeps it open)."""
        os.close(fd)

    def _remove(self) -> None:
        """Delete what was written (a message sharing a batch's file cuts it back)."""
        with suppress(FileNotFoundError):
            os.unlink(os.path.join(self._dir, self.name))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Discard on exception; otherwise make sure the message is finished."""
        if exc_type is not None:
            self.discard()
        elif not self._finished:
            self.finish()


class Maildir:
    """One Maildir (tmp/, new/, cur/), written by one account at a time."""

    def __init__(
        self,
        path: Path,
        *,
        create: bool = True,
        line_endings: LineEndings = "lf",
        dir_mode: int = 0o700,
        file_mode: int = 0o600,
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path / "tmp"
        self.new = self.path / "new"
        self.cur = self.path / "cur"
        self.hostname = os.uname().nodename
        self.line_endings: LineEndings = line_endings
        self.file_mode = file_mode
        if create:
            with _local_io("create Maildir"):
                for sub in (self.path, self.tmp, self.new, self.cur):
                    sub.mkdir(mode=dir_mode, exist_ok=True)  # the umask applies
        for sub in (self.tmp, self.new, self.cur):
            if not sub.is_dir():
                raise LocalIOError(f"not a Maildir: {sub} is missing")

    def __repr__(self) -> str:
        return f"Maildir({str(self.path)!r})"

    def open_tmp(self) -> TmpMessage:
        """Create a new empty file (``file_mode`` less the umask) in tmp/ with a fresh name."""
        return TmpMessage(self, *self.create_tmp())

    def create_tmp(self) -> tuple[str, int]:
        """A new empty file in tmp/ with a fresh name: (name, write-only file descriptor)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        for _ in range(10):
            name = new_unique_name(self.hostname)
            try:
                fd = os.open(os.path.join(self.tmp, name), flags, self.file_mode)
            except FileExistsError:  # the O_EXCL safety net; effectively unreachable
                continue
            except OSError as exc:
                _raise_local(exc, "create a file in")
            return name, fd
        raise LocalIOError(f"cannot find a free name in {self.tmp}")

    def deliver(self, names: Sequence[str], vsizes: Mapping[str, int] | None = None) -> list[str]:
        """Move finished tmp files into new/ as `<name>,S=<size>,W=<vsize>`; fsync new/, tmp/.

        ``vsizes`` gives each name's W= size (`TmpMessage.vsize`); a recovery run does not
        know it and the file is read to count it.

        Idempotent for recovery: a name already in new/ or cur/ returns its current final name
        without moving anything. Raises `MessageMissing` (before moving anything) for names
        found nowhere, so the engine can drop those pending rows and fetch them again.
        """
        for name in names:
            _check_name(name)
        if len(set(names)) != len(names):
            raise ValueError("deliver() got the same name twice")
        sizes: dict[str, int] = {}
        with _local_io("deliver into"):
            for name in names:
                with suppress(FileNotFoundError):
                    sizes[name] = os.stat(os.path.join(self.tmp, name)).st_size
            # Only a recovery run has names missing from tmp/; only then read new/ and cur/.
            absent = {base_name(n) for n in names if n not in sizes}
            placed = self._scan_placed(absent)
            missing = [n for n in names if n not in sizes and base_name(n) not in placed]
            if missing:
                raise MessageMissing(missing)
            finals: list[str] = []
            moved = False
            for name in names:
                if name not in sizes:
                    finals.append(placed[base_name(name)][1])
                    continue
                known = None if vsizes is None else vsizes.get(name)
                vsize = virtual_size(self.tmp / name) if known is None else known
                final = f"{name},S={sizes[name]},W={vsize}"
                os.rename(os.path.join(self.tmp, name), os.path.join(self.new, final))
                finals.append(final)
                moved = True
            if moved:
                _fsync_dir(self.new)
                _fsync_dir(self.tmp)
        return finals

    def _scan_placed(self, bases: set[str]) -> dict[str, tuple[Location, str]]:
        """Where in new/ or cur/ each wanted base name is, and under which file name."""
        found: dict[str, tuple[Location, str]] = {}
        if not bases:
            return found
        where: Location
        for where in ("cur", "new"):  # new/ wins: it is checked last and overwrites
            with _local_io(f"list {where}/ of"), os.scandir(self.path / where) as it:
                for entry in it:
                    base = base_name(entry.name)
                    if base in bases:
                        found[base] = (where, entry.name)
        return found

    def locate_many(self, names: Collection[str]) -> dict[str, Location | None]:
        """locate() for a batch, reading each directory once."""
        for name in names:
            _check_name(name)
        placed = self._scan_placed({base_name(n) for n in names})
        result: dict[str, Location | None] = {}
        for name in names:
            hit = placed.get(base_name(name))
            if hit is not None:
                result[name] = hit[0]
            elif (self.tmp / base_name(name)).exists():
                result[name] = "tmp"
            else:
                result[name] = None
        return result

    def locate(self, name: str) -> Location | None:
        """Where a message is, matching on its unique part (readers rename new/ -> cur/:2,S).

        A file in new/ or cur/ wins over one in tmp/: it is delivered, whatever is left behind.
        """
        return self.locate_many([name])[name]

    def remove_tmp(self, name: str) -> None:
        """Delete one tmp/ file if it is there."""
        _check_name(name)
        with _local_io("remove from"):
            (self.tmp / name).unlink(missing_ok=True)

    def cleanup_tmp(
        self,
        keep: Collection[str],
        older_than: float = STALE_TMP_SECONDS,
        *,
        now: float | None = None,
    ) -> list[str]:
        """Remove tmp/ files not in `keep` and untouched (atime and mtime) for `older_than`.

        tmp/ may be shared with other delivery agents, so only stale debris goes (the spec's
        36-hour rule); names in `keep` (pending rows) are never removed. Returns removed names.
        """
        keep_set = set(keep)
        cutoff = (time.time() if now is None else now) - older_than
        removed: list[str] = []
        with _local_io("clean up"), os.scandir(self.tmp) as it:
            for entry in it:
                if entry.name in keep_set:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISREG(st.st_mode) and max(st.st_atime, st.st_mtime) < cutoff:
                    (self.tmp / entry.name).unlink(missing_ok=True)
                    removed.append(entry.name)
        return removed


def process_gone(pid: int) -> bool:
    """True when no process ``pid`` exists here (files it left are a dead writer's debris).

    Shared by the tmp/ debris check and the mbox dotlock's staleness test.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by someone else
    return False
