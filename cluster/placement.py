"""Where a new task goes once the intake has created it, decided on the cluster's offload thread so that the intake
never waits on the DB: dropped as a duplicate another host took, handed to the live host holding its conversation
(issue 16, conversation affinity), or queued here — acknowledged either way, in arrival order.
"""

from __future__ import annotations

import logging
from typing import Any

from common.logs import task_log
from tasks import texts
from tasks.task import QUEUED, Task

log = logging.getLogger("cluster")

PLACE_WRITE_WAIT = 2.0  # seconds placement waits for a new task's row (and its msgId) to be written


def place_task(cluster: Any, manager: Any, task: Task, expected: str) -> None:
    """Place a new task, on the cluster's offload thread (the intake never waits on the DB), in arrival order.

    Once its row and its msgId are written: a msgId another host took first makes it a duplicate, dropped unanswered
    (the journal never writes its row). Issue 16, conversation affinity: a task whose conversation a live host holds
    is acknowledged here and handed to that host; one whose host is gone stays here, and its user is told that files
    from earlier turns are not on this host. Everything else is queued and acknowledged here. With the DB down or slow
    a task stays here (a msgId is then deduplicated by this host only)."""
    store, board = manager.store, manager.board
    written = store.wait_written(PLACE_WRITE_WAIT)  # the row must exist before another host reads it
    if written and task.msg_id and getattr(store, "taken_elsewhere", lambda msg_id: False)(task.msg_id):
        with board.lock:
            board.tasks.pop(task.id, None)
        task_log(log, task).info("重复消息已忽略: msgId=%s user=%s (另一主机已接收)", task.msg_id, task.user_id)
        return
    owner, alive = cluster.conversation_host(task.conversation_key)
    if owner is not None and owner != cluster.host and not alive:
        manager.outbox.notice(task.route, texts.conversation_moved(task, owner), task_id=task.id)
    elif owner is not None and owner != cluster.host and written:
        with board.lock:
            if not _still_new(board, task):
                return
            board.tasks.pop(task.id, None)
            manager.outbox.acknowledge(task, texts.acknowledgement(task, "", expected))
        if cluster.hand_off(task.id, owner):
            log.info("任务 %s 交给会话所在主机 %s", task.id, owner)
            return
        with board.lock:  # it stays here after all (acknowledged already)
            board.adopt(task)
            board.enqueue(task)
        return
    with board.lock:  # acknowledged before a worker can take it: the answer never overtakes the ack
        if not _still_new(board, task):
            return
        position = board.enqueue(task)
        waiting = texts.waiting_note(board.hold_reason(task), position, board.limits.max_tasks_per_user)
        manager.outbox.acknowledge(task, texts.acknowledgement(task, waiting, expected))
    if task.background:
        task_log(log, task).info("异步任务已启动: %s", task.id)


def _still_new(board: Any, task: Task) -> bool:
    """Whether a task being placed is still live and queued (a /cancel may have ended it meanwhile); board lock held."""
    return board.tasks.get(task.id) is task and task.status == QUEUED and task.id not in board.queue
