"""Restart recovery: what a start finds in the task store — results never delivered, tasks interrupted by a stop or
a crash — and what becomes of each (delivered again, re-run once, or failed)."""

from __future__ import annotations

import logging

from common.logs import task_log
from store.base import TaskStore
from tasks import texts
from tasks.board import TaskBoard
from tasks.delivery import Outbox
from tasks.task import ACTIVE_STATUSES, CANCELLED, FINISHED_STATUSES, QUEUED, Task

log = logging.getLogger("async_task_manager")


def _end_orphan_card(outbox: Outbox, task: Task) -> None:
    """A run cut off by a crash or restart may have left its AI card streaming: end it ("上一次回复处理中断")."""
    if outbox.cards is not None:
        outbox.cards.end_orphan(task)


def recover(store: TaskStore, board: TaskBoard, outbox: Outbox, only: set[str] | None = None) -> None:
    """Deliver results never delivered, re-run interrupted tasks once (or fail them); with `only`, just those ids
    (a host of several takes its own and those of dead hosts, docs/cluster.md)."""
    for task in store.load(FINISHED_STATUSES, undelivered_only=True):
        if task.undeliverable or (only is not None and task.id not in only):
            continue  # given up (purged with the other old tasks), or another host's
        with board.lock:
            board.adopt(task)
            task.background = True
        _end_orphan_card(outbox, task)
        task_log(log, task).info("重新推送未送达的任务结果: %s", task.id)
        outbox.deliver_later(task)
    for task in [t for t in store.load(ACTIVE_STATUSES) if only is None or t.id in only]:  # issue 16
        board.adopt(task)
        tlog = task_log(log, task)
        _end_orphan_card(outbox, task)
        # No process hunt here: runs are tagged by CLI process, not task; CodeBuddyClient.start ended this
        # installation's leftovers before recovery, and a dead host's run was on that host.
        if task.cancel_requested:  # the user's cancel is final: never re-run
            board.fail(task.id, "已被用户取消", status=CANCELLED)
            board.mark_delivered(task)
            outbox.notice(task.route, texts.cancelled(task), task_id=task.id)
            continue
        if task.attempts >= 2:
            board.fail(task.id, "任务在重新执行时再次中断")
            board.transition(task, background=True)
            outbox.deliver_later(task)
            continue
        interrupted = task.started_at is not None  # it had started; otherwise it was still waiting
        board.transition(task, status=QUEUED, background=True)
        with board.lock:
            outbox.acknowledge(task, texts.restarted(task, interrupted))
            board.enqueue(task)
        if interrupted:
            tlog.info("任务 %s 上次运行被中断，重新执行", task.id)
        else:
            tlog.info("任务 %s 重启后继续排队", task.id)
