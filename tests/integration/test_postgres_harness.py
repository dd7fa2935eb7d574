"""The throwaway PostgreSQL harness (devtools.postgres) starts, restarts and stops cleanly."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
from pathlib import Path

import psycopg

from devtools.postgres import Postgres, _alive


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_cluster_lifecycle(postgres: Postgres) -> None:
    """A second cluster serves SQL, keeps its data over a restart, and leaves no process behind."""
    root = Path(tempfile.mkdtemp(prefix="popsync-postgres-"))
    try:
        with Postgres(root) as server:
            assert server.port != postgres.port
            dsn = server.new_database("h")
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
            server.restart()
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT x FROM t").fetchall() == [(42,)]
            pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
            owner = server.data_dir.stat().st_uid
            expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
            assert owner == expected  # as root, the cluster runs as the postgres user
        assert not server.running
        assert not _accepts(server.port)
        assert not _alive(pid)
    finally:
        shutil.rmtree(root, ignore_errors=True)
