"""What the other hosts send this one, acted on here: a task handed to it (queued here) and a cancel of a task it holds
(stopped, and confirmed where the command was given), whether a notification brought it or the periodic look at this
host's own rows (`Inbox.reconcile`) found it after its notification was lost.

A `NOTIFY` is lost when the listener's connection drops at the wrong moment (it listens again, but what was sent
meanwhile is gone), so the rows are the truth and the notifications only make it quick: every `reconcile_seconds`
each host reads its rows that are queued, or whose cancel was asked for, and acts on those it has not. Both paths may
bring the same thing twice; each is done once: a task already on the board is not adopted again, and a task whose
cancel this host has taken is not cancelled (nor confirmed) again.

A cancel's notification carries the route of the command message (`/cancel` on another host): its session webhook
is a URL any host may post to, free, where a push is a metered OpenAPI call, so the holder confirms there. A cancel
found on the rows (its notification lost), or asked by a card's stop button, is confirmed in the task's own chat.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

import psycopg

from dingtalk.route import Route
from tasks import texts
from tasks.task import CANCELLED

log = logging.getLogger("cluster")

RECONCILE_SECONDS = 5.0  # a lost NOTIFY (a hand-off, a cancel) delays what it said this long at most


class Inbox:
    """This host's side of hand-offs and cross-host cancels (`cluster`: the Cluster, `manager`: the task manager)."""

    def __init__(self, cluster: Any, manager: Any, *, reconcile_seconds: float = RECONCILE_SECONDS) -> None:
        self.cluster = cluster
        self.manager = manager
        self._look_queued = threading.Event()  # one look at the rows waits on the offload thread at most
        self.reconciled = 0  # looks done
        cluster.every(reconcile_seconds, self._reconcile_later, "cluster-reconcile")

    # -- the rows, for what a lost notification did not bring

    def reconcile(self) -> None:
        """Look at this host's own rows for a queued task handed to it, or a task some host was asked to cancel,
        and act on those this host has not; psycopg.Error if the DB fails."""
        if self.cluster.claim_pending:  # its own rows are not recovered yet: the claim does that
            return
        rows = self.cluster.execute("SELECT id, status, cancel_requested FROM tasks WHERE host = %s AND status IN "
                                    "('queued', 'running') AND (status = 'queued' OR cancel_requested = 1)",
                                    (self.cluster.host,), quick=True)
        for task_id, status, cancel_requested in rows:
            if status == "queued":
                self.handed(task_id)
            if cancel_requested:
                self.cancel(task_id)
        self.reconciled += 1

    def _reconcile_later(self) -> None:
        """Every `reconcile_seconds`: a look on the offload thread, after the placements handed over before it (a
        task this host is handing off is never seen half-way), one waiting at a time."""
        if self._look_queued.is_set():
            return
        self._look_queued.set()

        def look() -> None:
            self._look_queued.clear()
            try:
                self.reconcile()
            except psycopg.Error:
                pass  # the DB is down: the lease thread says so, once per outage

        self.cluster.later(look)

    # -- what a notification or a look at the rows brought

    def handed(self, task_id: str) -> None:
        """A task another host handed to this one (its conversation lives here): queue it here, once."""
        board, cluster = self.manager.board, self.cluster
        if task_id in board.tasks or cluster.host_of(task_id, quick=False) != cluster.host:
            return
        task = self.manager.store.get(task_id)
        if task is None or task.finished:
            return
        with cluster.takeover_lock, board.lock:  # the lease thread may be taking it over: it then queues it
            if task_id in cluster.taking or task_id in board.tasks:
                return
            board.adopt(task)
            if task.cancel_requested:  # cancelled before it got here (a lost notification, found on the row)
                self._cancelled_before_it_ran(task)
                return
            board.enqueue(task)
        log.info("接收任务 %s: 会话 %s 在本主机", task_id, task.conversation_key)

    def _cancelled_before_it_ran(self, task: Any) -> None:
        """A task handed here whose cancel was asked for meanwhile: ended cancelled, its user told (board lock held)."""
        board = self.manager.board
        board.fail(task.id, "已被用户取消", status=CANCELLED)
        board.mark_delivered(task)
        self.manager.outbox.notice(task.route, texts.cancelled(task), task_id=task.id)

    def cancel(self, task_id: str, reply_to: Route | None = None) -> None:
        """A cancel asked of every host: the one holding the task stops it, once, and confirms once it has ended, to
        `reply_to` (the chat the command came from, its session webhook while alive) or the task's own chat."""
        board = self.manager.board
        with board.lock:  # taken once: a notification and a look at the rows may both bring it
            task = board.tasks.get(task_id)
            if task is None or task.finished or task.cancel_requested:
                return
            board.transition(task, cancel_requested=True)

        def confirm(ended: Any, stopped: bool) -> None:
            self.manager.outbox.notice(reply_to or ended.route, texts.cancel_outcome(ended, stopped), task_id=ended.id)

        self.manager.cancel(task_id, on_ended=confirm)


def cancel_payload(task_id: str, reply_to: Route | None) -> str:
    """The `bot_cancel` notification: the task id, and the command message's route to confirm to (JSON)."""
    if reply_to is None:
        return task_id
    return json.dumps({"task": task_id, "reply": reply_to.__dict__}, ensure_ascii=False)


def cancel_told(payload: str) -> tuple[str, Route | None]:
    """(task id, route to confirm to) of a `bot_cancel` notification; a bare task id (an older host's) has no route."""
    if not payload.startswith("{"):
        return payload, None
    told = json.loads(payload)
    reply = told.get("reply")
    try:
        route = Route(str(reply["conversation_type"]), str(reply["user_id"]), str(reply["conversation_id"]),
                      str(reply.get("session_webhook") or ""), int(reply.get("webhook_expires_ms") or 0))
    except (KeyError, TypeError, ValueError):
        log.warning("集群取消通知的回复路径无法解析，确认发到任务所在会话")
        route = None
    return str(told["task"]), route
