"""The SQLite task store: one file, created 0600, its schema migrated, opened read-only for the operator's tools.

`ops/doctor.py` uses `store_writable` to see whether the file takes a write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from urllib.parse import quote

from common.logs import task_log
from dingtalk.api_budget import day_of
from store.base import task_from_row, task_to_row
from store.schema import (
    FLAGS,
    SCHEMA_VERSION,
    SQLITE_STEPS,
    SQLITE_VERSION_TABLE,
    TASK_COLUMNS,
    StoreError,
    newer_than_known,
)
from tasks.task import FINISHED_STATUSES, Task

log = logging.getLogger("task_store")


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the DB's schema to SCHEMA_VERSION in one transaction (docs: store/schema.py)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(SQLITE_VERSION_TABLE)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(newer_than_known(version, path))
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in filter(str.strip, SQLITE_STEPS[step].split(";")):
                db.execute(statement)
        present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
        for name in TASK_COLUMNS:  # a DB made by an older version gains the columns of newer Task fields
            if name not in present:
                default = " DEFAULT 0" if name in FLAGS else ""
                db.execute(f"ALTER TABLE tasks ADD COLUMN {name}{' INTEGER' if default else ''}{default}")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version VALUES (?)", (max(version, SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _why(exc: BaseException) -> str:
    """An exception as a few words on one line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def open_error(absolute: str, exc: sqlite3.Error) -> StoreError:
    """The one-line StoreError for a SQLite error met while opening `absolute`."""
    why = _why(exc)
    if "not a database" in why:
        return StoreError(f"TASK_DB {absolute} is not a SQLite database (corrupt?): move it away or point TASK_DB "
                          "elsewhere")
    if "full" in why:
        return StoreError(f"TASK_DB {absolute} cannot be written ({why}): free some space on its disk or point TASK_DB "
                          "elsewhere")
    if "locked" in why or "busy" in why:
        return StoreError(f"TASK_DB {absolute} is held by another process ({why}): stop that process (another bot?) "
                          "or point TASK_DB elsewhere")
    return StoreError(f"TASK_DB {absolute} cannot be opened ({why}): make the file and its directory readable and "
                      "writable for this user, or point TASK_DB elsewhere")


def create_file(absolute: str) -> None:
    """Create the DB file (and its directory), the bot's alone: 0600 (the WAL files follow its mode)."""
    directory = os.path.dirname(absolute)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, FileExistsError) else _why(exc)
        raise StoreError(f"TASK_DB {absolute}: cannot create its directory {directory} ({why}): create it, writable "
                         "for this user, or point TASK_DB elsewhere") from exc
    try:
        os.close(os.open(absolute, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as exc:
        raise StoreError(f"TASK_DB {absolute} cannot be opened for reading and writing ({_why(exc)}): fix its "
                         "permissions or point TASK_DB elsewhere") from exc


def read_only_uri(absolute: str) -> str:
    # A read-only connection to a WAL database creates -wal and -shm files if they are missing (owned by whoever
    # ran it, possibly root); without them every row is in the main file, which `immutable` reads as it is.
    if os.path.exists(absolute + "-wal") and os.path.exists(absolute + "-shm"):
        return f"file:{quote(absolute)}?mode=ro"
    return f"file:{quote(absolute)}?mode=ro&immutable=1"


def store_writable(path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the SQLite task DB at `path` exists and takes a write lock; (ok, reason when not)."""
    if path == ":memory:":
        return True, ""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        return False, f"{absolute} does not exist"
    try:
        db = sqlite3.connect(f"file:{quote(absolute)}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, f"{absolute}: {exc}"
    return True, ""


_SAVE_TASK = (f"INSERT INTO tasks ({', '.join(TASK_COLUMNS)}) VALUES ({', '.join(':' + c for c in TASK_COLUMNS)}) "
              f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in TASK_COLUMNS if c != 'id')} "
              "WHERE tasks.created_at IS excluded.created_at")
_OPEN_TIMEOUT = 10.0  # at start-up another process (a backup, an old bot stopping) may hold the DB a while


class SQLiteTaskStore:
    """The daemon's store backend: one SQLite file in WAL mode, one connection for writes and one for reads.

    In WAL mode readers never wait for the writer, so a read is not held up by a write waiting for a lock.
    `read_only=True` opens an existing file without creating or writing anything (`bot.py tasks`).
    Raises StoreError when the file cannot be opened.
    """

    def __init__(self, path: str, *, read_only: bool = False, busy_timeout: float = 10.0) -> None:
        self.path = path
        self.read_only = read_only
        absolute = path if path == ":memory:" else os.path.abspath(path)
        self._write_lock = threading.RLock()  # re-entered by the writes inside transaction()
        self._read_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        try:
            if read_only:
                self._reader = sqlite3.connect(read_only_uri(absolute), uri=True, check_same_thread=False,
                                               isolation_level=None, timeout=busy_timeout)
                if not self._reader.execute("SELECT 1 FROM sqlite_master WHERE name = 'tasks'").fetchall():
                    raise StoreError(f"TASK_DB {absolute} has no tasks table: it is not the bot's task DB")
            else:
                if path != ":memory:":
                    create_file(absolute)
                self._writer = self._open_writer(path, busy_timeout)
                if path == ":memory:":  # one connection is the whole DB
                    self._reader, self._read_lock = self._writer, self._write_lock
                else:
                    self._reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                                   timeout=busy_timeout)
                    self._reader.execute("PRAGMA query_only = ON")
        except sqlite3.Error as exc:
            raise open_error(absolute, exc) from exc
        self._reader.row_factory = sqlite3.Row

    def _open_writer(self, path: str, busy_timeout: float) -> sqlite3.Connection:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=_OPEN_TIMEOUT)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        migrate(db, path)
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")  # from now on a held lock fails fast
        return db

    def _writable(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreError(f"TASK_DB {self.path} is open read-only")
        return self._writer

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._reader.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple | dict = ()) -> sqlite3.Cursor:
        with self._write_lock:
            return self._writable().execute(sql, args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes made inside (by this thread) are committed together, or not at all if one raises."""
        with self._write_lock:
            db = self._writable()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):  # the error that got us here is the one to report
                        db.execute("ROLLBACK")
                raise

    def save(self, task: Task) -> None:
        """Insert the task's row, or update it if it exists. Never overwrites another task's row."""
        if not self._write(_SAVE_TASK, task_to_row(task)).rowcount:
            task_log(log, task).error("任务ID冲突，数据库中已有另一任务 %s，未覆盖", task.id)

    def get(self, task_id: str) -> Task | None:
        rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return task_from_row(dict(rows[0])) if rows else None

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        sql, args = "SELECT * FROM tasks WHERE 1=1", []
        if statuses is not None:
            wanted = list(statuses)
            sql += f" AND status IN ({','.join('?' for _ in wanted)})"
            args += wanted
        if undelivered_only:
            sql += " AND delivered = 0"
        return [task_from_row(dict(r)) for r in self._query(sql + " ORDER BY created_at", tuple(args))]

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        if user_id is None:
            rows = self._query("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._query("SELECT * FROM tasks WHERE user_id = ? ORDER BY created_at DESC LIMIT ?",
                               (user_id, limit))
        return [task_from_row(dict(r)) for r in rows]

    def recent_messages(self, since: float) -> dict[str, float]:
        """msgIds seen since `since`, with when (a day of them: the dedup set a JournaledStore keeps in memory)."""
        return {r[0]: r[1] for r in self._query("SELECT msg_id, seen_at FROM seen_messages WHERE seen_at >= ?",
                                                (since,))}

    def count(self, user_id: str | None = None, status: str | None = None) -> int:
        """How many tasks there are, of one user and/or status (read-only: `bot.py tasks` says what --limit cut)."""
        sql, args = "SELECT COUNT(*) FROM tasks WHERE 1=1", []
        for column, value in (("user_id", user_id), ("status", status)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return int(self._query(sql, tuple(args))[0][0])

    def remember_message(self, msg_id: str, now: float) -> bool:
        cursor = self._write("INSERT OR IGNORE INTO seen_messages (msg_id, seen_at) VALUES (?, ?)", (msg_id, now))
        return cursor.rowcount == 1

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        self._write("INSERT INTO durations VALUES (?, ?, ?, ?)", (user_id, keyword, seconds, now))

    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]:
        if user_id is None:
            rows = self._query("SELECT seconds FROM durations WHERE keyword = ? ORDER BY finished_at DESC LIMIT ?",
                               (keyword, limit))
        else:
            rows = self._query("SELECT seconds FROM durations WHERE keyword = ? AND user_id = ? "
                               "ORDER BY finished_at DESC LIMIT ?", (keyword, user_id, limit))
        return [r[0] for r in rows]

    def session_for(self, conversation_key: str) -> str | None:
        rows = self._query("SELECT session_id FROM sessions WHERE conversation_key = ?", (conversation_key,))
        return rows[0][0] if rows else None

    def set_session(self, conversation_key: str, session_id: str) -> None:
        self._write("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (conversation_key, session_id))

    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None:
        """Add `count` calls to the month's counter, and to the kind's and the user's day's when given (one
        statement each: concurrent adds are never lost; the journal writes them in one transaction)."""
        self._write("INSERT INTO api_calls (month, calls) VALUES (?, ?) "
                    "ON CONFLICT (month) DO UPDATE SET calls = calls + excluded.calls", (month, count))
        if kind:
            self._write("INSERT INTO api_calls_by_kind (month, kind, calls) VALUES (?, ?, ?) "
                        "ON CONFLICT (month, kind) DO UPDATE SET calls = calls + excluded.calls", (month, kind, count))
        if day and user_id:
            self._write("INSERT INTO user_api_calls (day, user_id, calls) VALUES (?, ?, ?) "
                        "ON CONFLICT (day, user_id) DO UPDATE SET calls = calls + excluded.calls",
                        (day, user_id, count))

    def api_calls(self, month: str) -> int:
        rows = self._query("SELECT calls FROM api_calls WHERE month = ?", (month,))
        return int(rows[0][0]) if rows else 0

    def api_calls_by_kind(self, month: str) -> dict[str, int]:
        rows = self._query("SELECT kind, calls FROM api_calls_by_kind WHERE month = ?", (month,))
        return {str(r[0]): int(r[1]) for r in rows}

    def user_api_calls(self, day: str, user_id: str) -> int:
        rows = self._query("SELECT calls FROM user_api_calls WHERE day = ? AND user_id = ?", (day, user_id))
        return int(rows[0][0]) if rows else 0

    def purge(self, finished_before: float, seen_before: float) -> int:
        finished = tuple(FINISHED_STATUSES)
        with self._write_lock:
            cursor = self._write(
                f"DELETE FROM tasks WHERE (delivered = 1 OR undeliverable = 1) AND finished_at < ? "
                f"AND status IN ({','.join('?' * 4)})",
                (finished_before, *finished))
            self._write("DELETE FROM seen_messages WHERE seen_at < ?", (seen_before,))
            self._write("DELETE FROM durations WHERE finished_at < ?", (finished_before,))
            self._write("DELETE FROM user_api_calls WHERE day < ?", (day_of(finished_before),))
            return cursor.rowcount

    def schema_version(self) -> int:
        """The schema version the DB is at (0: made before the version table)."""
        if not self._query("SELECT name FROM sqlite_master WHERE name = 'schema_version'"):
            return 0
        return int(self._query("SELECT version FROM schema_version")[0][0])

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        if self._writer is not None and self._writer is not self._reader:
            with self._write_lock:
                self._writer.close()
