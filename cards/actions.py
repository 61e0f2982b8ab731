"""Button clicks on AI cards (Stream topic /v1.0/card/instances/callback): stop the card's task, or approve or deny
the tool request it waits on.

A click is untrusted input: only the card's id (`outTrackId`), the clicking user's staff id and the button's actionId
are read; the task and its waiting request are found from the bot's own live cards, and only the task's owner or an
admin may stop it or answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any

log = logging.getLogger("cards")

STOP_ACTION = "stop"  # the actionId the card template's stop button sends (docs/cards-and-budget.md)
APPROVE_ACTION, DENY_ACTION = "approve", "deny"  # its approve and deny buttons (shown while a tool request waits)


def action_ids(data: Any) -> tuple[str, list[str]]:
    """(the clicking user's staff id, the clicked buttons' actionIds) of a card callback's data ("" / [] if absent)."""
    if not isinstance(data, dict):
        return "", []
    user = data.get("userId") if isinstance(data.get("userId"), str) else ""
    try:
        content = json.loads(data.get("content") or "{}")
    except (TypeError, ValueError):
        return user, []
    private = content.get("cardPrivateData") if isinstance(content, dict) else None
    ids = private.get("actionIds") if isinstance(private, dict) else None
    return user, [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


def handle_card_callback(data: Any, cards: Any, manager: Any, admins: Iterable[str]) -> str:
    """Act on one card callback; what was done, for the log and tests: "stopped", "approved", "denied",
    "relayed" (to the host whose task waits), "refused" or "ignored"."""
    user, actions = action_ids(data)
    track = data.get("outTrackId") if isinstance(data, dict) else None
    if not isinstance(track, str) or not user or not ({STOP_ACTION, APPROVE_ACTION, DENY_ACTION} & set(actions)):
        log.info("忽略卡片回调 (不是卡片按钮或缺少字段) user=%s", user or "-")
        return "ignored"
    if STOP_ACTION not in actions:
        return _answer_click(track, user, APPROVE_ACTION in actions, cards, manager, admins)
    cluster = getattr(manager, "cluster", None)  # issue 16: the click may reach a host that does not run the task
    task_id = cards.task_of(track) or (task_of_track(track) if cluster is not None else None)
    task = manager.get_task(task_id) if task_id else None
    if task is None or task.finished:
        log.info("卡片停止按钮: 任务已结束或不存在 user=%s", user)
        return "ignored"
    if user != task.user_id and user not in set(admins):
        log.warning("卡片停止按钮被拒绝: 用户 %s 不是任务 %s 的发起人或管理员 user=%s", user, task.id, task.user_id)
        return "refused"
    log.info("卡片停止按钮: 用户 %s 取消任务 %s user=%s", user, task.id, task.user_id)
    if cluster is not None and task.id not in manager.board.tasks:
        return "stopped" if cluster.request_cancel(task.id) else "ignored"  # the host running it stops it
    manager.cancel(task.id)
    return "stopped"


def task_of_track(track: str) -> str | None:
    """The task id in a card id `cb-<task id>-<run>` (cards.out_track_id), None for another shape."""
    task_id, _, run = track[3:].rpartition("-") if track.startswith("cb-") else ("", "", "")
    return task_id if task_id and run.isdigit() else None


def _answer_click(track: str, user: str, approve: bool, cards: Any, manager: Any, admins: Iterable[str]) -> str:
    """An approve or deny button: it answers the tool request whose buttons the card shows, nothing older."""
    task_id, question = cards.shown_approval(track)
    remote = manager.workers.approvals.remote  # issue 16: the card may be another host's
    elsewhere = task_of_track(track) if task_id is None and remote is not None else None
    if elsewhere:
        outcome = remote.click(track, elsewhere, user, approve)  # the card's host decides who may, as for its own
        log.info("卡片确认按钮: 任务 %s %s user=%s", elsewhere, outcome, user)
        return outcome
    if task_id is None or not question:
        log.info("卡片确认按钮: 没有等待确认的请求 user=%s", user)
        return "ignored"
    outcome = manager.workers.approvals.click(question, user, user in set(admins), approve)
    log.info("卡片确认按钮: 任务 %s %s user=%s", task_id, outcome, user)
    return outcome


class _Ack:
    """The ACK frame of one callback (the SDK's AckMessage shape, docs/wire-facts.md §1)."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id

    def to_dict(self) -> dict:
        return {"code": 200, "headers": {"messageId": self.message_id, "contentType": "application/json"},
                "message": "OK", "data": json.dumps({"response": {}})}


class CardCallbackHandler:
    """The Stream client's handler for card callbacks: ACK at once, act on a worker thread (never on the loop)."""

    def __init__(self, act: Callable[[Any], object], executor: Executor) -> None:
        self.dingtalk_client = None  # set by DingTalkStreamClient.register_callback_handler
        self._act = act
        self._executor = executor

    def pre_start(self) -> None:
        return None

    async def raw_process(self, message: Any) -> _Ack:
        data = message.data
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError:
                data = None
        self._executor.submit(self._safely, data)
        return _Ack(str(getattr(message.headers, "message_id", "") or ""))

    def _safely(self, data: Any) -> None:
        try:
            self._act(data)
        except Exception:
            log.exception("处理卡片回调失败")
