"""Tests for the Maildir writer."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

import popsync.maildir
from popsync.errors import LocalIOError
from popsync.maildir import Maildir, MessageMissing, TmpMessage, base_name, new_unique_name
from tests.conftest import unavailable

NAME_RE = re.compile(r"^\d+\.M\d{1,6}P\d+Q\d+R[0-9a-f]{16}\.[^/:,]+$")


@pytest.fixture
def md(tmp_path: Path) -> Maildir:
    """A fresh Maildir."""
    return Maildir(tmp_path / "Mail")


def write_msg(md: Maildir, data: bytes = b"Subject: x\r\n\r\nbody\r\n") -> str:
    """Write and finish one tmp message; return its name."""
    with md.open_tmp() as msg:
        msg.write(data)
    return msg.name


def mode(path: Path) -> int:
    """Permission bits of a path."""
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_subdirectories_0700(tmp_path: Path) -> None:
    """Maildir() creates the root, tmp/, new/ and cur/ with mode 0700."""
    md = Maildir(tmp_path / "Mail")
    for sub in ("", "tmp", "new", "cur"):
        assert mode(md.path / sub) == 0o700


def test_create_false_requires_existing_maildir(tmp_path: Path) -> None:
    """create=False refuses a directory that is not a Maildir."""
    (tmp_path / "M" / "tmp").mkdir(parents=True)
    with pytest.raises(LocalIOError, match="not a Maildir"):
        Maildir(tmp_path / "M", create=False)
    Maildir(tmp_path / "M")
    assert Maildir(tmp_path / "M", create=False).new.is_dir()


def test_open_tmp_writes_a_0600_file_with_a_spec_name(md: Maildir) -> None:
    """A tmp message is a 0600 file in tmp/ named per the maildir spec."""
    msg = md.open_tmp()
    assert NAME_RE.match(msg.name), msg.name
    assert msg.path == md.tmp / msg.name
    assert mode(msg.path) == 0o600
    for i in range(10_000):  # many small writes, crossing the buffer size
        msg.write(b"line %d\r\n" % i)
    msg.finish()
    expected = b"".join(b"line %d\n" % i for i in range(10_000))  # stored with LF
    assert msg.size == len(expected)
    assert msg.vsize == len(expected) + 10_000
    assert msg.path.read_bytes() == expected
    assert msg.closed
    msg.finish()  # idempotent
    with pytest.raises(ValueError):
        msg.write(b"more")


def test_context_manager_discards_on_exception(md: Maildir) -> None:
    """An exception inside `with open_tmp()` removes the partial file."""

    def fail_midway() -> TmpMessage:
        with md.open_tmp() as msg:
            msg.write(b"partial")
            raise RuntimeError(msg.name)

    with pytest.raises(RuntimeError) as info:
        fail_midway()
    assert not (md.tmp / str(info.value)).exists()
    assert list(md.tmp.iterdir()) == []


def test_context_manager_finishes_on_success(md: Maildir) -> None:
    """A clean `with` block finishes the file."""
    name = write_msg(md, b"abc")
    assert (md.tmp / name).read_bytes() == b"abc"


def test_discard_is_idempotent(md: Maildir) -> None:
    """discard() deletes the file and may be called again."""
    msg = md.open_tmp()
    msg.write(b"x")
    msg.discard()
    msg.discard()
    assert not msg.path.exists()
    with pytest.raises(ValueError):
        msg.finish()


def test_finish_fsyncs_unless_told_not_to(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    """finish() fsyncs the file once; finish(fsync=False) does not."""
    calls: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    a = md.open_tmp()
    a.finish()
    assert len(calls) == 1
    b = md.open_tmp()
    b.finish(fsync=False)
    assert len(calls) == 1


def test_deliver_batch_adds_size_and_fsyncs_each_directory_once(
    md: Maildir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deliver() renames K files into new/ with ,S=<size> and fsyncs new/ and tmp/ once."""
    synced: list[Path] = []
    real = popsync.maildir._fsync_dir

    def counting(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(popsync.maildir, "_fsync_dir", counting)
    names = [write_msg(md, b"x" * i) for i in range(32)]
    finals = md.deliver(names)
    assert finals == [f"{n},S={i},W={i}" for i, n in enumerate(names)]
    assert sorted(synced) == sorted([md.new, md.tmp])
    assert list(md.tmp.iterdir()) == []
    for i, final in enumerate(finals):
        assert (md.new / final).read_bytes() == b"x" * i
    assert md.deliver([]) == []


def test_deliver_is_idempotent_after_a_reader_moved_the_file(md: Maildir) -> None:
    """Delivering again finds the message in new/ or in cur/ with :2,S flags."""
    name = write_msg(md)
    (final,) = md.deliver([name])
    assert md.deliver([name]) == [final]
    (md.new / final).rename(md.cur / f"{final}:2,S")
    assert md.deliver([name]) == [f"{final}:2,S"]


def test_deliver_missing_moves_nothing(md: Maildir) -> None:
    """A name found nowhere raises MessageMissing before anything is renamed."""
    good = write_msg(md)
    with pytest.raises(MessageMissing) as info:
        md.deliver([good, "1.M1P1Q1Rdeadbeefdeadbeef.gone"])
    assert info.value.names == ["1.M1P1Q1Rdeadbeefdeadbeef.gone"]
    assert md.locate(good) == "tmp"


def test_deliver_rejects_bad_and_repeated_names(md: Maildir) -> None:
    """Names with a slash, '..' or repeated in one batch are refused."""
    name = write_msg(md)
    for bad in ("../new/x", "..", "", "a/b"):
        with pytest.raises(ValueError):
            md.deliver([bad])
    with pytest.raises(ValueError):
        md.deliver([name, name])


def test_locate_follows_the_message(md: Maildir) -> None:
    """locate() answers tmp, new, cur (after a reader adds :2,S) and None, by base name."""
    name = write_msg(md)
    assert md.locate(name) == "tmp"
    (final,) = md.deliver([name])
    assert md.locate(name) == "new"
    assert md.locate(final) == "new"
    (md.new / final).rename(md.cur / f"{final}:2,RS")
    assert md.locate(name) == "cur"
    assert md.locate(f"{final}:2,S") == "cur"
    (md.cur / f"{final}:2,RS").unlink()
    assert md.locate(name) is None


def test_locate_many_reads_each_directory_once(md: Maildir) -> None:
    """locate_many() reports every name of a batch."""
    in_tmp = write_msg(md)
    in_new = write_msg(md)
    md.deliver([in_new])
    result = md.locate_many([in_tmp, in_new, "1.M1P1Q1R00.none"])
    assert result == {in_tmp: "tmp", in_new: "new", "1.M1P1Q1R00.none": None}


def test_base_name_strips_fields_and_info() -> None:
    """base_name() cuts the ,S= fields and the :2, info."""
    assert base_name("1.M2P3Q4Rab.host,S=10:2,S") == "1.M2P3Q4Rab.host"
    assert base_name("1.M2P3Q4Rab.host") == "1.M2P3Q4Rab.host"


def test_cleanup_tmp_removes_only_stale_unkept_files(md: Maildir) -> None:
    """cleanup_tmp() deletes files older than 36h unless kept, and returns their names."""
    old, kept, fresh = write_msg(md), write_msg(md), write_msg(md)
    long_ago = time.time() - 37 * 3600
    for name in (old, kept):
        os.utime(md.tmp / name, (long_ago, long_ago))
    (md.tmp / "subdir").mkdir()
    os.utime(md.tmp / "subdir", (long_ago, long_ago))
    assert md.cleanup_tmp(keep={kept}) == [old]
    assert sorted(p.name for p in md.tmp.iterdir()) == sorted([kept, fresh, "subdir"])
    later = time.time() + 37 * 3600
    assert sorted(md.cleanup_tmp(keep=(), now=later)) == sorted([kept, fresh])
    assert not (md.tmp / fresh).exists()


def test_remove_tmp(md: Maildir) -> None:
    """remove_tmp() deletes one tmp file and tolerates a missing one."""
    name = write_msg(md)
    md.remove_tmp(name)
    md.remove_tmp(name)
    assert md.locate(name) is None
    with pytest.raises(ValueError):
        md.remove_tmp("../cur/x")


def test_hostname_is_sanitized() -> None:
    """'/', ':' and ',' in the hostname are escaped as octal."""
    name = new_unique_name("a/b:c,d")
    assert name.endswith(r".a\057b\072c\054d")
    assert base_name(name) == name


def test_names_unique_in_process() -> None:
    """100k names from one process, across 4 threads, are distinct."""
    names: list[str] = []

    def work() -> None:
        names.extend(new_unique_name("h") for _ in range(25_000))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 100_000
    assert len(set(names)) == 100_000


def _names_with_frozen_pid_and_clock(conn: Connection) -> None:
    """Child: generate names as PID 1 with a clock stuck in (and jumping back in) the past."""
    ticks = iter(range(10**12, 0, -1))  # a clock that only ever goes backwards
    os.getpid = lambda: 1  # this is a throwaway forked child
    time.time_ns = lambda: 1_000_000_000_000 + next(ticks) % 3
    conn.send([new_unique_name("box") for _ in range(5000)])
    conn.close()


def test_names_unique_across_forks_with_same_pid_and_clock() -> None:
    """Forked children that share PID, counter state and clock still make distinct names."""
    new_unique_name("box")  # advance the counter the children inherit
    ctx = multiprocessing.get_context("fork")
    results: list[str] = []
    for _ in range(4):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_names_with_frozen_pid_and_clock, args=(child,))
        proc.start()
        results.extend(parent.recv())
        proc.join(timeout=30)
        assert proc.exitcode == 0
    assert all("P1Q" in n for n in results)
    prefixes = {n.split("R")[0] for n in results}
    assert len(prefixes) < len(results)  # the simulation really did repeat time/pid/counter
    assert len(set(results)) == len(results)


# --- local I/O errors -------------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_write_errors_become_local_io_error(
    md: Maildir, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A full disk or quota while writing raises LocalIOError and leaves no tmp debris."""

    def full(fd: int, data: object) -> int:
        raise OSError(code, os.strerror(code))

    msg = md.open_tmp()
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(LocalIOError, match=os.strerror(code)):
        msg.write(b"x" * 200_000)
    assert list(md.tmp.iterdir()) == []
    assert msg.closed


def test_fsync_error_becomes_local_io_error(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO from fsync raises LocalIOError and deletes the file."""

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    msg = md.open_tmp()
    msg.write(b"data")
    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(LocalIOError):
        msg.finish()
    assert not msg.path.exists()


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_open_tmp_errors_become_local_io_error(
    md: Maildir, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """A read-only or unwritable Maildir raises LocalIOError from open_tmp()."""

    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(LocalIOError, match="cannot create a file"):
        md.open_tmp()


def test_unrelated_oserror_is_not_masked(md: Maildir, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError that is not environmental (EBADF: a bug) propagates unchanged."""

    def bad(fd: int, data: object) -> int:
        raise OSError(errno.EBADF, "Bad file descriptor")

    msg = md.open_tmp()
    monkeypatch.setattr(os, "write", bad)
    with pytest.raises(OSError) as info:
        msg.write(b"x" * 100_000)
    assert not isinstance(info.value, LocalIOError)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, when this process may mount one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        unavailable(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_real_full_disk(tiny_tmpfs: Path) -> None:
    """On a really full filesystem the write fails as LocalIOError and the file is gone."""
    md = Maildir(tiny_tmpfs / "Mail")

    def fill() -> None:
        with md.open_tmp() as msg:
            for _ in range(100):
                msg.write(b"y" * 65536)

    with pytest.raises(LocalIOError, match="No space left"):
        fill()
    assert list(md.tmp.iterdir()) == []
    name = write_msg(md, b"small")  # space is back after the partial file was removed
    assert md.deliver([name]) == [f"{name},S=5,W=5"]


def _stored(md: Maildir, chunks: list[bytes]) -> tuple[bytes, int, int]:
    """Write chunks into one tmp message; return (file bytes, size, vsize)."""
    with md.open_tmp() as msg:
        for chunk in chunks:
            msg.write(chunk)
    return msg.path.read_bytes(), msg.size, msg.vsize


WIRE = b"a\r\nb\rc\r\r\nd\n\r\r\nend\r"


@pytest.mark.parametrize("cut", range(len(WIRE) + 1))
def test_lf_conversion_is_independent_of_chunking(md: Maildir, cut: int) -> None:
    """CRLF -> LF with lone CRs kept gives the same bytes and sizes wherever a chunk ends."""
    expected = WIRE.replace(b"\r\n", b"\n")
    data, size, vsize = _stored(md, [WIRE[:cut], WIRE[cut:]])
    assert data == expected == b"a\nb\rc\r\nd\n\r\nend\r"
    assert size == len(expected)
    assert vsize == len(re.sub(rb"(?<!\r)\n", b"\r\n", expected))
    assert _stored(md, [bytes([b]) for b in WIRE])[0] == expected  # byte by byte


def test_crlf_mode_stores_the_wire_form(tmp_path: Path) -> None:
    """line_endings="crlf" keeps every octet; W= counts only bare LFs twice."""
    md = Maildir(tmp_path / "M", line_endings="crlf")
    data, size, vsize = _stored(md, [WIRE[:5], WIRE[5:]])
    assert (data, size) == (WIRE, len(WIRE))
    assert vsize == len(WIRE) + 1  # the one bare LF after "d"


def test_deliver_names_carry_w_and_recovery_counts_it(md: Maildir) -> None:
    """deliver() writes ,W= from the message, or counts it from the file when not told."""
    with md.open_tmp() as told:
        told.write(b"x\r\ny\r\n")
    with md.open_tmp() as untold:
        untold.write(b"p\r\nq\rr\r\n")
    finals = md.deliver([told.name, untold.name], {told.name: told.vsize})
    assert finals == [f"{told.name},S=4,W=6", f"{untold.name},S=6,W=8"]
    assert popsync.maildir.virtual_size(md.new / finals[1]) == 8


def test_modes_come_from_config_and_the_umask_applies(tmp_path: Path) -> None:
    """dir_mode and file_mode are used as given, less the process umask."""
    old = os.umask(0o027)
    try:
        md = Maildir(tmp_path / "G", dir_mode=0o770, file_mode=0o664)
        msg = md.open_tmp()
        msg.finish()
    finally:
        os.umask(old)
    assert mode(md.path) == mode(md.new) == 0o750
    assert mode(msg.path) == 0o640
