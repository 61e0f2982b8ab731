"""A thread that watches running tasks: it moves overdue short ones to the background, sends progress notes
on long ones, sends undelivered results again when their pause is over, and cleans up now and then.
"""

from __future__ import annotations

import logging
import threading

from common.logs import task_log
from common.supervision import Supervisor
from tasks import texts
from tasks.board import TaskBoard
from tasks.delivery import Outbox
from tasks.task import RUNNING, Task

log = logging.getLogger("async_task_manager")

CLEANUP_INTERVAL = 60.0  # seconds between clean-ups of memory and the store
CANCEL_CONFIRM_WAIT = 15.0  # seconds a cancel waits for the CLI to exit before it says "still exiting"


class Monitor:
    """Every `tick` seconds: promote tasks past `sync_timeout`, send due progress notes, clean up."""

    def __init__(self, board: TaskBoard, outbox: Outbox, *, sync_timeout: float, progress_interval: float,
                 tick: float, supervisor: Supervisor, cancel_confirm_wait: float = CANCEL_CONFIRM_WAIT) -> None:
        self.board = board
        self.outbox = outbox
        self.sync_timeout = sync_timeout
        self.progress_interval = progress_interval
        self.tick = tick
        self.supervisor = supervisor
        self.cancel_confirm_wait = cancel_confirm_wait
        # Its own event, not the workers' condition: a burst of submits must not wake it once per message.
        self._stop = threading.Event()
        self._last_cleanup = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = self.supervisor.start("monitor", self._watch)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.promote_notify_and_clean(self.board.clock())
            except Exception:
                log.exception("monitor check failed")

    def promote_notify_and_clean(self, now: float) -> None:
        """Promote tasks past `sync_timeout`, send due progress notes, and clean up once a minute."""
        promote, progress = [], []
        with self.board.lock:
            for task in self.board.tasks.values():
                if task.finished:
                    continue
                running = self.board.running.get(task.id)
                waited = running.waiting_time(now) if running is not None else 0.0
                awaiting = running is not None and running.awaiting_since is not None
                if not task.background and not awaiting and now - task.created_at - waited >= self.sync_timeout:
                    promote.append(task)
                elif (task.background and task.status == RUNNING and self.progress_interval > 0
                      and now - (task.last_progress_at or now) >= self.progress_interval):
                    progress.append(task)
            for task in promote:
                self.promote_to_background(task)
            for task in progress:
                self.board.transition(task, last_progress_at=now)
        for task in progress:  # on the task's AI card when it has one; else a message (webhook first)
            note = texts.progress_note(task, now)
            if self.outbox.cards is None or not self.outbox.cards.progress(task, note):
                self.outbox.notice(task.route, note, task_id=task.id)
        for task, watchers in self.board.overdue_cancels(now, self.cancel_confirm_wait):
            for watcher in watchers:
                watcher(task, False)
        self.outbox.retry_due(now)
        if now - self._last_cleanup >= CLEANUP_INTERVAL:
            self._last_cleanup = now
            self.board.cleanup(now)

    def promote_to_background(self, task: Task) -> None:
        """Move a short task that runs past `sync_timeout` to the background and tell the user."""
        with self.board.lock:
            if task.finished or task.background:
                return
            self.board.transition(task, background=True)
        task_log(log, task).info("任务 %s 超过 %.0f 秒，转入后台执行", task.id, self.sync_timeout)
        self.outbox.notice(task.route, texts.moved_to_background(task, self.sync_timeout), task_id=task.id)
