"""One connection to the task DB for a feature's own table (schedules, usage): SQLite or PostgreSQL, a transaction as
a function running statements, and a new connection once a lost PostgreSQL server answers again.

The task store creates and migrates every table (store/schema.py); a feature table only reads and writes its rows.
Statements are written with `%s` placeholders (PostgreSQL's); on SQLite they become `?` and `FOR UPDATE SKIP LOCKED`
is dropped (`BEGIN IMMEDIATE` takes the one write lock instead).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any

from psycopg.rows import dict_row

from store.pg_connect import connect
from store.postgres import is_postgres_url
from store.sqlite import migrate

Run = Callable[[str, tuple], list[dict]]


class FeatureTable:
    """The connection of one feature's table in `task_db` (a SQLite path, or a postgresql:// URL shared by the
    hosts); `table` is checked to exist on PostgreSQL (the task store migrated it)."""

    def __init__(self, task_db: str, table: str) -> None:
        self.shared = is_postgres_url(task_db)
        self._url = task_db
        self._lock = threading.Lock()  # one statement or transaction at a time on the one connection
        if self.shared:
            self._conn: Any = self._connect()
            self._conn.execute(f"SELECT 1 FROM {table} LIMIT 0")
            self._conn.commit()
        else:
            self._conn = sqlite3.connect(task_db, check_same_thread=False, isolation_level=None, timeout=10)
            self._conn.row_factory = sqlite3.Row
            if task_db == ":memory:":
                migrate(self._conn, task_db)

    def _connect(self) -> Any:
        conn = connect(self._url, autocommit=False)
        conn.row_factory = dict_row
        return conn

    def _sql(self, sql: str) -> str:
        return sql if self.shared else sql.replace("%s", "?").replace(" FOR UPDATE SKIP LOCKED", "")

    @contextlib.contextmanager
    def _transaction(self, write: bool = True) -> Iterator[Run]:
        """A transaction, as a function running one statement in it and returning its rows (SQLite: a read one takes
        no write lock)."""
        with self._lock:
            if self.shared and (self._conn.closed or self._conn.broken):  # the DB came back: a new connection
                self._conn = self._connect()

            def run(sql: str, args: tuple = ()) -> list[dict]:
                cursor = self._conn.execute(self._sql(sql), args)
                return [dict(row) for row in cursor.fetchall()] if cursor.description else []
            if not self.shared:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield run
                self._conn.execute("COMMIT") if not self.shared else self._conn.commit()
            except BaseException:
                with contextlib.suppress(Exception):
                    self._conn.execute("ROLLBACK") if not self.shared else self._conn.rollback()
                raise

    def _query(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._transaction(write=False) as run:
            return run(sql, args)

    def close(self) -> None:
        with self._lock, contextlib.suppress(Exception):
            self._conn.close()
