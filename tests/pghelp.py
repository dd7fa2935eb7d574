"""Helpers for tests against PostgreSQL: a private cluster a test may stop and start."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.postgres import Postgres, postgres_available
from tests.conftest import unavailable

__all__ = ["private_postgres"]


@contextmanager
def private_postgres(password: str | None = None) -> Iterator[Postgres]:
    """A cluster of the test's own (the session one must never be stopped), removed after.

    With ``password`` every connection must authenticate with it (SCRAM).

    Outside pytest's 0700 temp base: as root the server runs as the postgres user.
    """
    if not postgres_available():
        unavailable("PostgreSQL is not installed: ./dev setup installs it")
    root = Path(tempfile.mkdtemp(prefix="popsync-postgres-"))
    try:
        with Postgres(root, password=password) as server:
            yield server
    finally:
        shutil.rmtree(root, ignore_errors=True)
