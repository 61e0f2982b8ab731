"""The write-behind task store: writes go to an ordered in-memory journal at once and are committed in order later.

`JournaledStore` wraps a `StoreBackend` (SQLite, or PostgreSQL for several hosts). Its writes never wait for the DB
and never raise; its reads see the backend with the journal laid over it. While the DB cannot be written (locked,
disk full, I/O errors) records wait in memory, `health()` says so, and the writer retries with backoff, in order.
docs/task-store.md has the whole story and the log lines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from common.settled_read import read_with_pending
from config import DEDUP_TTL_SECONDS
from store.base import StoreBackend, StoreHealth
from store.journal_writer import (  # noqa: F401 (the log lines, re-exported: tests and docs grep them here)
    RECOVERED,
    STILL_FAILING,
    WRITE_FAILED,
    Journal,
    JournalWriter,
)
from store.pg_connect import DEFAULT_STATEMENT_TIMEOUT
from store.postgres import PostgresTaskStore, is_postgres_url
from store.sqlite import SQLiteTaskStore
from tasks.task import Task

log = logging.getLogger("task_store")

T = TypeVar("T")
U = TypeVar("U")
# A read of a DB counter plus the journal's pending adds is retried while a flush moves entries between the two.
MAX_READ_TRIES = 50
READ_RETRY_PAUSE = 0.005
READ_FAILED = "任务数据库读取失败，使用内存中的记录 (%s)"
LOST = "任务数据库关闭时仍有 %d 条记录未写入，已丢失 (%s)"


def _overlaid(stored: list[Task], pending: Iterable[Task], wanted: Callable[[Task], bool]) -> list[Task]:
    """`stored` with the journal's versions laid over them (the journal wins), those `wanted` only."""
    merged = {task.id: task for task in stored}
    merged.update({task.id: replace(task) for task in pending})
    return [task for task in merged.values() if wanted(task)]


class _BudgetCounters:
    """The DingTalk call budget's counters of a JournaledStore (the month's, by kind, a user's day's): adds are
    journaled, reads add what is pending."""

    _lock: threading.Lock
    _journal: Journal
    _backend: StoreBackend
    _append: Callable[..., None]
    _read: Callable[..., Any]

    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None:
        """Journal `count` API calls for the month (and the kind, and the user's day; the backend adds them at once)."""
        self._append("add_api_calls", month, count, kind, day, user_id)

    def _with_pending(self, pending_of: Callable[[], T], read: Callable[[], U], fallback: U) -> tuple[T, U]:
        """What is pending (`pending_of`, under the lock) and the DB's value (`read`), taken with no flush between
        them: a flush that commits entries after they were counted as pending would have them counted twice (in the
        DB and pending), one that took them before the DB was read, not at all. While a flush is committing (not
        while the DB is down: nothing commits then) the read waits for it; past MAX_READ_TRIES: the last pending."""
        return read_with_pending(
            self._lock, lambda: (self._journal.flushes, self._journal.in_flight),
            lambda: self._journal.in_flight and self._down_since is None, pending_of,
            lambda: self._read(read, fallback), tries=MAX_READ_TRIES, pause=READ_RETRY_PAUSE)

    def api_calls(self, month: str) -> int:
        """The month's API calls: the DB's counter plus the adds not yet written."""
        pending, stored = self._with_pending(
            lambda: sum(e.args[1] for e in self._journal.api_calls if e.args[0] == month),
            lambda: self._backend.api_calls(month), 0)
        return pending + stored

    def api_calls_by_kind(self, month: str) -> dict[str, int]:
        """The month's API calls by kind: the DB's counters plus the adds not yet written."""
        pending, stored = self._with_pending(
            lambda: [(e.args[2], e.args[1]) for e in self._journal.api_calls if e.args[0] == month and e.args[2]],
            lambda: self._backend.api_calls_by_kind(month), {})
        counts = dict(stored)
        for kind, count in pending:
            counts[kind] = counts.get(kind, 0) + count
        return counts

    def user_api_calls(self, day: str, user_id: str) -> int:
        """A user's API calls on a day, as every host counted them: the DB's counter plus the adds not yet written."""
        pending, stored = self._with_pending(
            lambda: sum(e.args[1] for e in self._journal.api_calls if e.args[3] == day and e.args[4] == user_id),
            lambda: self._backend.user_api_calls(day, user_id), 0)
        return pending + stored


class JournaledStore(_BudgetCounters, JournalWriter):
    """A `TaskStore` whose writes reach `backend` through an in-memory journal, committed in order.

    The "store-writer" thread writes the journal shortly after each write (`flush_delay`), and retries with backoff
    while the DB is down; `wait_written` writes it at once (a DB across the network, `shared`: has the writer write
    it, waiting at most its timeout). Either way one transaction per flush, one flush at a time (`_flushing`), and
    entries leave the journal only once committed. `_lock` guards the journal; it is never held during DB I/O.
    `health()` (for /healthz: `degraded` when not ok) never touches the DB.
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
        self._journal = Journal()
        self._down_since: float | None = None  # set while the DB cannot be written (or read), and why
        self._down_reason = ""
        self._closing = self._closed = False
        self._close_by = float("inf")  # monotonic time the writer gives up at, once closing
        self._retry_now = threading.Event()
        # The msgIds of the dedup window, in memory: dedup never waits on the DB. A store several hosts share
        # (`shared`) learns when its insert of a new one is written whether another host had it (`taken_elsewhere`).
        self._shared = bool(getattr(backend, "shared", False))
        self._elsewhere: dict[str, float] = {}  # msgIds whose insert found another host's row: duplicates
        # A shared DB is across the network: the intake never writes to it itself (wait_written hands over to the
        # writer and waits at most its timeout), and while it is down reads answer from memory at once.
        self._remote = self._shared
        self._flush_started: float | None = None  # monotonic: when the flush under way began
        self._hurry = False  # a caller of wait_written waits: the writer skips the flush delay
        self._written = threading.Condition(self._lock)  # notified when a flush commits or the DB goes down
        self._seen = self._read(lambda: backend.recent_messages(clock() - dedup_ttl), {})
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
            self._elsewhere = {k: v for k, v in self._elsewhere.items() if v >= seen_before}
        self._append("purge", finished_before, seen_before)
        return 0

    def remember_message(self, msg_id: str, now: float) -> bool:
        """Record a DingTalk msgId; False when it was seen within the dedup window. Answered from memory (the caller
        is the intake, which never waits on the DB); the insert is journaled. With a shared DB, whether another host
        had it is known once it is written: `taken_elsewhere`."""
        with self._lock:
            if msg_id in self._seen:
                return False
            self._seen[msg_id] = now
        self._append("remember_message", msg_id, now)
        return True

    def taken_elsewhere(self, msg_id: str) -> bool:
        """Whether the written insert of a msgId this store took as new found it recorded by another host (one
        INSERT … ON CONFLICT on its unique key decides between hosts); False while not written yet."""
        with self._lock:
            return msg_id in self._elsewhere

    # -- reads: the backend with the journal laid over it

    def _read(self, read: Callable[[], T], fallback: T) -> T:
        """A backend read; if it fails, `fallback` (what memory has) and the store counts as degraded. A DB across
        the network that is down is not asked (the writer probes it): memory answers at once."""
        if self._closed or (self._remote and self._down_since is not None):
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
        """Block until every write journaled before the call is committed; False at once while the DB is down (or,
        across the network, while a flush has been waiting longer than `timeout`), or after `timeout` s (the records
        stay in memory either way)."""
        with self._lock:
            target = self._journal.last
            if self._journal.written >= target or self._down_since is not None or self._closed:
                return self._journal.written >= target
            if self._remote:  # the writer writes; this thread waits for it, never for the network itself
                if self._stalled(timeout):
                    return False
                self._hurry = True
                self._work.notify()
                deadline = time.monotonic() + max(0.0, timeout)
                while self._journal.written < target and self._down_since is None and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._written.wait(left)
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
            self._written.notify_all()
            lost, reason = len(self._journal.entries), self._down_reason
        if lost:
            log.error(LOST, lost, reason or "超时")
        if not self._thread.is_alive():  # else it is still inside a DB call: the process exit ends it
            try:
                self._backend.close()
            except Exception:
                log.exception("关闭任务数据库失败")

def open_backend(task_db: str, *, read_only: bool = False, busy_timeout: float = 10.0, host: str = "",
                 lease_seconds: float = 30.0, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
                 ) -> SQLiteTaskStore | PostgresTaskStore:
    """The backend TASK_DB names: a PostgreSQL URL (postgresql://…: new tasks leased to `host`) or a SQLite file
    path. Raises StoreError (StoreUnreachable: a PostgreSQL server that may answer later)."""
    if is_postgres_url(task_db):
        return PostgresTaskStore(task_db, read_only=read_only, busy_timeout=busy_timeout, host=host,
                                 lease_seconds=lease_seconds, statement_timeout=statement_timeout)
    return SQLiteTaskStore(task_db, read_only=read_only, busy_timeout=busy_timeout)


def open_store(path: str, *, busy_timeout: float = 1.0, backoff: float = 0.2, max_backoff: float = 5.0,
               flush_delay: float = 0.02, clock: Callable[[], float] = time.time, host: str = "",
               lease_seconds: float = 30.0, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> JournaledStore:
    """The daemon's store: the backend TASK_DB names behind a journal. Raises StoreError if it cannot be opened.

    `busy_timeout` is how long a write waits for a lock another process holds before the store counts as down.
    """
    backend = open_backend(path, busy_timeout=busy_timeout, host=host, lease_seconds=lease_seconds,
                           statement_timeout=statement_timeout)
    return JournaledStore(backend, backoff=backoff, max_backoff=max_backoff, flush_delay=flush_delay, clock=clock)
