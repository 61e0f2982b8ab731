"""Where tasks live across restarts: the store protocols, an in-memory store and the SQLite backend with its schema.

The task logic sees only `TaskStore`; the daemon's is a `store_journal.JournaledStore` around `SQLiteTaskStore`.
`task_store_pg.PostgresTaskStore` is the other backend (TASK_DB=postgresql://…), with the same `StoreBackend` methods.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from common.logs import task_log
from dingtalk_sender import Route
from store.schema import FLAGS as _FLAGS
from store.schema import TASK_COLUMNS, StoreError
from store.sqlite_files import create_file, migrate, open_error, read_only_uri
from tasks.task import FINISHED_STATUSES, Task

log = logging.getLogger("task_store")


@dataclass(frozen=True)
class StoreHealth:
    """Whether the store is writing: `ok`, else why not, how many records wait in memory, and since when."""

    ok: bool
    reason: str = ""
    pending: int = 0
    since: float | None = None  # wall-clock time the outage began


class TaskRecords(Protocol):
    """The reads and writes every store has."""

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
    def add_api_calls(self, month: str, count: int) -> None: ...  # the org's monthly API budget: atomic increment
    def api_calls(self, month: str) -> int: ...


class TaskStore(TaskRecords, Protocol):
    """What the task logic sees: tasks, dedup keys, durations and conversation sessions across restarts."""

    def wait_written(self, timeout: float) -> bool: ...  # True once what was written before is committed
    def health(self) -> StoreHealth: ...  # never touches the DB: for /healthz
    def close(self) -> None: ...


class StoreBackend(TaskRecords, Protocol):
    """Where a `JournaledStore` writes: the same calls, synchronous, plus the recent msgIds and a transaction."""

    def recent_messages(self, since: float) -> dict[str, float]: ...
    def transaction(self) -> contextlib.AbstractContextManager: ...
    def close(self) -> None: ...




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
    """A store that forgets everything on exit: for unit tests and the console (every write is done at once)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}
        self._seen: dict[str, float] = {}
        self._durations: list[tuple[str, str, float, float]] = []
        self._sessions: dict[str, str] = {}
        self._api_calls: dict[str, int] = {}

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

    def recent_messages(self, since: float) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in self._seen.items() if v >= since}

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

    def add_api_calls(self, month: str, count: int) -> None:
        with self._lock:
            self._api_calls[month] = self._api_calls.get(month, 0) + count

    def api_calls(self, month: str) -> int:
        with self._lock:
            return self._api_calls.get(month, 0)

    def purge(self, finished_before: float, seen_before: float) -> int:
        with self._lock:
            old = [k for k, t in self._tasks.items()
                   if t.finished and (t.delivered or t.undeliverable) and (t.finished_at or 0) < finished_before]
            for key in old:
                del self._tasks[key]
            self._seen = {k: v for k, v in self._seen.items() if v >= seen_before}
            return len(old)

    def transaction(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wait_written(self, timeout: float) -> bool:
        return True

    def health(self) -> StoreHealth:
        return StoreHealth(ok=True)

    def close(self) -> None:
        pass




# A task's first save inserts its row, later ones update it. Not INSERT OR REPLACE: a task whose id collides with
# another's (another created_at) changes no row, so it never overwrites one.
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
        if not self._write(_SAVE_TASK, _task_to_row(task)).rowcount:
            task_log(log, task).error("任务ID冲突，数据库中已有另一任务 %s，未覆盖", task.id)

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

    def add_api_calls(self, month: str, count: int) -> None:
        """Add `count` calls to the month's counter (one statement: concurrent adds are never lost)."""
        self._write("INSERT INTO api_calls (month, calls) VALUES (?, ?) "
                    "ON CONFLICT (month) DO UPDATE SET calls = calls + excluded.calls", (month, count))

    def api_calls(self, month: str) -> int:
        rows = self._query("SELECT calls FROM api_calls WHERE month = ?", (month,))
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
