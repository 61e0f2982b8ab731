"""Where tasks live across restarts: the store protocol, an in-memory store and the SQLite store with its schema.

The task logic sees only `TaskStore`; a new backend (e.g. PostgreSQL) is one more class with these methods.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import replace
from typing import Protocol
from urllib.parse import quote

from dingtalk_sender import Route
from task import FINISHED_STATUSES, Task


class StoreError(Exception):
    """The task store cannot be opened; the message is one line naming the path, the cause and the fix."""


class TaskStore(Protocol):
    """Where tasks, dedup keys, durations and conversation sessions live across restarts."""

    def save(self, task: Task) -> None: ...
    def get(self, task_id: str) -> Task | None: ...
    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]: ...
    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]: ...
    def remember_message(self, msg_id: str, now: float) -> bool: ...
    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None: ...
    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]: ...
    def session_for(self, conversation_key: str) -> str | None: ...
    def set_session(self, conversation_key: str, session_id: str) -> None: ...
    def purge(self, finished_before: float, seen_before: float) -> int: ...
    def batch(self) -> contextlib.AbstractContextManager: ...
    def close(self) -> None: ...


_FLAGS = ("background", "delivered", "cancel_requested", "undeliverable")  # booleans stored as 0/1


def _task_to_row(task: Task) -> dict:
    row = dict(task.__dict__)  # not dataclasses.asdict: it deep-copies, and this runs on every transition
    row["route"] = json.dumps(task.route.__dict__, ensure_ascii=False)
    for name in _FLAGS:
        row[name] = int(row[name])
    return row


def _task_from_row(row: dict) -> Task:
    values = dict(row)
    values["route"] = Route(**json.loads(values["route"]))
    for name in _FLAGS:
        values[name] = bool(values[name])
    return Task(**values)


class MemoryTaskStore:
    """A store that forgets everything on exit: for unit tests and the console."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._seen: dict[str, float] = {}
        self._durations: list[tuple[str, str, float, float]] = []
        self._sessions: dict[str, str] = {}

    def save(self, task: Task) -> None:
        with self._lock:
            self._tasks[task.id] = replace(task)

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            task = self._tasks.get(task_id)
            return replace(task) if task else None

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        wanted = set(statuses) if statuses is not None else None
        with self._lock:
            tasks = [replace(t) for t in self._tasks.values()
                     if (wanted is None or t.status in wanted) and not (undelivered_only and t.delivered)]
        return sorted(tasks, key=lambda t: t.created_at)

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        with self._lock:
            tasks = [replace(t) for t in self._tasks.values() if user_id is None or t.user_id == user_id]
        return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit]

    def remember_message(self, msg_id: str, now: float) -> bool:
        with self._lock:
            if msg_id in self._seen:
                return False
            self._seen[msg_id] = now
            return True

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        with self._lock:
            self._durations.append((user_id, keyword, seconds, now))

    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]:
        with self._lock:
            rows = [d for d in self._durations if d[1] == keyword and (user_id is None or d[0] == user_id)]
        return [d[2] for d in rows[-limit:]]

    def session_for(self, conversation_key: str) -> str | None:
        with self._lock:
            return self._sessions.get(conversation_key)

    def set_session(self, conversation_key: str, session_id: str) -> None:
        with self._lock:
            self._sessions[conversation_key] = session_id

    def purge(self, finished_before: float, seen_before: float) -> int:
        with self._lock:
            old = [k for k, t in self._tasks.items()
                   if t.finished and (t.delivered or t.undeliverable) and (t.finished_at or 0) < finished_before]
            for key in old:
                del self._tasks[key]
            self._seen = {k: v for k, v in self._seen.items() if v >= seen_before}
            return len(old)

    def batch(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT, conversation_key TEXT, route TEXT NOT NULL,
    prompt TEXT NOT NULL, keyword TEXT, status TEXT NOT NULL, background INTEGER, created_at REAL,
    started_at REAL, finished_at REAL, result TEXT, error TEXT, delivered INTEGER, attempts INTEGER,
    last_step TEXT, msg_id TEXT, last_progress_at REAL, cancel_requested INTEGER DEFAULT 0,
    undeliverable INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, delivered);
CREATE TABLE IF NOT EXISTS seen_messages (msg_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS durations (user_id TEXT, keyword TEXT, seconds REAL, finished_at REAL);
CREATE INDEX IF NOT EXISTS durations_keyword_user ON durations (keyword, user_id, finished_at);
CREATE INDEX IF NOT EXISTS durations_keyword_recent ON durations (keyword, finished_at);
CREATE TABLE IF NOT EXISTS sessions (conversation_key TEXT PRIMARY KEY, session_id TEXT NOT NULL);
"""
_TASK_COLUMNS = [f.name for f in Task.__dataclass_fields__.values()]


class SQLiteTaskStore:
    """The daemon's store: one SQLite file in WAL mode, shared by all threads behind a lock."""

    def __init__(self, path: str) -> None:
        if path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))  # a new DB is the bot's alone (WAL files follow)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """A DB made by an older version gains the columns of newer Task fields (NULL-safe defaults)."""
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name in _TASK_COLUMNS:
            if name not in present:
                default = " DEFAULT 0" if name in _FLAGS else ""
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name}{' INTEGER' if default else ''}{default}")

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def save(self, task: Task) -> None:
        row = _task_to_row(task)
        placeholders = ",".join("?" for _ in _TASK_COLUMNS)
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO tasks ({','.join(_TASK_COLUMNS)}) VALUES ({placeholders})",
                             tuple(row[c] for c in _TASK_COLUMNS))

    def get(self, task_id: str) -> Task | None:
        rows = self._query("SELECT * FROM tasks WHERE id = ?", (task_id,))
        return _task_from_row(dict(rows[0])) if rows else None

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        sql, args = "SELECT * FROM tasks WHERE 1=1", []
        if statuses is not None:
            wanted = list(statuses)
            sql += f" AND status IN ({','.join('?' for _ in wanted)})"
            args += wanted
        if undelivered_only:
            sql += " AND delivered = 0"
        return [_task_from_row(dict(r)) for r in self._query(sql + " ORDER BY created_at", tuple(args))]

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        if user_id is None:
            rows = self._query("SELECT * FROM tasks ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._query("SELECT * FROM tasks WHERE user_id = ? ORDER BY created_at DESC LIMIT ?",
                               (user_id, limit))
        return [_task_from_row(dict(r)) for r in rows]

    def count(self, user_id: str | None = None, status: str | None = None) -> int:
        """How many tasks there are, of one user and/or status (read-only: `bot.py tasks` says what --limit cut)."""
        sql, args = "SELECT COUNT(*) FROM tasks WHERE 1=1", []
        for column, value in (("user_id", user_id), ("status", status)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        return int(self._query(sql, tuple(args))[0][0])

    def remember_message(self, msg_id: str, now: float) -> bool:
        with self._lock:
            cursor = self._db.execute("INSERT OR IGNORE INTO seen_messages (msg_id, seen_at) VALUES (?, ?)",
                                      (msg_id, now))
            return cursor.rowcount == 1

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO durations VALUES (?, ?, ?, ?)", (user_id, keyword, seconds, now))

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
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?)", (conversation_key, session_id))

    def purge(self, finished_before: float, seen_before: float) -> int:
        finished = tuple(FINISHED_STATUSES)
        with self._lock:
            cursor = self._db.execute(
                f"DELETE FROM tasks WHERE (delivered = 1 OR undeliverable = 1) AND finished_at < ? "
                f"AND status IN ({','.join('?' * 4)})",
                (finished_before, *finished))
            self._db.execute("DELETE FROM seen_messages WHERE seen_at < ?", (seen_before,))
            self._db.execute("DELETE FROM durations WHERE finished_at < ?", (finished_before,))
            return cursor.rowcount

    @contextlib.contextmanager
    def batch(self):
        """Commit the writes made inside (by any thread) in one transaction: one WAL commit per batch."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            with self._lock:
                self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


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
