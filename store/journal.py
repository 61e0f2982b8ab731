"""The write-behind task store: writes go to an ordered in-memory journal at once and are committed in order later.

`JournaledStore` wraps a `StoreBackend` (SQLite, or PostgreSQL for several hosts). Its writes never wait for the DB
and never raise; its reads see the backend with the journal laid over it. While the DB cannot be written (locked,
disk full, I/O errors) records wait in memory, `health()` says so, and the writer retries with backoff, in order.
docs/task-store.md has the whole story and the log lines.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, NamedTuple, TypeVar

from config import DEDUP_TTL_SECONDS
from store.base import StoreBackend, StoreHealth
from store.postgres import DB_ERRORS, PostgresTaskStore, is_postgres_url
from store.sqlite import SQLiteTaskStore
from tasks.task import Task

log = logging.getLogger("task_store")

T = TypeVar("T")
WRITE_FAILED = "任务数据库写入失败，记录暂存内存 (%s)"
READ_FAILED = "任务数据库读取失败，使用内存中的记录 (%s)"
STILL_FAILING = "任务数据库仍不可用 (%s)"
RECOVERED = "任务数据库已恢复，已写入积压的 %d 条记录"
LOST = "任务数据库关闭时仍有 %d 条记录未写入，已丢失 (%s)"
# A DB that is locked, full, failing or unreachable; anything else is a bug: traceback.
_EXPECTED = (sqlite3.Error, OSError, *DB_ERRORS)


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
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)  # PostgreSQL's, without the SQL echoed
    return " ".join((primary or str(exc)).split()) or type(exc).__name__


def _overlaid(stored: list[Task], pending: Iterable[Task], wanted: Callable[[Task], bool]) -> list[Task]:
    """`stored` with the journal's versions laid over them (the journal wins), those `wanted` only."""
    merged = {task.id: task for task in stored}
    merged.update({task.id: replace(task) for task in pending})
    return [task for task in merged.values() if wanted(task)]


class _Journal:
    """The writes not yet committed, in order, and the same indexed for reads (guarded by the store's lock)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.last = 0  # the sequence number of the last entry added
        self.written = 0  # every entry up to here is committed
        self.tasks: dict[str, tuple[int, Task]] = {}  # the latest save of each task
        self.durations: list[_Entry] = []
        self.sessions: dict[str, tuple[int, str]] = {}
        self.api_calls: list[_Entry] = []

    def add(self, method: str, args: tuple) -> None:
        self.last += 1
        entry = _Entry(self.last, method, args)
        self.entries.append(entry)
        if method == "save":
            self.tasks[args[0].id] = (entry.seq, args[0])
        elif method == "record_duration":
            self.durations.append(entry)
        elif method == "set_session":
            self.sessions[args[0]] = (entry.seq, args[1])
        elif method == "add_api_calls":
            self.api_calls.append(entry)

    def to_write(self) -> list[_Entry]:
        """The entries, several saves of a task coalesced (which also keeps a long outage's memory small)."""
        self.entries = _coalesce(self.entries)
        return list(self.entries)

    def committed(self, entries: list[_Entry]) -> None:
        """`entries`, a prefix taken by to_write, are committed: they leave the journal and its indexes."""
        if not entries:
            return
        done = entries[-1].seq
        del self.entries[:len(entries)]
        self.written = max(self.written, done)
        self.tasks = {k: v for k, v in self.tasks.items() if v[0] > done}
        self.durations = [e for e in self.durations if e.seq > done]
        self.sessions = {k: v for k, v in self.sessions.items() if v[0] > done}
        self.api_calls = [e for e in self.api_calls if e.seq > done]

    def durations_of(self, keyword: str, user_id: str | None) -> list[float]:
        """The pending durations of a keyword class (and user), newest first."""
        return [e.args[2] for e in reversed(self.durations)
                if e.args[1] == keyword and (user_id is None or e.args[0] == user_id)]


class _BudgetCounters:
    """The org's monthly API call counters of a JournaledStore: adds are journaled, reads add what is pending."""

    _lock: threading.Lock
    _journal: _Journal
    _backend: StoreBackend
    _append: Callable[..., None]
    _read: Callable[..., Any]

    def add_api_calls(self, month: str, count: int) -> None:
        """Journal `count` API calls for the month (the backend adds them in one statement)."""
        self._append("add_api_calls", month, count)

    def api_calls(self, month: str) -> int:
        """The month's API calls: the DB's counter plus the adds not yet written."""
        with self._lock:
            pending = sum(e.args[1] for e in self._journal.api_calls if e.args[0] == month)
        return pending + self._read(lambda: self._backend.api_calls(month), 0)


class JournaledStore(_BudgetCounters):
    """A `TaskStore` whose writes reach `backend` through an in-memory journal, committed in order.

    The "store-writer" thread writes the journal shortly after each write (`flush_delay`), and retries with backoff
    while the DB is down; `wait_written` writes it at once. Either way one transaction per flush, one flush at a
    time (`_flushing`), and entries leave the journal only once committed. `_lock` guards the journal; it is
    never held during DB I/O. `health()` (for /healthz: `degraded` when not ok) never touches the DB.
    """

    def __init__(self, backend: StoreBackend, *, backoff: float = 0.2, max_backoff: float = 5.0,
                 flush_delay: float = 0.02, clock: Callable[[], float] = time.time,
                 dedup_ttl: float = DEDUP_TTL_SECONDS) -> None:
        self._backend = backend
        self._backoff, self._max_backoff, self._flush_delay, self._clock = backoff, max_backoff, flush_delay, clock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here for entries
        # Held by whoever writes the journal to the backend: the writer thread, or a caller of wait_written.
        self._flushing = threading.Lock()
        self._writer_idle = False  # the writer waits for a first entry
        self._journal = _Journal()
        self._down_since: float | None = None  # set while the DB cannot be written (or read), and why
        self._down_reason = ""
        self._closing = self._closed = False
        self._close_by = float("inf")  # monotonic time the writer gives up at, once closing
        self._retry_now = threading.Event()
        # The msgIds of the dedup window, in memory: a repeat needs no DB read. A store several hosts share (`shared`)
        # asks the DB's unique key about every new one.
        self._seen = self._read(lambda: backend.recent_messages(clock() - dedup_ttl), {})
        self._shared = bool(getattr(backend, "shared", False))
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- writes: journaled, never blocking on the DB

    def _append(self, method: str, *args: object) -> None:
        """Journal one write (the backend call `method(*args)`); reads see it at once."""
        with self._lock:
            if self._closed:
                log.error("任务数据库已关闭，记录未写入 (%s)", method)
            self._journal.add(method, args)
            if self._writer_idle:  # not while it waits out the flush delay: each wake-up costs the GIL
                self._writer_idle = False
                self._work.notify()

    def save(self, task: Task) -> None:
        """Journal a copy of `task`; the backend inserts or updates its row."""
        self._append("save", replace(task))

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        """Journal one run's duration."""
        self._append("record_duration", user_id, keyword, seconds, now)

    def set_session(self, conversation_key: str, session_id: str) -> None:
        """Journal a conversation's CodeBuddy session."""
        self._append("set_session", conversation_key, session_id)

    def purge(self, finished_before: float, seen_before: float) -> int:
        """Journal a purge of old delivered tasks and msgIds; 0 here, the count is logged once it is written."""
        with self._lock:
            self._seen = {k: v for k, v in self._seen.items() if v >= seen_before}
        self._append("purge", finished_before, seen_before)
        return 0

    def remember_message(self, msg_id: str, now: float) -> bool:
        """Record a DingTalk msgId; False when it was seen within the dedup window. Answered from memory."""
        with self._lock:
            if msg_id in self._seen:
                return False
            self._seen[msg_id] = now
        if self._shared and not self._closed:  # another host may have taken it: one INSERT … ON CONFLICT decides
            try:
                return self._backend.remember_message(msg_id, now)
            except Exception as exc:  # the DB is down: memory answers, the insert waits in the journal
                self._went_down(exc, WRITE_FAILED)
        self._append("remember_message", msg_id, now)
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
            return [task for _, task in self._journal.tasks.values()]

    def get(self, task_id: str) -> Task | None:
        """The task with this id: its journaled version, else the DB's."""
        with self._lock:
            pending = self._journal.tasks.get(task_id)
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
            pending = self._journal.durations_of(keyword, user_id)
        return (pending + self._read(lambda: self._backend.durations(keyword, user_id, limit), []))[:limit]

    def session_for(self, conversation_key: str) -> str | None:
        """A conversation's CodeBuddy session id, or None."""
        with self._lock:
            pending = self._journal.sessions.get(conversation_key)
        if pending is not None:
            return pending[1]
        return self._read(lambda: self._backend.session_for(conversation_key), None)

    # -- health, waiting and closing

    def health(self) -> StoreHealth:
        """Whether the DB is being written, and how many records wait in memory (never touches the DB)."""
        with self._lock:
            pending = len(self._journal.entries)
            return StoreHealth(self._down_since is None, self._down_reason, pending, self._down_since)

    def wait_written(self, timeout: float) -> bool:
        """Block until every write journaled before the call is committed; False at once while the DB is down,
        or after `timeout` s (the records stay in memory either way)."""
        with self._lock:
            target = self._journal.last
            if self._journal.written >= target or self._down_since is not None or self._closed:
                return self._journal.written >= target
        # The caller writes the journal itself: handing it to the writer thread and back costs GIL switches that
        # slowed the acknowledgements of a burst (bench/run.py). A locked DB holds it up to the busy timeout.
        if not self._flushing.acquire(timeout=max(0.0, timeout)):
            return False
        try:
            with self._lock:
                if self._journal.written >= target or self._down_since is not None:
                    return self._journal.written >= target
            self._write_pending()
        except Exception as exc:
            self._went_down(exc, WRITE_FAILED)  # the writer thread retries from now on
            return False
        finally:
            self._flushing.release()
        with self._lock:
            return self._journal.written >= target

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
            lost, reason = len(self._journal.entries), self._down_reason
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
                if not self._wait_for_work():
                    return
                with self._flushing:
                    self._write_pending()
                delay = self._backoff
            except Exception as exc:  # the writer outlives anything: the records wait, the next try comes later
                self._went_down(exc, WRITE_FAILED)
                self._retry_now.wait(min(delay, max(0.0, self._close_by - time.monotonic())))
                self._retry_now.clear()
                delay = min(delay * 2, self._max_backoff)

    def _wait_for_work(self) -> bool:
        """Wait for entries to write (or, while down, for the next probe); False once closing has nothing to try."""
        with self._lock:
            while not self._journal.entries and self._down_since is None and not self._closing:
                self._writer_idle = True
                self._work.wait()
            self._writer_idle = False
            # A moment for more writes to join this flush, and the writer off the CPU while the intake handles
            # a batch (which it then writes itself, in wait_written); only closing or an outage cut it short.
            until = time.monotonic() + self._flush_delay
            while not (self._closing or self._down_since is not None) and time.monotonic() < until:
                self._work.wait(until - time.monotonic())
            return not (self._closing and (not self._journal.entries or time.monotonic() >= self._close_by))

    def _write_pending(self) -> None:
        """Write the journal as it is now in one transaction (while down, an empty one probes the DB); once
        committed, the entries leave it. The caller holds `_flushing`: the entries taken stay the journal's prefix."""
        with self._lock:
            if not self._journal.entries and self._down_since is None:
                return
            entries = self._journal.to_write()
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
            self._journal.committed(entries)
            self._down_since, self._down_reason = None, ""

    def _went_down(self, exc: Exception, line: str) -> None:
        """Count a failed write or read: one log line when the outage starts (or its reason changes), not per try."""
        reason = _reason(exc)
        with self._lock:
            starting, changed = self._down_since is None, reason != self._down_reason
            if starting:
                self._down_since = self._clock()
            self._down_reason = reason
            self._work.notify()  # the writer retries, or probes the DB if there is nothing to write
        if starting or changed:
            log.error(line if starting else STILL_FAILING, reason, exc_info=not isinstance(exc, _EXPECTED))


def open_backend(task_db: str, *, read_only: bool = False, busy_timeout: float = 10.0, host: str = "",
                 lease_seconds: float = 30.0) -> SQLiteTaskStore | PostgresTaskStore:
    """The backend TASK_DB names: a PostgreSQL URL (postgresql://…: new tasks leased to `host`) or a SQLite file
    path. Raises StoreError."""
    if is_postgres_url(task_db):
        return PostgresTaskStore(task_db, read_only=read_only, busy_timeout=busy_timeout, host=host,
                                 lease_seconds=lease_seconds)
    return SQLiteTaskStore(task_db, read_only=read_only, busy_timeout=busy_timeout)


def open_store(path: str, *, busy_timeout: float = 1.0, backoff: float = 0.2, max_backoff: float = 5.0,
               flush_delay: float = 0.02, clock: Callable[[], float] = time.time, host: str = "",
               lease_seconds: float = 30.0) -> JournaledStore:
    """The daemon's store: the backend TASK_DB names behind a journal. Raises StoreError if it cannot be opened.

    `busy_timeout` is how long a write waits for a lock another process holds before the store counts as down.
    """
    return JournaledStore(open_backend(path, busy_timeout=busy_timeout, host=host, lease_seconds=lease_seconds),
                          backoff=backoff, max_backoff=max_backoff, flush_delay=flush_delay, clock=clock)
