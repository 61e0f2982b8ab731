"""The task manager: takes a prompt in, acknowledges and queues it, and sees it through run and delivery.

It wires the rooms of a task's life together — `routing` (background or not), `task_board` (live tasks,
the one transition point), `scheduling` (who may start), `workers` (CLI runs), `monitor` (promotion,
progress notes, clean-up) and `delivery` (acknowledgements, notices, results) — and handles what spans
them: intake, sessions, cancel, restart recovery and shutdown. The outside is reached only through the
two seams in `tasks/seams.py`: a client with `run(...) -> RunResult` and a sender with `send(...) -> Delivery`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from codebuddy_client import new_session_id
from common.logs import task_log
from common.supervision import Supervisor
from config import MEMORY_RETENTION_SECONDS, SEED_LONG_TASK_KEYWORDS, Config
from dingtalk.route import Route
from store.base import TaskStore
from store.memory import MemoryTaskStore
from tasks import recovery, texts
from tasks.admission import Limits
from tasks.board import CancelWatcher, TaskBoard
from tasks.delivery import Outbox
from tasks.monitor import Monitor
from tasks.routing import Router
from tasks.seams import Client, Sender
from tasks.task import CANCELLED, NO_KEYWORD, QUEUED, Task
from tasks.workers import Workers

log = logging.getLogger("async_task_manager")

DELIVERED_WRITE_WAIT = 2.0  # seconds a delivery thread waits for "delivered" to reach the store


class AsyncTaskManager:
    """Tracks every task, runs them on `max_workers` threads, and delivers their results."""

    def __init__(self, client: Client, sender: Sender, store: TaskStore | None = None, *,
                 max_workers: int = 4, max_tasks_per_user: int = 2, sync_timeout: float = 60.0,
                 task_timeout: float = 1800.0, keywords: Iterable[str] = SEED_LONG_TASK_KEYWORDS,
                 progress_interval: float = 300.0, retention_days: float = 30.0,
                 memory_retention: float = MEMORY_RETENTION_SECONDS, tick: float = 0.5,
                 retry_backoff: float = 60.0, give_up_after: float = 86400.0,
                 clock: Callable[[], float] = time.time, secrets: Iterable[str] = (),
                 supervisor: Supervisor | None = None, approval_timeout: float = 300.0, approvals: bool = True,
                 approval_max_waits: int = 3,
                 after_result: Callable[[Task], object] | None = None) -> None:
        self.client, self.clock = client, clock
        self.supervisor = supervisor if supervisor is not None else Supervisor()
        self.store: TaskStore = store if store is not None else MemoryTaskStore()
        self.router = Router(self.store, sync_timeout=sync_timeout, keywords=keywords)
        self.board = TaskBoard(self.store, self.router, limits=Limits(max_workers, max_tasks_per_user), clock=clock,
                               memory_retention=memory_retention, retention_days=retention_days)
        self.outbox = Outbox(sender, clock=clock, mark_delivered=lambda task: (  # recorded, then its files sent
                             self.board.mark_delivered(task), after_result is not None and after_result(task)),
                             mark_undeliverable=self.board.mark_undeliverable, give_up_after=give_up_after,
                             written=lambda: self.store.wait_written(DELIVERED_WRITE_WAIT), retry_backoff=retry_backoff)
        self.workers = Workers(self.board, client, self.outbox, task_timeout=task_timeout, secrets=secrets,
                               session_for=self.conversation_session, supervisor=self.supervisor,
                               approval_timeout=approval_timeout, approvals=approvals,
                               approval_max_waits=approval_max_waits)
        self.monitor = Monitor(self.board, self.outbox, sync_timeout=sync_timeout,
                               progress_interval=progress_interval, tick=tick, supervisor=self.supervisor)
        self._accepting, self.cluster = True, None  # cluster: issue 16, hosts sharing a PostgreSQL DB (join_cluster)

    @classmethod
    def from_config(cls, config: Config, client: Client, sender: Sender, store: TaskStore,
                    after_result: Callable[[Task], object] | None = None) -> AsyncTaskManager:
        """A manager with the bot's settings."""
        return cls(client, sender, store, max_workers=config.max_workers,
                   max_tasks_per_user=config.max_tasks_per_user, sync_timeout=config.sync_timeout,
                   task_timeout=config.task_timeout, keywords=config.all_long_task_keywords,
                   progress_interval=config.progress_interval, retention_days=config.task_retention_days,
                   retry_backoff=min(60.0, config.delivery_retry_window),
                   give_up_after=config.delivery_give_up_hours * 3600, secrets=config.secrets,
                   approval_timeout=config.approval_timeout, approvals=config.approvals,
                   approval_max_waits=config.approval_max_waits, after_result=after_result)

    # ------------------------------------------------------------ routing and the board, for callers

    def should_use_async(self, prompt: str, user_id: str | None = None) -> bool:
        """True when `prompt` should run in the background (see `Router.should_use_async`)."""
        return self.router.should_use_async(prompt, user_id)

    def expected_duration(self, keyword: str) -> str:
        """How long tasks of this keyword class take (see `Router.expected_duration`)."""
        return self.router.expected_duration(keyword)

    def expected_remaining(self, task: Task, now: float) -> str:
        """How much longer a running task should take (see `Router.expected_remaining`)."""
        return self.router.expected_remaining(task, now)

    def create_task(self, user_id: str, prompt: str, route: Route, **fields: Any) -> Task:
        """Create a queued task, remember it and persist it (see `TaskBoard.create`)."""
        return self.board.create(user_id, prompt, route, **fields)

    def get_task(self, task_id: str) -> Task | None:
        """The task with this id, from memory or the store."""
        return self.board.get(task_id)

    def update_status(self, task_id: str, status: str, **changes: object) -> Task:
        """Move a task to `status` (and set any other fields)."""
        return self.board.update_status(task_id, status, **changes)

    def complete_task(self, task_id: str, text: str, duration: float) -> Task:
        """Record a successful result (before it is delivered)."""
        return self.board.complete(task_id, text, duration)

    def cleanup(self, now: float | None = None) -> int:
        """Drop long-finished tasks from memory and purge old ones from the store (see `TaskBoard.cleanup`)."""
        return self.board.cleanup(now)

    def tasks_for(self, user_id: str | None, limit: int = 10) -> list[Task]:
        """Recent tasks of a user (None = everyone), newest first, live state preferred."""
        return self.board.recent(user_id, limit)

    def queue_position(self, task_id: str) -> int:
        """1-based position of a queued task in the wait queue, 0 when it is not waiting."""
        return self.board.position(task_id)

    def queued_count(self, user_id: str) -> int:
        """How many of the user's tasks wait in the queue (see `TaskBoard.queued_count`; issue 16: on every host)."""
        return self.cluster.queued(self.board, user_id) if self.cluster else self.board.queued_count(user_id)

    @property
    def stats(self) -> dict[str, int]:
        """Counts for metrics: live tasks by status, finished ones since start, queue length, running tasks."""
        return self.board.stats

    # ------------------------------------------------------------ intake

    def remember_message(self, msg_id: str) -> bool:
        """Record a DingTalk msgId; False when it was recorded before (a redelivery)."""
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
               msg_id: str = "", label: str = "") -> Task | None:
        """Create a task for `prompt`, acknowledge it at once and queue it. None if not accepting.

        A labelled task (a schedule's fire: `label` names it) runs in the background and is not acknowledged: its
        answer, opening with the label, is the one message (a push, as nobody's session webhook is alive)."""
        with self.board.lock:
            if not self._accepting:
                return None
        keyword = self.router.matched_keyword(prompt)
        background = bool(label) or keyword is not None or self.router.should_use_async(prompt, user_id)
        if background:
            log.info("检测到长时间任务 (关键词: %s) user=%s", keyword or "历史耗时", user_id)
        task = self.board.create(user_id, prompt, route, user_name=user_name, conversation_key=conversation_key,
                                 msg_id=msg_id, background=background, keyword=keyword or NO_KEYWORD, label=label)
        expected = self.router.expected_duration(task.keyword) if background else ""
        if self.cluster is not None and self.cluster.place(self, task, expected):  # issue 16: lives on another host
            return task
        with self.board.lock:  # acknowledged before a worker can take it: the answer never overtakes the ack
            position = self.board.enqueue(task)
            waiting = texts.waiting_note(self.board.hold_reason(task), position,
                                             self.board.limits.max_tasks_per_user)
            if not label:
                self.outbox.acknowledge(task, texts.acknowledgement(task, waiting, expected))
        if background:
            task_log(log, task).info("异步任务已启动: %s", task.id)
        return task

    # ------------------------------------------------------------ user controls

    def cancel(self, task_id: str, on_ended: CancelWatcher | None = None) -> Task | None:
        """Cancel a queued task, or stop a running one's CLI process group. None if it is not active.

        `on_ended(task, stopped)` is called once the task has ended (at once for a queued task; for a running
        one when its worker lets go of it — its status then says whether the cancel or the answer won), or
        with stopped=False when the CLI has not exited within the monitor's wait. The cancel is recorded in
        the task, so it stays final across a restart.
        """
        board = self.board
        with board.lock:
            task = board.tasks.get(task_id)
            if task is None or task.finished:
                return None
            if task.status == QUEUED:
                if task.id in board.queue:
                    board.queue.remove(task.id)
                board.transition(task, status=CANCELLED, finished_at=self.clock(), error="已被用户取消",
                                 cancel_requested=True, delivered=True)
                board.wakeup.notify_all()
                task_log(log, task).info("任务 %s 已取消 (排队中)", task.id)
            else:
                board.transition(task, cancel_requested=True)
                running = board.running.get(task.id)
                if running is not None:
                    running.cancel_requested_at = self.clock()
                    if on_ended is not None:
                        running.cancel_watchers.append(on_ended)
                    running.cancel_event.set()
        if task.finished:
            if on_ended is not None:
                on_ended(task, True)
            return task
        self.client.cancel(task.id)  # the run sees the event within its poll and interrupts the CLI's turn
        task_log(log, task).info("任务 %s 正在取消 (执行中)", task.id)
        return task

    # ------------------------------------------------------------ start, restart and shutdown

    def start(self) -> None:
        """Start the worker threads, the notice threads and the monitor (promotion, progress notes, cleanup)."""
        self.outbox.prestart()
        self.workers.start()
        self.monitor.start()

    def recover(self, only: set[str] | None = None) -> None:
        """On start: deliver results never delivered, re-run interrupted tasks once (or fail them); `only` these."""
        recovery.recover(self.store, self.board, self.outbox, only)

    def stop_accepting(self) -> None:
        """New prompts are refused from now on."""
        with self.board.lock:
            self._accepting = False

    def shutdown(self, grace: float, after_grace: float = 4.0) -> None:
        """Stop: running tasks get `grace` s to finish and deliver, then their CLIs are stopped for a re-run.

        Returns within about `grace + after_grace` seconds (and the store's close, which writes what it still
        holds: a few seconds at most); queued and interrupted tasks stay in the store.
        """
        self.stop_accepting()
        grace_over = time.monotonic() + grace
        with self.board.lock:
            self.board.stopping = True  # workers take no new task; queued ones stay queued in the store
            self.board.wakeup.notify_all()
        self.monitor.stop()
        while time.monotonic() < grace_over:
            with self.board.lock:
                if not self.board.running:
                    break
            time.sleep(0.05)
        with self.board.lock:
            for running in self.board.running.values():
                running.by_shutdown = True
                running.cancel_event.set()
        hard_stop = time.monotonic() + after_grace
        self.workers.join(hard_stop)
        self.monitor.join(max(0.1, hard_stop - time.monotonic()))
        self.outbox.wait_for_deliveries(max(0.1, hard_stop - time.monotonic()))
        self.outbox.shutdown()
        self.client.close()  # idle warm CLI processes
        self.store.close()  # a journaled store writes what it still holds
