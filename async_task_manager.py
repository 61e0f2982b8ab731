"""Task lifecycle: routing, the queue, workers, promotion to the background, delivery and the task store.

A `Task` moves queued → running → succeeded / failed / cancelled / timed_out, and separately from
undelivered to delivered. Every transition goes through `AsyncTaskManager._transition`, under one lock,
and is written through to the `TaskStore` there. The manager talks to the outside only through two
seams: a client with `run(...) -> RunResult` and a sender with `send(route, text, ...) -> Delivery`.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import sqlite3
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field, replace
from typing import Protocol

from codebuddy_client import RunResult, new_session_id, redact_secrets
from config import (
    DEDUP_TTL_SECONDS,
    DEFAULT_EXPECTED_DURATION,
    MEMORY_RETENTION_SECONDS,
    SEED_LONG_TASK_KEYWORDS,
    Config,
)
from dingtalk_sender import Delivery, Route

log = logging.getLogger("async_task_manager")

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
ACTIVE_STATUSES = (QUEUED, RUNNING)
FINISHED_STATUSES = (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)
STATUS_LABELS = {QUEUED: "排队中", RUNNING: "执行中", SUCCEEDED: "已完成", FAILED: "失败", CANCELLED: "已取消",
                 TIMED_OUT: "已超时"}
NO_KEYWORD = "none"


@dataclass
class Task:
    """One prompt and everything that happened to it."""

    id: str
    user_id: str
    user_name: str
    conversation_key: str
    route: Route
    prompt: str
    keyword: str = NO_KEYWORD  # the keyword class that routed it ("none" when no keyword matched)
    status: str = QUEUED
    background: bool = False  # the result is pushed rather than sent through the session webhook
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: str = ""
    error: str = ""
    delivered: bool = False
    attempts: int = 0  # runs started (a task interrupted twice by a crash is failed)
    last_step: str = ""
    msg_id: str = ""
    last_progress_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def elapsed(self, now: float) -> float:
        """Seconds since the task was created, up to its end if it has ended."""
        return (self.finished_at or now) - self.created_at


# ---------------------------------------------------------------- stores


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


def _task_to_row(task: Task) -> dict:
    row = dict(task.__dict__)  # not dataclasses.asdict: it deep-copies, and this runs on every transition
    row["route"] = json.dumps(task.route.__dict__, ensure_ascii=False)
    row["background"] = int(task.background)
    row["delivered"] = int(task.delivered)
    return row


def _task_from_row(row: dict) -> Task:
    values = dict(row)
    values["route"] = Route(**json.loads(values["route"]))
    values["background"] = bool(values["background"])
    values["delivered"] = bool(values["delivered"])
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
                   if t.finished and t.delivered and (t.finished_at or 0) < finished_before]
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
    last_step TEXT, msg_id TEXT, last_progress_at REAL);
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
                f"DELETE FROM tasks WHERE delivered = 1 AND finished_at < ? AND status IN ({','.join('?' * 4)})",
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


# ---------------------------------------------------------------- manager


class Client(Protocol):
    def run(self, prompt: str, *, conversation: str = "", session_id: str | None = None, timeout: float | None = None,
            cancel_event: threading.Event | None = None, on_step: Callable[[str], None] | None = None,
            run_tag: str = "") -> RunResult: ...

    def kill_leftovers(self, run_tag: str) -> int: ...

    def cancel(self, run_tag: str) -> bool: ...


class Sender(Protocol):
    def send(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             allow_webhook: bool = True) -> Delivery: ...


@dataclass
class _Running:
    cancel_event: threading.Event = field(default_factory=threading.Event)
    by_shutdown: bool = False


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


class AsyncTaskManager:
    """Tracks every task, runs them on `max_workers` threads, and delivers their results."""

    def __init__(self, client: Client, sender: Sender, store: TaskStore | None = None, *,
                 max_workers: int = 4, max_tasks_per_user: int = 2, sync_timeout: float = 60.0,
                 task_timeout: float = 1800.0, keywords: Iterable[str] = SEED_LONG_TASK_KEYWORDS,
                 progress_interval: float = 300.0, retention_days: float = 30.0,
                 memory_retention: float = MEMORY_RETENTION_SECONDS, tick: float = 0.5,
                 clock: Callable[[], float] = time.time, secrets: Iterable[str] = ()) -> None:
        self.client = client
        self.sender = sender
        self.store: TaskStore = store if store is not None else MemoryTaskStore()
        self.max_workers = max_workers
        self.max_tasks_per_user = max_tasks_per_user
        self.sync_timeout = sync_timeout
        self.task_timeout = task_timeout
        self.keywords = tuple(dict.fromkeys(k.strip() for k in keywords if k.strip()))
        self.progress_interval = progress_interval
        self.retention_days = retention_days
        self.memory_retention = memory_retention
        self.tick = tick
        self.clock = clock
        self._secrets = tuple(secrets)
        self._lock = threading.RLock()
        self._wakeup = threading.Condition(self._lock)
        self._tasks: dict[str, Task] = {}
        self._queue: list[str] = []
        self._running: dict[str, _Running] = {}
        self._acks: dict[str, Future] = {}
        self._pending_deliveries: set[Future] = set()
        self._finished_counts: dict[str, int] = {}  # since start, by final status (for metrics)
        self._monitor_stop = threading.Event()
        # Each user's last ten no-keyword durations: should_use_async runs for every prompt.
        self._recent_durations: dict[str, tuple[float, ...]] = {}
        self._accepting = True
        self._stopping = False
        self._threads: list[threading.Thread] = []
        # Notices and deliveries run here, never on a CLI worker and never on the stream's event loop.
        self._notices = ThreadPoolExecutor(max_workers=32, thread_name_prefix="notice")
        self._deliveries = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deliver")
        self._last_cleanup = 0.0

    @classmethod
    def from_config(cls, config: Config, client: Client, sender: Sender, store: TaskStore) -> AsyncTaskManager:
        """A manager with the bot's settings."""
        return cls(client, sender, store, max_workers=config.max_workers,
                   max_tasks_per_user=config.max_tasks_per_user, sync_timeout=config.sync_timeout,
                   task_timeout=config.task_timeout, keywords=config.all_long_task_keywords,
                   progress_interval=config.progress_interval, retention_days=config.task_retention_days,
                   secrets=config.secrets)

    # ------------------------------------------------------------ routing

    def matched_keyword(self, prompt: str) -> str | None:
        """The first long-task keyword found in `prompt` (case-insensitive), or None."""
        lowered = prompt.lower()
        for keyword in self.keywords:
            if keyword.lower() in lowered:
                return keyword
        return None

    def should_use_async(self, prompt: str, user_id: str | None = None) -> bool:
        """True when `prompt` should run in the background: a keyword, or this user's history says it runs long."""
        if self.matched_keyword(prompt) is not None:
            return True
        if user_id is None:
            return False
        with self._lock:
            history = self._recent_durations.get(user_id)
        if history is None:  # read once per user, then kept current by _record_duration
            history = tuple(self.store.durations(NO_KEYWORD, user_id, limit=10))
            with self._lock:
                self._recent_durations[user_id] = history
        long_runs = sum(1 for seconds in history if seconds > self.sync_timeout)
        return len(history) >= 2 and long_runs * 2 > len(history)

    def expected_duration(self, keyword: str) -> str:
        """Median and 90th percentile of past runs of this keyword class, or the fixed text without history."""
        history = sorted(self.store.durations(keyword, limit=50))
        if len(history) < 3:
            return DEFAULT_EXPECTED_DURATION
        median = statistics.median(history)
        p90 = history[min(len(history) - 1, int(round(0.9 * (len(history) - 1))))]
        return f"约 {_minutes(median)} 分钟 (90% 的同类任务在 {_minutes(p90)} 分钟内完成)"

    def expected_remaining(self, task: Task, now: float) -> str:
        """How much longer a running task should take, from the median of its keyword class."""
        history = self.store.durations(task.keyword, limit=50)
        if len(history) < 3:
            return f"同类任务通常需要 {DEFAULT_EXPECTED_DURATION}" if task.background else "未知"
        remaining = statistics.median(history) - (now - (task.started_at or now))
        if remaining <= 0:
            return "已超过同类任务的通常耗时，应该很快完成"
        return f"约 {_minutes(remaining)} 分钟"

    # ------------------------------------------------------------ lifecycle primitives

    def _transition(self, task: Task, **changes: object) -> Task:
        """Apply `changes` to `task` under the lock and write it through to the store.

        A task that has finished and been delivered leaves memory here (the store keeps it), so memory
        holds only live tasks however many have run.
        """
        with self._lock:
            was_finished = task.finished
            for name, value in changes.items():
                setattr(task, name, value)
            self.store.save(task)
            if task.finished and not was_finished:
                self._finished_counts[task.status] = self._finished_counts.get(task.status, 0) + 1
            if task.finished and task.delivered:
                self._tasks.pop(task.id, None)
                self._acks.pop(task.id, None)
            return task

    def create_task(self, user_id: str, prompt: str, route: Route, *, user_name: str = "",
                    conversation_key: str = "", msg_id: str = "", background: bool = False,
                    keyword: str = NO_KEYWORD) -> Task:
        """Create a queued task, remember it and persist it."""
        task = Task(id=uuid.uuid4().hex[:8], user_id=user_id, user_name=user_name,
                    conversation_key=conversation_key or route.conversation_id or user_id, route=route,
                    prompt=prompt, keyword=keyword, background=background, created_at=self.clock(), msg_id=msg_id)
        with self._lock:
            self._tasks[task.id] = task
            self.store.save(task)
        log.info("创建任务: %s, 用户: %s task=%s user=%s", task.id, user_id, task.id, user_id)
        return task

    def get_task(self, task_id: str) -> Task | None:
        """The task with this id, from memory or the store."""
        with self._lock:
            task = self._tasks.get(task_id)
        return task if task is not None else self.store.get(task_id)

    def update_status(self, task_id: str, status: str, **changes: object) -> Task:
        """Move a task to `status` (and set any other fields)."""
        task = self.get_task(task_id)
        if task is None:
            raise KeyError(task_id)
        return self._transition(task, status=status, **changes)

    def complete_task(self, task_id: str, text: str, duration: float) -> Task:
        """Record a successful result (before it is delivered)."""
        task = self.update_status(task_id, SUCCEEDED, result=text, finished_at=self.clock(), error="")
        self._record_duration(task, duration)
        log.info("任务 %s 完成，耗时: %.1f秒 task=%s user=%s", task_id, duration, task_id, task.user_id)
        return task

    def fail_task(self, task_id: str, error: str, status: str = FAILED, duration: float | None = None) -> Task:
        """Record a failure (FAILED, TIMED_OUT or CANCELLED) with its reason."""
        task = self.update_status(task_id, status, error=error, finished_at=self.clock())
        if status == TIMED_OUT and duration is not None:
            self._record_duration(task, duration)
        log.warning("任务 %s 失败 (%s): %s task=%s user=%s", task_id, status, error, task_id, task.user_id)
        return task

    def _record_duration(self, task: Task, seconds: float) -> None:
        self.store.record_duration(task.user_id, task.keyword, seconds, self.clock())
        if task.keyword == NO_KEYWORD:
            with self._lock:
                history = self._recent_durations.get(task.user_id)
                if history is not None:
                    self._recent_durations[task.user_id] = (seconds, *history)[:10]

    def cleanup(self, now: float | None = None) -> int:
        """Drop finished tasks whose delivery gave up from memory after a while; purge old ones from the store.

        (Delivered tasks leave memory at once, in `_transition`; undelivered ones wait in the store for the
        next start.)
        """
        now = self.clock() if now is None else now
        with self._lock:
            old = [k for k, t in self._tasks.items()
                   if t.finished and now - (t.finished_at or now) > self.memory_retention]
            for key in old:
                del self._tasks[key]
                self._acks.pop(key, None)
        purged = self.store.purge(now - self.retention_days * 86400, now - DEDUP_TTL_SECONDS)
        if old or purged:
            log.info("清理任务: 内存 %d 个, 数据库 %d 个", len(old), purged)
        return len(old)

    # ------------------------------------------------------------ intake

    def accept_message(self, msg_id: str) -> bool:
        """False when this DingTalk msgId was already accepted (a redelivery)."""
        if not msg_id:
            return True
        return self.store.remember_message(msg_id, self.clock())

    def conversation_session(self, conversation_key: str) -> str:
        """The CodeBuddy session id of a conversation (created on first use)."""
        session = self.store.session_for(conversation_key)
        if session is None:
            session = new_session_id()
            self.store.set_session(conversation_key, session)
        return session

    def new_session(self, conversation_key: str) -> str:
        """Start a fresh CodeBuddy session for a conversation (`/new`)."""
        session = new_session_id()
        self.store.set_session(conversation_key, session)
        return session

    def submit(self, prompt: str, route: Route, *, user_id: str, user_name: str = "", conversation_key: str = "",
               msg_id: str = "") -> Task | None:
        """Create a task for `prompt`, acknowledge it at once and queue it. None if not accepting."""
        with self._lock:
            if not self._accepting:
                return None
        keyword = self.matched_keyword(prompt)
        background = keyword is not None or self.should_use_async(prompt, user_id)
        if background:
            log.info("检测到长时间任务 (关键词: %s) user=%s", keyword or "历史耗时", user_id)
        task = self.create_task(user_id, prompt, route, user_name=user_name, conversation_key=conversation_key,
                                msg_id=msg_id, background=background, keyword=keyword or NO_KEYWORD)
        with self._lock:
            self._queue.append(task.id)
            position = self._queue_position(task.id)
            ack = self._ack_text(task, position)
            self._acks[task.id] = self._notices.submit(self._notify, task, ack)
            self._wakeup.notify_all()
        if background:
            log.info("异步任务已启动: %s task=%s user=%s", task.id, task.id, user_id)
        return task

    def _ack_text(self, task: Task, position: int) -> str:
        queued = position > 1 or self._blocked(task)
        queue_note = f"\n当前排队中 (第 {position} 位)，有空闲时自动开始。" if queued else ""
        if task.background:
            return (f"收到任务，正在处理中…\n这是一个长时间任务，已转入后台执行 (任务ID: {task.id})，"
                    f"预计耗时: {self.expected_duration(task.keyword)}。完成后会主动推送结果，"
                    f"可发送 /status {task.id} 查看进度。{queue_note}")
        return f"收到任务，正在处理中… (任务ID: {task.id}){queue_note}"

    # ------------------------------------------------------------ scheduling

    def _queue_position(self, task_id: str) -> int:
        """1-based position among queued tasks (0 if not queued)."""
        with self._lock:
            try:
                return self._queue.index(task_id) + 1
            except ValueError:
                return 0

    def queue_position(self, task_id: str) -> int:
        """1-based position of a queued task in the wait queue, 0 when it is not waiting."""
        return self._queue_position(task_id)

    def _blocked(self, task: Task) -> bool:
        """True when `task` cannot start now (workers, the user's limit, or its conversation is busy)."""
        with self._lock:
            running = [self._tasks[t] for t in self._running if t in self._tasks]
            if len(running) >= self.max_workers:
                return True
            if sum(1 for t in running if t.user_id == task.user_id) >= self.max_tasks_per_user:
                return True
            return any(t.conversation_key == task.conversation_key for t in running)

    def _next_runnable(self) -> Task | None:
        """The first queued task that may start now (call with the lock held)."""
        running = [self._tasks[t] for t in self._running if t in self._tasks]
        if len(running) >= self.max_workers:
            return None
        per_user = collections.Counter(t.user_id for t in running)
        busy_conversations = {t.conversation_key for t in running}
        for task_id in self._queue:
            task = self._tasks.get(task_id)
            if (task is not None and per_user[task.user_id] < self.max_tasks_per_user
                    and task.conversation_key not in busy_conversations):
                return task
        return None

    def start(self) -> None:
        """Start the worker threads and the monitor (promotion, progress notes, cleanup)."""
        for number in range(self.max_workers):
            thread = threading.Thread(target=self._worker, name=f"worker-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        monitor = threading.Thread(target=self._monitor, name="monitor", daemon=True)
        monitor.start()
        self._threads.append(monitor)

    def _worker(self) -> None:
        while True:
            with self._lock:
                task = None
                while not self._stopping:
                    task = self._next_runnable()
                    if task is not None:
                        break
                    self._wakeup.wait(timeout=1.0)
                if task is None:
                    return
                self._queue.remove(task.id)
                running = self._running[task.id] = _Running()
                self._transition(task, status=RUNNING, started_at=self.clock(), attempts=task.attempts + 1,
                                 last_progress_at=self.clock())
            try:
                self._run(task, running)
            except Exception:
                log.exception("任务 %s 失败: unexpected error task=%s user=%s", task.id, task.id, task.user_id)
                if not task.finished:
                    self.fail_task(task.id, "内部错误")
                    self._schedule_delivery(task)
            finally:
                with self._lock:
                    self._running.pop(task.id, None)
                    self._wakeup.notify_all()

    def _run(self, task: Task, running: _Running) -> None:
        if task.background:
            log.info("后台任务开始执行: %s task=%s user=%s", task.id, task.id, task.user_id)
        session = self.conversation_session(task.conversation_key)
        result = self.client.run(task.prompt, conversation=task.conversation_key, session_id=session,
                                 timeout=self.task_timeout,
                                 cancel_event=running.cancel_event, run_tag=task.id,
                                 on_step=lambda step: self._transition(task, last_step=step))
        if result.cancelled and running.by_shutdown:
            # Stopped by a shutdown, not by the user: leave it to be re-run on the next start.
            self._transition(task, status=QUEUED, attempts=max(0, task.attempts - 1))
            log.info("任务 %s 因停止服务而中断，下次启动时重新执行 task=%s user=%s", task.id, task.id, task.user_id)
            return
        if result.ok:
            self.complete_task(task.id, result.text, result.duration)
        elif result.cancelled:
            self.fail_task(task.id, "已被用户取消", status=CANCELLED)
            self._transition(task, delivered=True)  # the cancel command already told the user
            return
        elif result.timed_out:
            self.fail_task(task.id, result.error, status=TIMED_OUT, duration=result.duration)
        else:
            self.fail_task(task.id, redact_secrets(result.error, self._secrets))
        self._schedule_delivery(task)

    # ------------------------------------------------------------ promotion, progress, cleanup

    def _monitor(self) -> None:
        # Its own event, not the workers' condition: a burst of submits must not wake it once per message.
        while not self._monitor_stop.wait(self.tick):
            try:
                self.check_running(self.clock())
            except Exception:
                log.exception("monitor check failed")

    def check_running(self, now: float) -> None:
        """Promote tasks past `sync_timeout`, send due progress notes, and clean up now and then."""
        promote, progress = [], []
        with self._lock:
            for task in self._tasks.values():
                if task.finished:
                    continue
                if not task.background and now - task.created_at >= self.sync_timeout:
                    promote.append(task)
                elif (task.background and task.status == RUNNING and self.progress_interval > 0
                      and now - (task.last_progress_at or now) >= self.progress_interval):
                    progress.append(task)
            for task in promote:
                self.promote_to_background(task)
            for task in progress:
                self._transition(task, last_progress_at=now)
        for task in progress:
            step = task.last_step or "等待 CodeBuddy 输出"
            self._notices.submit(self._notify, task,
                                 f"任务 {task.id} 仍在处理中 (已用时 {task.elapsed(now) / 60:.0f} 分钟, "
                                 f"最近步骤: {step})", False)
        if now - self._last_cleanup >= 60:
            self._last_cleanup = now
            self.cleanup(now)

    def promote_to_background(self, task: Task) -> None:
        """Move a short task that runs past `sync_timeout` to the background and tell the user."""
        with self._lock:
            if task.finished or task.background:
                return
            self._transition(task, background=True)
        log.info("任务 %s 超过 %.0f 秒，转入后台执行 task=%s user=%s", task.id, self.sync_timeout, task.id,
                 task.user_id)
        doing = "执行" if task.status == RUNNING else "排队"
        self._notices.submit(self._notify, task,
                             f"任务{doing}已超过 {self.sync_timeout:.0f} 秒，已转入后台继续{doing} "
                             f"(任务ID: {task.id})。完成后会主动推送结果，可发送 /status {task.id} 查看进度。")

    # ------------------------------------------------------------ delivery

    def _notify(self, task: Task, text: str, allow_webhook: bool = True) -> Delivery:
        return self._send_notice(task.route, text, allow_webhook, task.id)

    def _schedule_delivery(self, task: Task) -> Future:
        future = self._deliveries.submit(self.deliver_result, task)
        with self._lock:
            self._pending_deliveries.add(future)
        future.add_done_callback(self._delivery_done)
        return future

    def _delivery_done(self, future: Future) -> None:
        with self._lock:
            self._pending_deliveries.discard(future)

    def notify(self, route: Route, text: str) -> Future:
        """Send a notice (command answer, refusal) to a chat, off the calling thread."""
        return self._notices.submit(self._send_notice, route, text)

    def _send_notice(self, route: Route, text: str, allow_webhook: bool = True, task_id: str = "") -> Delivery:
        try:
            delivery = self.sender.send(route, text, allow_webhook=allow_webhook)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            log.exception("通知发送出错 task=%s user=%s", task_id or "-", route.user_id)
            return Delivery(ok=False, error=type(exc).__name__)
        if not delivery.ok:
            log.warning("通知发送失败: %s task=%s user=%s", delivery.error, task_id or "-", route.user_id)
        return delivery

    def result_text(self, task: Task) -> str:
        """What the user reads for a finished task."""
        if task.status == SUCCEEDED:
            text = task.result.strip() or "(CodeBuddy 没有返回内容)"
            if task.background:
                return f"**任务 {task.id} 已完成** (耗时 {task.elapsed(self.clock()):.0f} 秒)\n\n{text}"
            return text
        if task.status == TIMED_OUT:
            step = task.last_step or "无"
            return (f"任务 {task.id} 执行超时 (已用时 {task.elapsed(self.clock()) / 60:.1f} 分钟, "
                    f"最近步骤: {step})，已终止。")
        return f"CodeBuddy 执行失败: {task.error or '未知错误'} (任务ID: {task.id})"

    def deliver_result(self, task: Task) -> bool:
        """Send a finished task's result (webhook for short tasks, push for background ones); record it."""
        ack = self._acks.get(task.id)
        if ack is not None:
            try:
                ack.result(timeout=30)  # the acknowledgement goes first
            except Exception:
                pass  # a failed acknowledgement was logged by _notify; the result still goes out
        with self._lock:
            background = task.background
        try:
            delivery = self.sender.send(task.route, self.result_text(task), markdown=task.status == SUCCEEDED,
                                        title="CodeBuddy 回复", allow_webhook=not background)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            log.exception("任务 %s 结果发送出错 task=%s user=%s", task.id, task.id, task.user_id)
            delivery = Delivery(ok=False, error=type(exc).__name__)
        if delivery.ok:
            self._transition(task, delivered=True)
            if delivery.path == "webhook":
                log.info("任务结果已回复: %s task=%s user=%s", task.id, task.id, task.user_id)
            else:
                log.info("任务结果已推送: %s (%s) task=%s user=%s", task.id, delivery.path, task.id, task.user_id)
            return True
        log.error("任务 %s 结果发送失败 (%s): %s task=%s user=%s", task.id,
                  "不再重试" if delivery.permanent else "下次启动时重试", delivery.error, task.id, task.user_id)
        return False

    # ------------------------------------------------------------ user controls

    def tasks_for(self, user_id: str | None, limit: int = 10) -> list[Task]:
        """Recent tasks of a user (None = everyone), newest first, live state preferred."""
        tasks = self.store.recent_for_user(user_id, limit)
        with self._lock:
            return [self._tasks.get(t.id, t) for t in tasks]

    def cancel(self, task_id: str) -> Task | None:
        """Cancel a queued task, or stop a running one's CLI process group. None if it is not active."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.finished:
                return None
            if task.status == QUEUED:
                self._queue.remove(task.id)
                self._transition(task, status=CANCELLED, finished_at=self.clock(), error="已被用户取消",
                                 delivered=True)
                self._wakeup.notify_all()
                log.info("任务 %s 已取消 (排队中) task=%s user=%s", task.id, task.id, task.user_id)
                return task
            running = self._running.get(task.id)
        if running is not None:
            running.cancel_event.set()
            self.client.cancel(task.id)  # from this thread, at once, not at the run's next poll
        log.info("任务 %s 正在取消 (执行中) task=%s user=%s", task.id, task.id, task.user_id)
        return task

    def wait_finished(self, task_id: str, timeout: float) -> bool:
        """Block until the task has finished (used by cancel to confirm the process is gone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if task_id not in self._running:
                    return True
            time.sleep(0.02)
        return False

    # ------------------------------------------------------------ restart and shutdown

    def recover(self) -> None:
        """On start: deliver results never delivered, re-run interrupted tasks once (or fail them)."""
        for task in self.store.load(FINISHED_STATUSES, undelivered_only=True):
            with self._lock:
                self._tasks[task.id] = task
                task.background = True
            log.info("重新推送未送达的任务结果: %s task=%s user=%s", task.id, task.id, task.user_id)
            self._schedule_delivery(task)
        for task in self.store.load(ACTIVE_STATUSES):
            with self._lock:
                self._tasks[task.id] = task
            leftovers = self.client.kill_leftovers(task.id)
            if leftovers:
                log.warning("已结束上次运行遗留的 %d 个 CLI 进程 task=%s user=%s", leftovers, task.id, task.user_id)
            if task.attempts >= 2:
                self.fail_task(task.id, "任务在重新执行时再次中断")
                self._transition(task, background=True)
                self._schedule_delivery(task)
                continue
            interrupted = task.started_at is not None  # it had started; otherwise it was still waiting
            notice = (f"上次运行被中断，正在重新执行… (任务ID: {task.id})" if interrupted
                      else f"机器人已重启，你的任务继续排队执行 (任务ID: {task.id})，完成后会主动推送结果。")
            self._transition(task, status=QUEUED, background=True)
            with self._lock:
                self._queue.append(task.id)
                self._acks[task.id] = self._notices.submit(self._notify, task, notice, False)
                self._wakeup.notify_all()
            if interrupted:
                log.info("任务 %s 上次运行被中断，重新执行 task=%s user=%s", task.id, task.id, task.user_id)
            else:
                log.info("任务 %s 重启后继续排队 task=%s user=%s", task.id, task.id, task.user_id)

    def stop_accepting(self) -> None:
        """New prompts are refused from now on."""
        with self._lock:
            self._accepting = False

    def shutdown(self, grace: float, after_grace: float = 4.0) -> None:
        """Stop: running tasks get `grace` s to finish and deliver, then their CLIs are stopped for a re-run.

        Returns within about `grace + after_grace` seconds; queued and interrupted tasks stay in the store.
        """
        self.stop_accepting()
        grace_over = time.monotonic() + grace
        with self._lock:
            self._stopping = True  # workers take no new task; queued ones stay queued in the store
            self._wakeup.notify_all()
        self._monitor_stop.set()
        while time.monotonic() < grace_over:
            with self._lock:
                if not self._running:
                    break
            time.sleep(0.05)
        with self._lock:
            for running in self._running.values():
                running.by_shutdown = True
                running.cancel_event.set()
        hard_stop = time.monotonic() + after_grace
        for thread in self._threads:
            thread.join(timeout=max(0.1, hard_stop - time.monotonic()))
        with self._lock:
            pending = list(self._pending_deliveries)
        futures_wait(pending, timeout=max(0.1, hard_stop - time.monotonic()))
        self._notices.shutdown(wait=False, cancel_futures=True)
        self._deliveries.shutdown(wait=False, cancel_futures=True)

    @property
    def stats(self) -> dict[str, int]:
        """Counts for metrics: live tasks by status, finished ones since start, queue length, running tasks."""
        with self._lock:
            counts: dict[str, int] = {status: 0 for status in STATUS_LABELS}
            for task in self._tasks.values():
                if not task.finished:
                    counts[task.status] += 1
            for status, count in self._finished_counts.items():
                counts[status] += count
            return {**{f"tasks_{k}": v for k, v in counts.items()}, "queue_length": len(self._queue),
                    "running": len(self._running)}
