"""The store backends the store tests run against: a SQLite file and a real PostgreSQL database, behind one face.

`target` (a fixture parametrized over both) gives a test the TASK_DB to open, a raw backend, a way to read rows
directly, and another session holding the write lock — SQLite's `BEGIN EXCLUSIVE` in another process, PostgreSQL's
`LOCK TABLE … IN EXCLUSIVE MODE` (reads still go on; writes wait out the store's lock timeout).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from store.journal import JournaledStore, open_backend, open_store

_HOLDER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("ROLLBACK")
"""
_PG_TABLES = "tasks, seen_messages, durations, sessions, api_calls, api_calls_by_kind, user_api_calls"


class _SQLiteHold:
    def __init__(self, path: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=5)


class _PostgresHold:
    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)
        self.conn.execute(f"LOCK TABLE {_PG_TABLES} IN EXCLUSIVE MODE")

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()


class StoreTarget:
    """One backend kind and a fresh DB of it (`url`: a file path or a postgresql:// URL)."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind, self.url = kind, url
        # What a write that met the held lock reports (the store's health reason and its log line).
        self.locked_reason = "database is locked" if kind == "sqlite" else "canceling statement due to lock timeout"

    def backend(self, **options):
        return open_backend(self.url, **options)

    def open(self, **options) -> JournaledStore:
        return open_store(self.url, **options)

    def rows(self, sql: str) -> list[tuple]:
        if self.kind == "sqlite":
            db = sqlite3.connect(self.url)
            try:
                return db.execute(sql).fetchall()
            finally:
                db.close()
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql).fetchall()

    def hold_write_lock(self) -> _SQLiteHold | _PostgresHold:
        """Another session holding the DB's write lock until `.release()` (the tables must exist)."""
        return _SQLiteHold(self.url) if self.kind == "sqlite" else _PostgresHold(self.url)


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> StoreTarget:
    """Each store test once on a SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return StoreTarget("sqlite", str(tmp_path / "tasks.db"))
    return StoreTarget("postgresql", request.getfixturevalue("pg_url"))
