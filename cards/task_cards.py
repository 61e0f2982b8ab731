"""AI cards for tasks: one card per run, streamed while CodeBuddy writes, ended with the answer or the reason.

`Cards.open(task)` starts a card (created off the worker's thread) when cards are on, not paused and the call budget
allows (the month's, and the task's user's day); `text`/`step`/`progress` change what it shows; one updater thread
sends the latest state of each card, one call in flight per card, at most one every `interval` (stretched by the
budget), and none once the user's day has only the calls that end the card left. `finish(task)` ends it
with the full text (isFinalize first, then the status); False means "no card delivered this answer": the caller
sends the usual markdown message — once, since the card is forgotten either way. Repeated failures pause cards for
`backoff` seconds. After a restart, `end_orphan` closes the card an interrupted run left streaming.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cards.api import FAILED, FINISHED, NOT_SPENT, CardApi
from common.logs import task_log
from tasks import texts
from tasks.task import SUCCEEDED, Task

log = logging.getLogger("cards")

MAX_FAILURES = 3  # consecutive card failures that pause cards for `backoff` seconds
FINISH_WAIT = 20.0  # seconds finish() waits for the card's create or update in flight
STEPS_SHOWN = 4  # the agent's latest steps shown above the answer
INTERRUPTED = "上一次回复处理中断"
TICK = 0.1
END_CALLS = 2  # calls that end a card (the final text, then the status): kept from the user's day for the end


def out_track_id(task: Task) -> str:
    """The card of a task's run: derived from the task id and the run's number, so a restart can find it."""
    return f"cb-{task.id}-{task.attempts}"


@dataclass
class LiveCard:
    """What one task's card shows and how far it has been sent."""

    task: Task
    track: str
    started: float
    state: str = "creating"  # creating → live → (failed | ended)
    text: str = ""
    steps: list[str] = field(default_factory=list)
    note: str = ""
    question: str = ""  # the question a tool request waits on (tasks/approvals.py), shown above the elapsed time
    approval: str = ""  # the id of that tool request: the card's approve/deny buttons show while it is set
    approval_sent: str = ""  # what the card's approval variable says at DingTalk
    version: int = 0  # bumped on every change
    sent_version: int = 0
    in_flight: bool = False
    last_sent: float = float("-inf")
    errors: int = 0
    quiet: bool = False  # no more updates: the user's day keeps its last calls for the end


class Cards:
    """The live cards of running tasks, their updater thread, and the pause after repeated failures."""

    def __init__(self, api: CardApi, budget: Any, *, interval: float, backoff: float,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.api = api
        self.budget = budget  # api_budget.ApiBudget (cards_allowed, card_interval, room)
        self.interval = interval
        self.backoff = backoff
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Condition()
        self._cards: dict[str, LiveCard] = {}  # by task id
        self._failures = 0
        self._paused_until = float("-inf")
        self._stop = threading.Event()
        self._calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="card")
        self.stats = {"opened": 0, "finished": 0, "fallbacks": 0, "updates": 0}
        self._thread = threading.Thread(target=self._update_loop, name="card-updater", daemon=True)
        self._thread.start()

    # -- starting and feeding a card

    def open(self, task: Task) -> LiveCard | None:
        """Start the task's card (created on a card thread); None when cards are paused or over budget."""
        now = self._clock()
        with self._lock:
            if now < self._paused_until:
                return None
        if not self.budget.cards_allowed(task.user_id):
            task_log(log, task).info("本月钉钉接口调用或用户今日的调用接近预算，任务 %s 不使用卡片", task.id)
            return None
        card = LiveCard(task=task, track=out_track_id(task), started=now)
        with self._lock:
            self._cards[task.id] = card
            self.stats["opened"] += 1
            card.in_flight = True
        self._calls.submit(self._create, card)
        return card

    def _create(self, card: LiveCard) -> None:
        error = self.api.create_and_deliver(card.track, card.task.route, "CodeBuddy")
        with self._lock:
            card.in_flight = False
            card.last_sent = self._clock()
            card.state = "failed" if error else "live"
            self._lock.notify_all()
        if error:
            task_log(log, card.task).warning("任务 %s 卡片创建失败，改用消息回复: %s", card.task.id, error)
            self._failed(error)

    def _changed(self, task_id: str, change: Callable[[LiveCard], None]) -> bool:
        with self._lock:
            card = self._cards.get(task_id)
            if card is None or card.state not in ("creating", "live"):
                return False
            change(card)
            card.version += 1
            return True

    def text(self, task_id: str, text: str) -> None:
        """The answer as written so far (the whole text, not a delta)."""
        self._changed(task_id, lambda card: setattr(card, "text", text))

    def step(self, task_id: str, step: str) -> None:
        """A step the agent took: tool calls ("工具 Bash") show above the text; the rest is the text itself."""
        if step.startswith("工具"):
            self._changed(task_id, lambda card: card.steps.append(step))

    def progress(self, task: Task, note: str) -> bool:
        """Show a progress note on the task's card; False when it has no live card (send a message instead)."""
        return self._changed(task.id, lambda card: setattr(card, "note", note))

    def ask(self, task_id: str, question_id: str, question: str) -> bool:
        """Show what the task waits on, and (for a tool request, `question_id` set) the approve/deny buttons."""
        def show(card: LiveCard) -> None:
            card.question, card.approval = question, question_id
        return self._changed(task_id, show)

    def settled(self, task_id: str, outcome: str) -> None:
        """The question was answered (or timed out): hide it and its buttons, keep `outcome` among the steps."""
        def hide(card: LiveCard) -> None:
            card.question, card.approval = "", ""
            card.steps.append(outcome)
        self._changed(task_id, hide)

    def shown_approval(self, track: str) -> tuple[str | None, str]:
        """(the task of card `track`, the tool request whose buttons DingTalk shows on it, "" for none)."""
        with self._lock:
            card = self._by_track(track)
            return (card.task.id, card.approval_sent) if card is not None else (None, "")

    def _by_track(self, track: str) -> LiveCard | None:
        return next((card for card in self._cards.values() if card.track == track), None)

    def render(self, card: LiveCard, now: float) -> str:
        """What a streaming card shows: the latest steps, the answer so far, a waiting question, the elapsed time."""
        parts = [f"🔧 {step}" for step in card.steps[-STEPS_SHOWN:]]
        if card.text:
            parts.append(card.text)
        if card.question:
            parts.append(card.question)
        parts.append(f"⏱ 已用时 {now - card.started:.0f} 秒" + (f" · {card.note}" if card.note else ""))
        return "\n\n".join(parts)

    # -- the updater

    def _update_loop(self) -> None:
        while not self._stop.wait(TICK):
            try:
                interval = self.budget.card_interval(self.interval)
                now = self._clock()
                with self._lock:
                    # Buttons come and go at once (someone waits on them); text waits for the interval.
                    due = [card for card in self._cards.values()
                           if card.state == "live" and not card.in_flight and not card.quiet and (
                               card.approval != card.approval_sent or (
                               card.version != card.sent_version and now - card.last_sent >= interval))]
                    for card in due:
                        card.in_flight = True
                for card in due:
                    self._calls.submit(self._send_update, card)
            except Exception:
                log.exception("卡片更新线程出错")

    def _send_update(self, card: LiveCard) -> None:
        user = card.task.user_id
        room = self.budget.room(user)
        if room is not None and room <= END_CALLS:  # the answer still arrives whole when the card ends
            with self._lock:
                card.in_flight, card.quiet = False, True
                self._lock.notify_all()
            task_log(log, card.task).info("任务 %s 卡片暂停更新: 用户今日钉钉接口调用只剩 %d 次，留给结束卡片",
                                          card.task.id, room)
            return
        with self._lock:
            version, content, approval = card.version, self.render(card, self._clock()), card.approval
            buttons, text = approval != card.approval_sent, version != card.sent_version
        error = self.api.update(card.track, {self.api.variables.approval: approval}, user_id=user) if buttons else ""
        if buttons and not error:
            with self._lock:
                card.approval_sent = approval  # shown, even if the text update after it fails
        if not error and text:
            error = self.api.stream(card.track, content, user_id=user)
        with self._lock:
            card.in_flight = False
            card.last_sent = self._clock()
            if error:
                card.errors += 1
                if card.errors >= 2:  # this card is broken: its answer goes as a message
                    card.state = "failed"
            else:
                card.sent_version = max(card.sent_version, version) if text else card.sent_version
                self.stats["updates"] += 1
            self._lock.notify_all()
        if error:
            task_log(log, card.task).warning("任务 %s 卡片更新失败: %s", card.task.id, error)

    # -- ending

    def _take(self, task_id: str) -> LiveCard | None:
        """Forget the task's card once nothing is in flight for it (bounded wait); None if it had none."""
        deadline = self._clock() + FINISH_WAIT
        with self._lock:
            card = self._cards.get(task_id)
            while card is not None and card.in_flight and self._clock() < deadline:
                self._lock.wait(0.1)
            return self._cards.pop(task_id, None)

    def finish(self, task: Task) -> bool:
        """End the task's card with its answer (or why it failed); True when the card delivered it."""
        card = self._take(task.id)
        if card is None:
            return False
        tlog = task_log(log, task)
        if card.state != "live":
            self.stats["fallbacks"] += 1
            return False
        if task.status == SUCCEEDED:
            content, status = task.result.strip() or "(CodeBuddy 没有返回内容)", FINISHED
        else:
            content, status = texts.result(task, self._wall_clock()), FAILED
        error = self.api.end(card.track, content, status, hide_buttons=bool(card.approval_sent), user_id=task.user_id)
        if error:
            tlog.warning("任务 %s 卡片结束失败，改用消息回复: %s", task.id, error)
            self.stats["fallbacks"] += 1
            self._failed(error)
            return False
        with self._lock:
            self._failures = 0
            self.stats["finished"] += 1
        tlog.info("任务 %s 卡片已完成 (%s)", task.id, "完成" if status == FINISHED else "失败")
        return True

    def end(self, task: Task, reason: str) -> None:
        """End the task's card in the failed state with `reason` (a cancel): no answer follows."""
        card = self._take(task.id)
        if card is not None and card.state == "live":
            error = self.api.end(card.track, reason, FAILED, hide_buttons=bool(card.approval_sent),
                                 user_id=task.user_id)
            if error:
                task_log(log, task).warning("任务 %s 卡片结束失败: %s", task.id, error)

    def end_orphan(self, task: Task) -> None:
        """After a restart: end the card the task's interrupted run left streaming (if it had one)."""
        if task.attempts < 1 or task.started_at is None:
            return
        error = self.api.end(out_track_id(task), INTERRUPTED, FAILED, user_id=task.user_id)
        tlog = task_log(log, task)
        if error:
            tlog.info("任务 %s 没有可结束的中断卡片 (%s)", task.id, error)
        else:
            tlog.info("任务 %s 上次运行的卡片已结束: %s", task.id, INTERRUPTED)

    def task_of(self, track: str) -> str | None:
        """The id of the running task whose card is `track` (a button click names the card)."""
        with self._lock:
            card = self._by_track(track)
            return card.task.id if card is not None else None

    def _failed(self, error: str) -> None:
        """Count a card failure towards the pause; a call the budget refused is not the cards' failure."""
        if error.startswith(NOT_SPENT):
            return
        with self._lock:
            self._failures += 1
            pause = self._failures >= MAX_FAILURES and self.backoff > 0
            if pause:
                self._paused_until = self._clock() + self.backoff
                self._failures = 0
        if pause:
            log.error("AI 卡片连续 %d 次失败，%.0f 秒内改用消息回复", MAX_FAILURES, self.backoff)

    def stop(self) -> None:
        """Stop the updater; cards still streaming are ended after the restart (`end_orphan`)."""
        self._stop.set()
        self._calls.shutdown(wait=False, cancel_futures=True)
