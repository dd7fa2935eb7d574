"""Seen-store benchmark, SQLite against PostgreSQL (issue 13): ``python -m bench.store``.

Options: ``--messages N`` (10,000), ``--rows N`` (100,000), ``--runs N`` (5), ``--bulk-only``.

1. ``popsync --once`` with nothing new on an N x 4 KiB mailbox (bench scenario c's mailbox,
   POP3S on a private Dovecot), once per store after a first fetch: wall, CPU, peak RSS
   (median of ``--runs``), and how many SQL statements and transactions one such run costs.
   SQLite statements are counted in the popsync process (``set_trace_callback``), PostgreSQL
   statements by the server (``pg_stat_statements``, FETCHes of the streamed reads included)
   and transactions from ``pg_stat_database``.
2. Bulk writes in one process: ``add_pending`` of ``--rows`` new rows in one call, then
   ``mark_delivered`` of the same rows, on an empty store; rows/s of each.

Both stores are durable as in production: SQLite WAL with ``synchronous=FULL``; the private
PostgreSQL cluster runs with ``fsync``, ``synchronous_commit`` and ``full_page_writes`` on
(the test harness turns them off) over TCP loopback. Prints a Markdown section.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import mailgen
from bench.measure import Measurement, run_measured
from devtools.dovecot import Dovecot
from devtools.postgres import Postgres

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
_DURABLE = (
    "ALTER SYSTEM SET fsync = on",
    "ALTER SYSTEM SET synchronous_commit = on",
    "ALTER SYSTEM SET full_page_writes = on",
    "ALTER SYSTEM SET shared_buffers = '128MB'",  # PostgreSQL's default; the harness has 16MB
    "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
)
# Runs popsync's main() counting the SQLite statements of its seen-store.
_SQLITE_COUNTER = (
    "import os, sys\n"
    "import popsync.seen as seen\n"
    "count = [0]\n"
    "setup = seen.SeenStore._setup\n"
    "def traced(self):\n"
    "    self._conn.set_trace_callback(lambda _s: count.__setitem__(0, count[0] + 1))\n"
    "    setup(self)\n"
    "seen.SeenStore._setup = traced\n"
    "from popsync.cli import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "finally:\n"
    "    open(os.environ['STATEMENTS_OUT'], 'w').write(str(count[0]))\n"
    "sys.exit(code)\n"
)


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _config(path: Path, state: Path, maildir: Path, dv: Dovecot, user: Any, store: str) -> Path:
    lines = [f'store = "{store}"'] if store else []
    lines += [
        f'state_dir = "{state}"',
        "[accounts.bench]",
        f'host = "{dv.host}"',
        f"port = {dv.pop3s_port}",
        'tls = "implicit"',
        f'tls_ca_file = "{dv.ca_file}"',
        f'username = "{user.name}"',
        f'password = "{user.password}"',
        f'maildir = "{maildir}"',
        "",
    ]
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _pg_counters(pg: Postgres, dbname: str) -> tuple[int, int]:
    """(statements recorded by pg_stat_statements, committed transactions) so far."""
    import psycopg

    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        calls = conn.execute(
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements"
            " WHERE query NOT ILIKE '%pg_stat_%'"
        ).fetchone()
        xacts = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (dbname,)
        ).fetchone()
    return int(calls[0] if calls else 0), int(xacts[0] if xacts else 0)


def _settle() -> None:
    time.sleep(1.2)  # backends flush their statistics at most every 500 ms (and at exit)


def _nothing_new(
    kind: str, config: Path, work: Path, runs: int, pg: Postgres
) -> tuple[list[Measurement], int, int | None]:
    """Measured nothing-new runs, then one counted run: (runs, statements, transactions)."""
    argv = [sys.executable, "-m", "popsync", "--once", "-c", str(config)]
    first = run_measured(argv, _env(), ROOT, work / f"{kind}-first.log")
    if first.exit_code != 0:
        raise SystemExit(f"{kind}: first fetch failed, see {work}/{kind}-first.log")
    measured = []
    for index in range(runs):
        run = run_measured(argv, _env(), ROOT, work / f"{kind}-{index}.log")
        if run.exit_code != 0:
            raise SystemExit(f"{kind}: run {index} failed, see {work}/{kind}-{index}.log")
        measured.append(run)
    if kind == "sqlite":
        out = work / "statements"
        counted = [sys.executable, "-c", _SQLITE_COUNTER, "--once", "-c", str(config)]
        env = {**_env(), "STATEMENTS_OUT": str(out)}
        run_measured(counted, env, ROOT, work / "sqlite-count.log")
        return measured, int(out.read_text()), None
    dbname = config.read_text().split('"', 2)[1].rsplit("/", 1)[1]
    _settle()
    before = _pg_counters(pg, dbname)
    run_measured(argv, _env(), ROOT, work / "pg-count.log")
    _settle()
    after = _pg_counters(pg, dbname)
    statements, xacts = after[0] - before[0], after[1] - before[1]
    return measured, statements, xacts


def _bulk(kind: str, rows: int, work: Path, pg: Postgres) -> tuple[float, float]:
    """rows/s of add_pending then mark_delivered of ``rows`` rows on an empty store."""
    from popsync.pgstore import PgStore
    from popsync.seen import SeenStore
    from popsync.store import Store

    store: Store
    if kind == "sqlite":
        store = SeenStore.open(work / "bulk" / "popsync.sqlite3")
    else:
        store = PgStore.open(pg.new_database("bulk"), state_dir=work / "bulk-pg")
    items = [(f"{i:016x}@bulk".encode(), f"1700000000.M{i}P1.bench", 4096) for i in range(rows)]
    with store:
        t0 = time.perf_counter()
        store.add_pending("bench@bulk", items, at=1.0)
        t1 = time.perf_counter()
        store.mark_delivered("bench@bulk", [(u, n + ",S=4096") for u, n, _ in items], at=2.0)
        t2 = time.perf_counter()
        assert store.count("bench@bulk") == rows
    return rows / (t1 - t0), rows / (t2 - t1)


def main(argv: list[str] | None = None) -> int:
    """Run both parts and print the Markdown section."""
    parser = argparse.ArgumentParser(prog="python -m bench.store")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--bulk-only", action="store_true", help="skip the --once part")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="popsync-bench-store-"))
    os.chmod(root, 0o755)  # as root Dovecot's and PostgreSQL's users must traverse it
    try:
        with Dovecot(root / "dovecot") as dv, Postgres(root / "pg") as pg:
            for statement in _DURABLE:
                pg.execute(statement)
            pg.restart()
            pg.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            results = {}
            for kind, store in (("sqlite", ""), ("postgresql", pg.new_database("once"))):
                work = root / kind
                work.mkdir()
                if args.bulk_only:
                    continue
                if kind == "sqlite":
                    box = mailgen._fixed("c", args.messages, 4 * mailgen.KIB, 5)
                    user = dv.new_user("store")
                    _log(f"delivering {args.messages} messages")
                    dv.deliver_many(user, box.messages)
                config = _config(
                    work / "popsync.toml", work / "state", work / "Maildir", dv, user, store
                )
                _log(f"{kind}: first fetch + {args.runs} nothing-new runs")
                results[kind] = _nothing_new(kind, config, work, args.runs, pg)
            bulk = {}
            for kind in ("sqlite", "postgresql"):
                _log(f"{kind}: bulk {args.rows} rows")
                bulk[kind] = _bulk(kind, args.rows, root / kind, pg)
    except BaseException:
        _log(f"kept {root} for its logs")
        raise
    shutil.rmtree(root, ignore_errors=True)
    print(_render(args, results, bulk))
    return 0


def _render(
    args: argparse.Namespace,
    results: dict[str, tuple[list[Measurement], int, int | None]],
    bulk: dict[str, tuple[float, float]],
) -> str:
    lines = (
        []
        if args.bulk_only
        else [
            f"`popsync --once`, nothing new, {args.messages:,} x 4 KiB, median of {args.runs}:",
            "",
            "| store | wall s | CPU s | peak RSS MiB | SQL statements | transactions |",
            "|-------|-------:|------:|-------------:|---------------:|-------------:|",
        ]
    )
    for kind, (runs, statements, xacts) in results.items():
        wall = statistics.median(r.wall for r in runs)
        cpu = statistics.median(r.cpu for r in runs)
        rss = statistics.median(r.maxrss_kib for r in runs) / 1024
        shown = "-" if xacts is None else str(xacts)
        lines.append(f"| {kind} | {wall:.2f} | {cpu:.2f} | {rss:.1f} | {statements} | {shown} |")
    lines += [
        "",
        f"Bulk writes, {args.rows:,} rows in one call each, empty store:",
        "",
        "| store | add_pending rows/s | mark_delivered rows/s |",
        "|-------|-------------------:|----------------------:|",
    ]
    for kind, (pending, delivered) in bulk.items():
        lines.append(f"| {kind} | {pending:,.0f} | {delivered:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
