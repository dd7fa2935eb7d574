"""How the fleet's claim grows with the number of accounts: ``python -m bench.fleet_claim``.

For each size, a fresh database of a private PostgreSQL (devtools/postgres.py) gets that many
``accounts_lease`` rows, and :meth:`popsync.lease.LeaseStore.claim_due` (limit 8, the way the
fleet scheduler calls it) is timed from the client, best of ``--tries``: with nothing due (an
idle worker's claim, once a second) and with every account due, each with the worker's
``known`` accounts (every account, as FleetScheduler sends them) and without. Claimed leases
are released unchanged after each try, so every try sees the same table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "measure"]

SIZES = (2_000, 20_000, 100_000)


def measure(dsn: str, accounts: int, tries: int) -> list[tuple[str, float]]:
    """Return (case, best seconds) for one database filled with ``accounts`` rows."""
    import psycopg

    from popsync.lease import LeaseStore

    store = LeaseStore(dsn)
    known = [f"u{i}@bench:110" for i in range(accounts)]
    results: list[tuple[str, float]] = []
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO accounts_lease (server, username, next_due)"
                " SELECT 'bench:110', 'u' || i, clock_timestamp() + interval '1 day'"
                " FROM generate_series(0, %s - 1) AS i",
                (accounts,),
            )
            conn.execute("ANALYZE accounts_lease")
            for due in ("nothing due", "all due"):
                if due == "all due":
                    conn.execute("UPDATE accounts_lease SET next_due = clock_timestamp()")
                    conn.execute("ANALYZE accounts_lease")
                for label, subset in (("known = every account", known), ("known = None", None)):
                    best = float("inf")
                    for _ in range(tries):
                        t0 = time.perf_counter()
                        leases = store.claim_due("bench", 8, known=subset)
                        best = min(best, time.perf_counter() - t0)
                        for lease in leases:
                            store.release(lease.token, None)
                    results.append((f"{due}, {label}", best))
    finally:
        store.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table: claim time per table size and case."""
    from devtools.postgres import Postgres

    parser = argparse.ArgumentParser(prog="python -m bench.fleet_claim", description=__doc__)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    root = Path(tempfile.mkdtemp(prefix="popsync-claim-"))
    rows: dict[str, list[float]] = {}
    try:
        with Postgres(root) as pg:
            for size in sizes:
                for case, seconds in measure(pg.new_database("claim"), size, args.tries):
                    rows.setdefault(case, []).append(seconds)
                    print(f"{size:>9,} accounts, {case}: {seconds * 1e3:.1f} ms", file=sys.stderr)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| claim_due(limit 8) | " + " | ".join(f"{s:,} accounts" for s in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for case, values in rows.items():
        print(f"| {case} | " + " | ".join(f"{v * 1e3:.1f} ms" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
