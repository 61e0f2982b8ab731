"""Where a new task goes once the intake has created it, decided on the cluster's offload thread so that the intake
never waits on the DB: dropped as a duplicate another host took, handed to the live host holding its conversation
(issue 16, conversation affinity), or queued here — acknowledged either way, in arrival order.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from cluster.statements import warn_unless_known
from common.logs import task_log
from store.postgres import DB_NOW
from tasks import texts
from tasks.task import QUEUED, Task

log = logging.getLogger("cluster")

PLACE_WRITE_WAIT = 2.0  # seconds placement waits for a new task's row (and its msgId) to be written
TASK_CHANNEL = "bot_task"  # a task handed to the host holding its conversation (cluster/inbox.py takes it)


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
    owner, alive = conversation_host(cluster, task.conversation_key)
    if owner is not None and owner != cluster.host and not alive:
        manager.outbox.notice(task.route, texts.conversation_moved(task, owner), task_id=task.id)
    elif owner is not None and owner != cluster.host and written:
        with board.lock:
            if not _still_new(board, task):
                return
            board.tasks.pop(task.id, None)
            if not task.label:  # a schedule's fire: its answer is its one message
                manager.outbox.acknowledge(task, texts.acknowledgement(task, "", expected))
        if hand_off(cluster, task.id, owner):
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
        if not task.label:
            manager.outbox.acknowledge(task, texts.acknowledgement(task, waiting, expected))
    if task.background:
        task_log(log, task).info("异步任务已启动: %s", task.id)


def conversation_host(cluster: Any, conversation_key: str) -> tuple[str | None, bool]:
    """The host that ran the conversation last (it holds its workspace) and whether it is alive; (None, False) for a
    new conversation or when the DB cannot say."""
    try:
        rows = cluster.execute(f"SELECT c.host, coalesce(h.alive_until > {DB_NOW}, false) FROM conversation_hosts c "
                               "LEFT JOIN hosts h ON h.host = c.host WHERE c.conversation_key = %s",
                               (conversation_key,), quick=True)
    except psycopg.Error as exc:
        warn_unless_known(exc, "查询会话所在主机失败 (%s)")
        return None, False
    return (rows[0][0], bool(rows[0][1])) if rows else (None, False)


def hand_off(cluster: Any, task_id: str, host: str) -> bool:
    """Give a queued task (its row written) of this host to `host` and wake it; False if it did not move."""
    try:
        moved = cluster.execute(f"UPDATE tasks SET host = %s, lease_until = {DB_NOW} + %s WHERE id = %s AND "
                                "host = %s AND status = 'queued' RETURNING id",
                                (host, cluster.lease, task_id, cluster.host), quick=True)
        if moved:
            cluster.execute("SELECT pg_notify(%s, %s)", (TASK_CHANNEL, task_id))
    except psycopg.Error as exc:
        warn_unless_known(exc, f"任务 {task_id} 交给主机 {host} 失败 (%s)")
        return False
    return bool(moved)


def _still_new(board: Any, task: Task) -> bool:
    """Whether a task being placed is still live and queued (a /cancel may have ended it meanwhile); board lock held."""
    return board.tasks.get(task.id) is task and task.status == QUEUED and task.id not in board.queue
