"""The live tasks — the queue and what is running — changed only through `transition`, under one lock,
and written through to the store there.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from common.logs import task_log
from config import DEDUP_TTL_SECONDS, MEMORY_RETENTION_SECONDS
from dingtalk.route import Route
from store.base import TaskStore
from tasks.admission import Limits, Occupancy, next_runnable
from tasks.routing import Router
from tasks.task import FAILED, NO_KEYWORD, QUEUED, RUNNING, STATUS_LABELS, SUCCEEDED, TIMED_OUT, Task

log = logging.getLogger("async_task_manager")

CancelWatcher = Callable[[Task, bool], None]  # (task, stopped): stopped False = still exiting after the wait

ADMIT_WRITE_WAIT = 2.0  # seconds admission waits for the journal's earlier writes (issue 16)

# The seed's name for a running task in the 状态更新 line, which operators grep for.
LOGGED_STATUS = {RUNNING: "processing"}


@dataclass
class Running:
    """A task on a worker: how to stop it, and whether a shutdown (not the user) did."""

    cancel_event: threading.Event = field(default_factory=threading.Event)
    by_shutdown: bool = False
    cancel_watchers: list[CancelWatcher] = field(default_factory=list)  # told once the run has ended
    cancel_requested_at: float | None = None
    awaiting_since: float | None = None  # waiting for its sender to answer a question (tasks/approvals.py)
    waited: float = 0.0  # seconds spent waiting for answers (not counted towards SYNC_TIMEOUT)
    stop_reason: str = ""  # why the bot itself stopped the run (it asked past APPROVAL_MAX_WAITS): its task fails

    def waiting_time(self, now: float) -> float:
        return self.waited + (now - self.awaiting_since if self.awaiting_since is not None else 0.0)


class _TakingNext:
    """The workers' side of the board: the next queued task that may start, with `admit` (several hosts) asked without
    the lock, the DB being slow or unreachable at times. Its state is TaskBoard's."""

    lock: threading.RLock
    wakeup: threading.Condition
    store: TaskStore
    limits: Limits
    clock: Callable[[], float]
    tasks: dict[str, Task]
    queue: list[str]
    running: dict[str, Running]
    admitting: dict[str, Task]
    admit: Callable[[Task, list[Task]], bool | None] | None
    stopping: bool
    transition: Callable[..., Task]
    _running_tasks: Callable[[], list[Task]]

    def take_next(self, poll: float = 1.0) -> tuple[Task, Running] | None:
        """Wait for a queued task that may start, mark it running; None once the board is stopping.

        With `admit` (several hosts), the other hosts are asked without the lock, the DB being slow or unreachable
        at times: the task counts as running meanwhile (no other worker starts past the limits) and is checked
        again under the lock once the answer is in (a /cancel or a shutdown may have come first)."""
        refused: set[str] = set()  # refused by the other hosts in this pass: asked again after the next wait
        while True:
            with self.lock:
                task = self._next_candidate(refused)
                while task is None:
                    if self.stopping:
                        return None
                    self.wakeup.wait(timeout=poll)
                    refused.clear()
                    task = self._next_candidate(refused)
                if self.stopping:
                    return None
                if self.admit is None:
                    return self._start(task)
                running_here = self._running_tasks() + list(self.admitting.values())
                self.admitting[task.id] = task
            verdict = self._ask_admission(task, running_here)
            with self.lock:
                del self.admitting[task.id]
                self.wakeup.notify_all()  # its slot is free again, or taken for good below
                if verdict is None:  # another host holds the task now (and answers it): not this host's to run
                    if task.id in self.queue:
                        self.queue.remove(task.id)
                    self.tasks.pop(task.id, None)
                elif not verdict:
                    refused.add(task.id)
                elif self.tasks.get(task.id) is task and task.id in self.queue and task.status == QUEUED \
                        and not self.stopping:
                    return self._start(task)
                else:  # admitted, but cancelled or stopping meanwhile: its row says running; write what it is
                    self.store.save(task)

    def _next_candidate(self, refused: set[str]) -> Task | None:
        """The first queued task that may start here as far as this host knows (lock held)."""
        queued = (self.tasks[t] for t in self.queue
                  if t in self.tasks and t not in refused and t not in self.admitting)
        return next_runnable(queued, self._running_tasks() + list(self.admitting.values()), self.limits)

    def _ask_admission(self, task: Task, running_here: list[Task]) -> bool | None:
        """`admit`'s verdict on `task`, asked without the lock; an unexpected error refuses it for now."""
        assert self.admit is not None
        try:
            # Admission writes the row as running directly; a save of it still waiting in the store's journal
            # (its creation, "queued") would land after and hide the run from the other hosts.
            self.store.wait_written(ADMIT_WRITE_WAIT)
            return self.admit(task, running_here)
        except Exception:
            task_log(log, task).exception("任务 %s 的集群限额检查出错，稍后再试", task.id)
            return False

    def _start(self, task: Task) -> tuple[Task, Running]:
        """Move a queued task to running (lock held)."""
        self.queue.remove(task.id)
        running = self.running[task.id] = Running()
        now = self.clock()
        self.transition(task, status=RUNNING, started_at=now, attempts=task.attempts + 1, last_progress_at=now)
        return task, running


class TaskBoard(_TakingNext):
    """Live tasks by id, the wait queue and the running set, kept in step with the store under one lock.

    `lock` guards everything here; `wakeup` (on the same lock) wakes the workers when the queue or the
    running set changes.
    """

    def __init__(self, store: TaskStore, router: Router, *, limits: Limits, clock: Callable[[], float],
                 memory_retention: float = MEMORY_RETENTION_SECONDS, retention_days: float = 30.0) -> None:
        self.lock = threading.RLock()
        self.wakeup = threading.Condition(self.lock)
        self.store = store
        self.router = router
        self.limits = limits
        self.clock = clock
        self.memory_retention = memory_retention
        self.retention_days = retention_days
        self.tasks: dict[str, Task] = {}
        self.queue: list[str] = []
        self.running: dict[str, Running] = {}
        self.stopping = False  # workers take no new task
        # Issue 16: with hosts sharing a PostgreSQL DB, cluster.Cluster.admit: may it start here, given the others?
        # Asked without the lock (it waits on the DB); the tasks being asked about count as running meanwhile.
        self.admit: Callable[[Task, list[Task]], bool | None] | None = None  # None: another host holds it
        self.admitting: dict[str, Task] = {}
        self._finished_counts: dict[str, int] = {}  # since start, by final status (for metrics)

    # -- the one place tasks change

    def transition(self, task: Task, **changes: object) -> Task:
        """Apply `changes` to `task` under the lock and write it through to the store.

        A task that has finished and been delivered leaves memory here (the store keeps it), so memory
        holds only live tasks however many have run.
        """
        with self.lock:
            was_finished, was_status = task.finished, task.status
            for name, value in changes.items():
                setattr(task, name, value)
            self.store.save(task)
            if task.status != was_status:
                task_log(log, task).info("任务 %s 状态更新: %s", task.id, LOGGED_STATUS.get(task.status, task.status))
            if task.finished and not was_finished:
                self._finished_counts[task.status] = self._finished_counts.get(task.status, 0) + 1
            if task.finished and (task.delivered or task.undeliverable):
                self.tasks.pop(task.id, None)
            return task

    def mark_delivered(self, task: Task) -> None:
        """Record that the task's result reached the user."""
        self.transition(task, delivered=True)

    def mark_undeliverable(self, task: Task) -> None:
        """Record that the task's result was given up: never re-sent, purged like a delivered one."""
        self.transition(task, undeliverable=True)

    def create(self, user_id: str, prompt: str, route: Route, *, user_name: str = "", conversation_key: str = "",
               msg_id: str = "", background: bool = False, keyword: str = NO_KEYWORD, label: str = "") -> Task:
        """Create a queued task, remember it and persist it."""
        task = Task(id=self._unused_id(), user_id=user_id, user_name=user_name,
                    conversation_key=conversation_key or route.conversation_id or user_id, route=route,
                    prompt=prompt, keyword=keyword, background=background, created_at=self.clock(), msg_id=msg_id,
                    label=label)
        with self.lock:
            self.tasks[task.id] = task
            self.store.save(task)
        task_log(log, task).info("创建任务: %s, 用户: %s", task.id, user_id)
        return task

    def _unused_id(self) -> str:
        """64 random bits, never the id of a live task.

        Not looked up in the store, a read on every message for a collision that all but never happens: the store
        refuses to overwrite another task's row and logs it (`任务ID冲突`).
        """
        while True:
            task_id = uuid.uuid4().hex[:16]
            if task_id not in self.tasks:
                return task_id

    def adopt(self, task: Task) -> None:
        """Hold a task loaded from the store (after a restart) as live."""
        with self.lock:
            self.tasks[task.id] = task

    def get(self, task_id: str) -> Task | None:
        """The task with this id, from memory or the store."""
        with self.lock:
            task = self.tasks.get(task_id)
        return task if task is not None else self.store.get(task_id)

    def update_status(self, task_id: str, status: str, **changes: object) -> Task:
        """Move a task to `status` (and set any other fields)."""
        task = self.get(task_id)
        if task is None:
            raise KeyError(task_id)
        return self.transition(task, status=status, **changes)

    def complete(self, task_id: str, text: str, duration: float) -> Task:
        """Record a successful result (before it is delivered)."""
        task = self.update_status(task_id, SUCCEEDED, result=text, finished_at=self.clock(), error="")
        self.router.record_duration(task, duration, self.clock())
        task_log(log, task).info("任务 %s 完成，耗时: %.1f秒", task_id, duration)
        return task

    def fail(self, task_id: str, error: str, status: str = FAILED, duration: float | None = None) -> Task:
        """Record a failure (FAILED, TIMED_OUT or CANCELLED) with its reason."""
        task = self.update_status(task_id, status, error=error, finished_at=self.clock())
        if status == TIMED_OUT and duration is not None:
            self.router.record_duration(task, duration, self.clock())
        task_log(log, task).warning("任务 %s 失败 (%s): %s", task_id, status, error)
        return task

    # -- the queue

    def enqueue(self, task: Task) -> int:
        """Put `task` at the end of the wait queue and wake a worker; its 1-based position."""
        with self.lock:
            self.queue.append(task.id)
            self.wakeup.notify_all()
            return self.queue.index(task.id) + 1

    def position(self, task_id: str) -> int:
        """1-based position of a queued task in the wait queue, 0 when it is not waiting."""
        with self.lock:
            try:
                return self.queue.index(task_id) + 1
            except ValueError:
                return 0

    def queued_count(self, user_id: str) -> int:
        """How many of the user's tasks wait in the queue."""
        with self.lock:
            return sum(1 for t in self.queue if t in self.tasks and self.tasks[t].user_id == user_id)

    def running_count(self, user_id: str) -> int:
        """How many of the user's tasks run on this host now."""
        with self.lock:
            return sum(1 for t in self.running if t in self.tasks and self.tasks[t].user_id == user_id)

    def _running_tasks(self) -> list[Task]:
        return [self.tasks[t] for t in self.running if t in self.tasks]

    def hold_reason(self, task: Task) -> str:
        """What keeps a queued task waiting ("" when it may start now): see `scheduling.Occupancy.holdback`."""
        with self.lock:
            ahead = self.queue[:self.queue.index(task.id)] if task.id in self.queue else []
            return Occupancy(self._running_tasks(), self.limits).holdback(
                task, [self.tasks[t] for t in ahead if t in self.tasks])

    def release(self, task: Task) -> None:
        """The task's worker is done with it: free its slot, wake the others, tell whoever cancelled it."""
        with self.lock:
            running = self.running.pop(task.id, None)
            self.wakeup.notify_all()
        for watcher in running.cancel_watchers if running is not None else ():
            try:
                watcher(task, True)
            except Exception:
                task_log(log, task).exception("取消确认发送出错")

    def overdue_cancels(self, now: float, wait: float) -> list[tuple[Task, list[CancelWatcher]]]:
        """Running tasks cancelled more than `wait` s ago and still running; their watchers are handed over once."""
        overdue = []
        with self.lock:
            for task_id, running in self.running.items():
                if (running.cancel_watchers and running.cancel_requested_at is not None
                        and now - running.cancel_requested_at >= wait and task_id in self.tasks):
                    overdue.append((self.tasks[task_id], running.cancel_watchers))
                    running.cancel_watchers = []
        return overdue

    # -- memory, store and metrics

    def cleanup(self, now: float | None = None) -> int:
        """Drop finished tasks whose delivery gave up from memory after a while; purge old ones from the store.

        (Delivered tasks leave memory at once, in `transition`; undelivered ones wait in the store for the
        next start.)
        """
        now = self.clock() if now is None else now
        with self.lock:
            old = [k for k, t in self.tasks.items()
                   if t.finished and now - (t.finished_at or now) > self.memory_retention]
            for key in old:
                del self.tasks[key]
        purged = self.store.purge(now - self.retention_days * 86400, now - DEDUP_TTL_SECONDS)
        if old or purged:
            log.info("清理任务: 内存 %d 个, 数据库 %d 个", len(old), purged)
        return len(old)

    def recent(self, user_id: str | None, limit: int = 10) -> list[Task]:
        """Recent tasks of a user (None = everyone), newest first, live state preferred."""
        tasks = self.store.recent_for_user(user_id, limit)
        with self.lock:
            return [self.tasks.get(t.id, t) for t in tasks]

    @property
    def stats(self) -> dict[str, int]:
        """Counts for metrics: live tasks by status, finished ones since start, queue length, running tasks."""
        with self.lock:
            counts: dict[str, int] = {status: 0 for status in STATUS_LABELS}
            for task in self.tasks.values():
                if not task.finished:
                    counts[task.status] += 1
            for status, count in self._finished_counts.items():
                counts[status] += count
            return {**{f"tasks_{k}": v for k, v in counts.items()}, "queue_length": len(self.queue),
                    "running": len(self.running)}
