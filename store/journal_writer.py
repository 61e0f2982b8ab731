"""The journal of a JournaledStore (store/journal.py) and its writer: the ordered entries not yet committed, indexed
for reads, and the "store-writer" thread that commits them in order, one transaction per flush, retrying with
backoff while the DB is down, with one log line when an outage starts and one when it ends.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from store.base import StoreBackend
from store.postgres import DB_ERRORS
from tasks.task import Task

log = logging.getLogger("task_store")

WRITE_FAILED = "任务数据库写入失败，记录暂存内存 (%s)"
STILL_FAILING = "任务数据库仍不可用 (%s)"
RECOVERED = "任务数据库已恢复，已写入积压的 %d 条记录"
# A DB that is locked, full, failing or unreachable; anything else is a bug: traceback.
_EXPECTED = (sqlite3.Error, OSError, *DB_ERRORS)


class Entry(NamedTuple):
    """One journaled write: its place in the order and the backend call that makes it."""

    seq: int
    method: str
    args: tuple


def coalesce(entries: list[Entry]) -> list[Entry]:
    """Of several saves of one task only the last is kept (a save writes the whole task); the order stays."""
    last = {e.args[0].id: e.seq for e in entries if e.method == "save"}
    return [e for e in entries if e.method != "save" or last[e.args[0].id] == e.seq]


def _reason(exc: BaseException) -> str:
    primary = getattr(getattr(exc, "diag", None), "message_primary", None)  # PostgreSQL's, without the SQL echoed
    return " ".join((primary or str(exc)).split()) or type(exc).__name__


class Journal:
    """The writes not yet committed, in order, and the same indexed for reads (guarded by the store's lock)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.last = 0  # the sequence number of the last entry added
        self.written = 0  # every entry up to here is committed
        # Flushes started, and whether one is between taking its entries and their leaving the journal (its commit
        # may already be visible in the DB): a read of "DB + pending" is consistent only with none in between.
        self.flushes = 0
        self.in_flight = False
        self.tasks: dict[str, tuple[int, Task]] = {}  # the latest save of each task
        self.durations: list[Entry] = []
        self.sessions: dict[str, tuple[int, str]] = {}
        self.api_calls: list[Entry] = []

    def add(self, method: str, args: tuple) -> None:
        self.last += 1
        entry = Entry(self.last, method, args)
        self.entries.append(entry)
        if method == "save":
            self.tasks[args[0].id] = (entry.seq, args[0])
        elif method == "record_duration":
            self.durations.append(entry)
        elif method == "set_session":
            self.sessions[args[0]] = (entry.seq, args[1])
        elif method == "add_api_calls":
            self.api_calls.append(entry)

    def to_write(self) -> list[Entry]:
        """The entries, several saves of a task coalesced (which also keeps a long outage's memory small)."""
        self.entries = coalesce(self.entries)
        return list(self.entries)

    def committed(self, entries: list[Entry]) -> None:
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


class JournalWriter:
    """The writer side of a JournaledStore: the store-writer thread (`_run`) and the flush both it and `wait_written`
    make. Its state lives in the store; `_lock` guards it and is never held during DB I/O."""

    _backend: StoreBackend
    _lock: threading.Lock
    _work: threading.Condition
    _written: threading.Condition
    _flushing: threading.Lock
    _journal: Journal
    _retry_now: threading.Event
    _backoff: float
    _max_backoff: float
    _flush_delay: float
    _clock: Callable[[], float]
    _close_by: float
    _closing: bool
    _writer_idle: bool
    _hurry: bool
    _shared: bool
    _elsewhere: dict[str, float]
    _flush_started: float | None
    _down_since: float | None
    _down_reason: str

    def _stalled(self, seconds: float) -> bool:
        """Whether a flush under way has waited for the DB longer than `seconds`."""
        started = self._flush_started
        return started is not None and time.monotonic() - started > seconds

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
            # a batch (which it then writes itself, in wait_written); only closing, an outage or a waiter (a DB
            # across the network, which callers never write themselves) cut it short.
            until = time.monotonic() + self._flush_delay
            while (not (self._closing or self._down_since is not None or self._hurry)
                   and time.monotonic() < until):
                self._work.wait(until - time.monotonic())
            self._hurry = False
            return not (self._closing and (not self._journal.entries or time.monotonic() >= self._close_by))

    def _write_pending(self) -> None:
        """Write the journal as it is now in one transaction (while down, an empty one probes the DB); once
        committed, the entries leave it. The caller holds `_flushing`: the entries taken stay the journal's prefix."""
        with self._lock:
            if not self._journal.entries and self._down_since is None:
                return
            entries = self._journal.to_write()
            elsewhere = set(self._elsewhere)
            self._flush_started = time.monotonic()
            self._journal.flushes += 1
            self._journal.in_flight = True
        purged = 0
        try:
            with self._backend.transaction():
                for entry in entries:
                    if entry.method == "save" and entry.args[0].msg_id in elsewhere and entry.args[0].attempts == 0:
                        continue  # a message another host took: its duplicate task here never reaches the DB
                    result: Any = getattr(self._backend, entry.method)(*entry.args)
                    if entry.method == "purge":
                        purged += result
                    elif entry.method == "remember_message" and self._shared and not result:
                        elsewhere.add(entry.args[0])
        except BaseException:
            with self._lock:
                self._journal.in_flight = False  # nothing of it was committed
            raise
        finally:
            with self._lock:
                self._flush_started = None
        if purged:
            log.info("清理任务: 数据库 %d 个", purged)
        with self._lock:
            recovered = self._down_since is not None
        if recovered:  # logged before anyone can see the store healthy again
            log.warning(RECOVERED, len(entries))
        with self._lock:
            self._journal.committed(entries)
            self._journal.in_flight = False
            self._down_since, self._down_reason = None, ""
            self._elsewhere.update({msg_id: self._clock() for msg_id in elsewhere - self._elsewhere.keys()})
            self._written.notify_all()

    def _went_down(self, exc: Exception, line: str) -> None:
        """Count a failed write or read: one log line when the outage starts (or its reason changes), not per try."""
        reason = _reason(exc)
        with self._lock:
            starting, changed = self._down_since is None, reason != self._down_reason
            if starting:
                self._down_since = self._clock()
            self._down_reason = reason
            self._work.notify()  # the writer retries, or probes the DB if there is nothing to write
            self._written.notify_all()  # waiters stop waiting
        if starting or changed:
            log.error(line if starting else STILL_FAILING, reason, exc_info=not isinstance(exc, _EXPECTED))
