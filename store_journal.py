"""The write-behind task store: writes go to an ordered in-memory journal at once, one thread commits them.

`JournaledStore` wraps a `StoreBackend` (the SQLite store; PostgreSQL later). Its writes never wait for the DB and
never raise; its reads see the backend with the journal laid over it. While the DB cannot be written (locked,
disk full, I/O errors) records wait in memory, `health()` says so, and the writer retries with backoff, in order.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, NamedTuple, TypeVar

from task import Task
from task_store import SQLiteTaskStore, StoreBackend, StoreHealth

log = logging.getLogger("task_store")

T = TypeVar("T")
WRITE_FAILED = "任务数据库写入失败，记录暂存内存 (%s)"
READ_FAILED = "任务数据库读取失败，使用内存中的记录 (%s)"
STILL_FAILING = "任务数据库仍不可用 (%s)"
RECOVERED = "任务数据库已恢复，已写入积压的 %d 条记录"
LOST = "任务数据库关闭时仍有 %d 条记录未写入，已丢失 (%s)"
_EXPECTED = (sqlite3.Error, OSError)  # a DB that is locked, full or failing; anything else is a bug: traceback


class _Entry(NamedTuple):
    """One journaled write: its place in the order and the backend call that makes it."""

    seq: int
    method: str
    args: tuple


def _coalesce(entries: list[_Entry]) -> list[_Entry]:
    """Of several saves of one task only the last is kept (a save writes the whole task); the order stays."""
    last = {e.args[0].id: e.seq for e in entries if e.method == "save"}
    return [e for e in entries if e.method != "save" or last[e.args[0].id] == e.seq]


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _overlaid(stored: list[Task], pending: Iterable[Task], wanted: Callable[[Task], bool]) -> list[Task]:
    """`stored` with the journal's versions laid over them (the journal wins), those `wanted` only."""
    merged = {task.id: task for task in stored}
    merged.update({task.id: replace(task) for task in pending})
    return [task for task in merged.values() if wanted(task)]


class JournaledStore:
    """A `TaskStore` whose writes reach `backend` through an in-memory journal, on the "store-writer" thread.

    `_lock` guards the journal and what it lays over the backend; it is never held during DB I/O. Only the
    writer thread writes to the backend, one transaction per flush; entries leave the journal once committed.
    `health()` (for /healthz: `degraded` when not ok) never touches the DB.
    """

    def __init__(self, backend: StoreBackend, *, backoff: float = 0.2, max_backoff: float = 5.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._backend = backend
        self._backoff, self._max_backoff = backoff, max_backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here for entries
        self._done = threading.Condition(self._lock)  # wait_written waits here for commits
        self._journal: list[_Entry] = []
        self._seq = 0  # the last entry journaled
        self._written = 0  # every entry up to here is committed
        self._tasks: dict[str, tuple[int, Task]] = {}  # pending saves by task id: (seq, copy)
        self._seen: dict[str, int] = {}  # pending msgIds
        self._durations: list[_Entry] = []
        self._sessions: dict[str, tuple[int, str]] = {}
        self._down_since: float | None = None  # set while the DB cannot be written (or read)
        self._down_reason = ""
        self._closing = False
        self._closed = False
        self._close_by = float("inf")  # monotonic time the writer gives up at, once closing
        self._dedup = threading.Lock()  # one remember_message check-then-record at a time
        self._retry_now = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- writes: journaled, never blocking on the DB

    def _append(self, method: str, args: tuple) -> _Entry:
        """Journal one write (the caller holds `_lock`)."""
        if self._closed:
            log.error("任务数据库已关闭，记录未写入 (%s)", method)
        self._seq += 1
        entry = _Entry(self._seq, method, args)
        self._journal.append(entry)
        self._work.notify()
        return entry

    def save(self, task: Task) -> None:
        """Journal a copy of `task` (reads see it at once); the writer inserts or updates its row."""
        copy = replace(task)
        with self._lock:
            self._tasks[copy.id] = (self._append("save", (copy,)).seq, copy)

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        """Journal one run's duration."""
        with self._lock:
            self._durations.append(self._append("record_duration", (user_id, keyword, seconds, now)))

    def set_session(self, conversation_key: str, session_id: str) -> None:
        """Journal a conversation's CodeBuddy session."""
        with self._lock:
            entry = self._append("set_session", (conversation_key, session_id))
            self._sessions[conversation_key] = (entry.seq, session_id)

    def purge(self, finished_before: float, seen_before: float) -> int:
        """Journal a purge of old delivered tasks and msgIds; 0 here, the writer logs how many it removed."""
        with self._lock:
            self._append("purge", (finished_before, seen_before))
        return 0

    def remember_message(self, msg_id: str, now: float) -> bool:
        """Record a DingTalk msgId; False when it was seen before (journaled or in the DB). Answered now."""
        with self._dedup:
            with self._lock:
                if msg_id in self._seen:
                    return False
            if self._read(lambda: self._backend.message_seen(msg_id), False):
                return False
            with self._lock:
                self._seen[msg_id] = self._append("remember_message", (msg_id, now)).seq
            return True

    # -- reads: the backend with the journal laid over it

    def _read(self, read: Callable[[], T], fallback: T) -> T:
        """A backend read; if it fails, `fallback` (what memory has) and the store counts as degraded."""
        if self._closed:
            return fallback
        try:
            return read()
        except Exception as exc:
            self._went_down(exc, READ_FAILED)
            return fallback

    def _pending_tasks(self) -> list[Task]:
        # Taken before the backend read: a task committed meanwhile is then still in one of the two.
        with self._lock:
            return [task for _, task in self._tasks.values()]

    def get(self, task_id: str) -> Task | None:
        """The task with this id: its journaled version, else the DB's."""
        with self._lock:
            pending = self._tasks.get(task_id)
        if pending is not None:
            return replace(pending[1])
        return self._read(lambda: self._backend.get(task_id), None)

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        """Tasks with these statuses (all when None), oldest first."""
        wanted = tuple(statuses) if statuses is not None else None
        pending = self._pending_tasks()
        stored = self._read(lambda: self._backend.load(wanted, undelivered_only), [])
        tasks = _overlaid(stored, pending, lambda t: (wanted is None or t.status in wanted)
                          and not (undelivered_only and t.delivered))
        return sorted(tasks, key=lambda t: t.created_at)

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        """A user's (None: everyone's) newest `limit` tasks, newest first."""
        pending = self._pending_tasks()
        stored = self._read(lambda: self._backend.recent_for_user(user_id, limit), [])
        tasks = _overlaid(stored, pending, lambda t: user_id is None or t.user_id == user_id)
        return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit]

    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]:
        """Recent run durations of a keyword class, newest first (a duration committed mid-read may count twice)."""
        with self._lock:
            pending = [e.args[2] for e in reversed(self._durations)
                       if e.args[1] == keyword and (user_id is None or e.args[0] == user_id)]
        return (pending + self._read(lambda: self._backend.durations(keyword, user_id, limit), []))[:limit]

    def session_for(self, conversation_key: str) -> str | None:
        """A conversation's CodeBuddy session id, or None."""
        with self._lock:
            pending = self._sessions.get(conversation_key)
        if pending is not None:
            return pending[1]
        return self._read(lambda: self._backend.session_for(conversation_key), None)

    # -- health, waiting and closing

    def health(self) -> StoreHealth:
        """Whether the DB is being written, and how many records wait in memory (never touches the DB)."""
        with self._lock:
            return StoreHealth(ok=self._down_since is None, reason=self._down_reason, pending=len(self._journal),
                               since=self._down_since)

    def wait_written(self, timeout: float) -> bool:
        """Block until every write journaled before the call is committed; False at once while the DB is down,
        or after `timeout` s (the records stay in memory either way)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._seq
            while self._written < target:
                remaining = deadline - time.monotonic()
                if self._down_since is not None or self._closed or remaining <= 0:
                    return False
                self._done.wait(remaining)
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Write what can be written within `timeout` s and stop; records left unwritten are logged as lost."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._close_by = time.monotonic() + timeout
            self._work.notify()
        self._retry_now.set()
        self._thread.join(timeout)
        with self._lock:
            self._closed = True
            lost, reason = len(self._journal), self._down_reason
        if lost:
            log.error(LOST, lost, reason or "超时")
        if not self._thread.is_alive():  # else it is still inside a DB call: the process exit ends it
            try:
                self._backend.close()
            except Exception:
                log.exception("关闭任务数据库失败")

    # -- the writer thread

    def _run(self) -> None:
        delay = self._backoff
        while True:
            try:
                entries = self._next_entries()
                if entries is None:
                    return
                self._flush(entries)
                delay = self._backoff
            except Exception as exc:  # the writer outlives anything: the records wait, the next try comes later
                self._went_down(exc, WRITE_FAILED)
                self._retry_now.wait(min(delay, max(0.0, self._close_by - time.monotonic())))
                self._retry_now.clear()
                delay = min(delay * 2, self._max_backoff)

    def _next_entries(self) -> list[_Entry] | None:
        """Wait for entries (while down, an empty list is a probe); None when closing and nothing is left to try."""
        with self._lock:
            while not self._journal and self._down_since is None and not self._closing:
                self._work.wait()
            if self._closing and (not self._journal or time.monotonic() >= self._close_by):
                return None
            self._journal = _coalesce(self._journal)  # also keeps a long outage's memory to one copy per task
            return list(self._journal)

    def _flush(self, entries: list[_Entry]) -> None:
        """Write `entries` in one transaction; once committed, they leave the journal."""
        purged = 0
        with self._backend.transaction():
            for entry in entries:
                result: Any = getattr(self._backend, entry.method)(*entry.args)
                if entry.method == "purge":
                    purged += result
        if purged:
            log.info("清理任务: 数据库 %d 个", purged)
        with self._lock:
            recovered = self._down_since is not None
        if recovered:  # logged before anyone can see the store healthy again
            log.warning(RECOVERED, len(entries))
        with self._lock:
            if entries:
                done = entries[-1].seq
                del self._journal[:len(entries)]  # only this thread removes or reorders entries
                self._written = max(self._written, done)
                self._forget_written(done)
            self._down_since, self._down_reason = None, ""
            self._done.notify_all()

    def _forget_written(self, done: int) -> None:
        """Drop what the journal laid over the backend up to entry `done` (committed now; the caller holds `_lock`)."""
        self._tasks = {k: v for k, v in self._tasks.items() if v[0] > done}
        self._seen = {k: seq for k, seq in self._seen.items() if seq > done}
        self._durations = [e for e in self._durations if e.seq > done]
        self._sessions = {k: v for k, v in self._sessions.items() if v[0] > done}

    def _went_down(self, exc: Exception, line: str) -> None:
        """Count a failed write or read: one log line when the outage starts (or its reason changes), not per try."""
        reason = _reason(exc)
        with self._lock:
            starting, changed = self._down_since is None, reason != self._down_reason
            if starting:
                self._down_since = self._clock()
            self._down_reason = reason
            self._done.notify_all()  # wait_written answers False at once now
            self._work.notify()  # the writer probes the DB until it is back, even with nothing to write
        if starting or changed:
            log.error(line if starting else STILL_FAILING, reason, exc_info=not isinstance(exc, _EXPECTED))


def open_store(path: str, *, busy_timeout: float = 1.0, backoff: float = 0.2, max_backoff: float = 5.0,
               clock: Callable[[], float] = time.time) -> JournaledStore:
    """The daemon's store: the SQLite file at `path` behind a journal. Raises StoreError if it cannot be opened.

    `busy_timeout` is how long a write waits for a lock another process holds before the store counts as down.
    """
    return JournaledStore(SQLiteTaskStore(path, busy_timeout=busy_timeout), backoff=backoff,
                          max_backoff=max_backoff, clock=clock)
