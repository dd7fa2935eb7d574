"""Record the durability steps of a real run and check their order for every message.

``install_trace(out)`` wraps ``os.fsync``, ``os.rename`` and the seen-store's transactions in
this process and writes one JSON line per event to ``out``:

``{"ev": "fsync", "path": ..., "dir": bool}``           after an fsync returned
``{"ev": "rename", "src": ..., "dst": ...}``            after a rename returned
``{"ev": "commit", "kind": "pending"|"delivered", "names": [...], "synchronous": n}``
                                                        after ``add_pending``/``mark_delivered``
                                                        whose SQL trace shows a COMMIT

``check_order(events)`` returns the problems (empty when every message went: file fsync ->
pending commit -> rename into new/ -> fsync of new/ -> delivered commit, with SQLite at
``synchronous = FULL``). ``install_trace(out, disable=...)`` turns one of those fsyncs into a
no-op (that is not recorded) so a test can prove the checker notices: ``"file"`` (a message
file in tmp/), ``"new-dir"`` (the new/ directory) or ``"sqlite"`` (``synchronous = OFF``).

``tests/crashwrap.py --trace FILE [--disable-fsync KIND]`` installs it around a real
``popsync`` run.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

__all__ = ["DISABLE", "check_order", "install_trace", "read_trace"]

DISABLE = ("file", "new-dir", "sqlite")
_SYNCHRONOUS_FULL = 2


class _Trace:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def emit(self, **event: Any) -> None:
        with self._lock:
            self._out.write(json.dumps(event) + "\n")
            self._out.flush()


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _wrap_fsync(trace: _Trace, disable: str | None) -> None:
    real = os.fsync

    def fsync(fd: Any) -> None:
        number = fd if isinstance(fd, int) else fd.fileno()
        path = _fd_path(number)
        is_dir = stat.S_ISDIR(os.fstat(number).st_mode)
        parent = os.path.basename(os.path.dirname(path))
        if (disable == "file" and not is_dir and parent == "tmp") or (
            disable == "new-dir" and is_dir and os.path.basename(path) == "new"
        ):
            return  # the fsync is "forgotten": nothing is flushed and nothing recorded
        real(number)
        trace.emit(ev="fsync", path=path, dir=is_dir)

    os.fsync = fsync


def _wrap_rename(trace: _Trace) -> None:
    real = os.rename

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        trace.emit(ev="rename", src=os.fspath(src), dst=os.fspath(dst))

    os.rename = rename


def _wrap_store(trace: _Trace, disable: str | None) -> None:
    from popsync import seen

    statements = threading.local()
    cls = seen.SeenStore
    real_setup = cls._setup

    def setup(self: seen.SeenStore) -> None:
        real_setup(self)
        if disable == "sqlite":
            self._conn.execute("PRAGMA synchronous = OFF")

        def on_sql(sql: str) -> None:
            log = getattr(statements, "log", None)
            if log is not None:
                log.append(sql.strip().upper())

        self._conn.set_trace_callback(on_sql)

    cls._setup = setup  # type: ignore[method-assign]

    def traced(kind: str, func: Callable[..., Any], names_of: Callable[..., list[str]]) -> Any:
        def wrapper(self: seen.SeenStore, mailbox: str, items: Any, *args: Any, **kw: Any) -> Any:
            statements.log = []
            try:
                result = func(self, mailbox, items, *args, **kw)
            finally:
                log, statements.log = statements.log, None
            if "COMMIT" in log:
                with self._lock:
                    level = self._conn.execute("PRAGMA synchronous").fetchone()[0]
                trace.emit(ev="commit", kind=kind, names=names_of(items), synchronous=level)
            return result

        return wrapper

    cls.add_pending = traced(  # type: ignore[method-assign]
        "pending", cls.add_pending, lambda items: [name for _, name, _ in items]
    )
    cls.mark_delivered = traced(  # type: ignore[method-assign]
        "delivered", cls.mark_delivered, lambda items: [name for _, name in items]
    )


def install_trace(out: TextIO, disable: str | None = None) -> None:
    """Record fsyncs, renames and seen-store commits of this process into ``out``."""
    if disable is not None and disable not in DISABLE:
        raise ValueError(f"unknown fsync to disable {disable!r}")
    trace = _Trace(out)
    _wrap_fsync(trace, disable)
    _wrap_rename(trace)
    _wrap_store(trace, disable)


def read_trace(text: str) -> list[dict[str, Any]]:
    """The events of a trace file, in order."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _first(
    events: Sequence[dict[str, Any]], start: int, match: Callable[[dict[str, Any]], bool]
) -> int | None:
    return next((i for i in range(start, len(events)) if match(events[i])), None)


def _check_message(events: Sequence[dict[str, Any]], pending_at: int, name: str) -> str | None:
    """The first broken step of one message whose pending commit is ``events[pending_at]``."""
    synced = _first(
        events,
        0,
        lambda e: e["ev"] == "fsync" and not e["dir"] and e["path"].endswith(f"/tmp/{name}"),
    )
    if synced is None or synced > pending_at:
        return "its file was not fsynced before the pending commit"
    renamed = _first(
        events, pending_at + 1, lambda e: e["ev"] == "rename" and e["src"].endswith(f"/tmp/{name}")
    )
    if renamed is None:
        return "it was not renamed into new/ after the pending commit"
    final = os.path.basename(events[renamed]["dst"])
    new_dir = os.path.dirname(events[renamed]["dst"])
    flushed = _first(
        events, renamed + 1, lambda e: e["ev"] == "fsync" and e["dir"] and e["path"] == new_dir
    )
    if flushed is None:
        return "new/ was not fsynced after its rename"
    delivered = _first(
        events,
        0,
        lambda e: e["ev"] == "commit" and e["kind"] == "delivered" and final in e["names"],
    )
    if delivered is None or delivered < flushed:
        return "it was marked delivered before new/ was fsynced"
    return None


def check_order(events: Sequence[dict[str, Any]]) -> list[str]:
    """Every message's steps in the durability order, or one problem line per message."""
    problems: list[str] = []
    for index, event in enumerate(events):
        if event["ev"] != "commit":
            continue
        if event["synchronous"] != _SYNCHRONOUS_FULL:
            problems.append(f"commit {index} ran with synchronous={event['synchronous']}")
        if event["kind"] != "pending":
            continue
        for name in event["names"]:
            broken = _check_message(events, index, name)
            if broken is not None:
                problems.append(f"{name}: {broken}")
    return problems
