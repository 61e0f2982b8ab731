"""Getting words to the user off the caller's thread: acknowledgements, notices and task results.

Notices and results go out on thread pools of their own, never on a CLI worker or the stream's event loop.
One person's notices in one chat go out in the order they were made; a task's result waits for the notices about
it sent before it (acknowledgement, "moved to the background").
Notices get a short retry budget; a result that cannot be delivered is tried again while the bot runs, with
backoff, and given up after `give_up_after` seconds (or at once when DingTalk refuses it for good).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from functools import partial
from typing import Any

from common.logs import TaskLogger, task_log
from config import PUSH_MAX_BYTES
from dingtalk.api_budget import serving
from dingtalk.route import Route
from dingtalk_sender import Delivery
from tasks import texts
from tasks.seams import Sender
from tasks.task import SUCCEEDED, Task

log = logging.getLogger("async_task_manager")

ACK_WAIT = 30.0  # seconds a result waits for the notices about its task to go out first
NOTICE_RETRY_WINDOW = 30.0  # seconds a notice keeps retrying: an acknowledgement is worthless much later
RETRY_BACKOFF_MAX = 1800.0  # longest pause between two deliveries of an undelivered result
NOTICE_THREADS = 32  # notices (acknowledgements first) sent at once
FENCE_RETRY = 2.0  # seconds a result held by the fence (its holder unconfirmed) waits before it is tried again


class Outbox:
    """Sends notices and results through the sender on its own threads; results are recorded as delivered."""

    def __init__(self, sender: Sender, *, clock: Callable[[], float],
                 mark_delivered: Callable[[Task], object], mark_undeliverable: Callable[[Task], object],
                 written: Callable[[], object] = lambda: True,
                 retry_backoff: float = 60.0, give_up_after: float = 86400.0,
                 notice_retry_window: float = NOTICE_RETRY_WINDOW) -> None:
        self.sender = sender
        self.clock = clock
        self._mark_delivered = mark_delivered
        self._mark_undeliverable = mark_undeliverable
        self._written = written  # writes the store's journal now: "delivered" is on disk before the next send
        self.retry_backoff = retry_backoff  # first pause before an undelivered result is tried again
        self.give_up_after = give_up_after  # seconds after the task finished
        self.notice_retry_window = notice_retry_window
        self._lock = threading.Lock()
        self._before_result: dict[str, list[Future]] = {}  # notices about a task still on their way
        self._chats: dict[tuple[str, str], collections.deque] = {}  # (group, user): notices waiting for earlier ones
        self._retries: dict[str, tuple[Task, float, int]] = {}  # undelivered results: (task, due at, attempts)
        self._pending_deliveries: set[Future] = set()
        self.budget: Any = None  # api_budget.ApiBudget: notices are not pushed near the monthly call budget
        self.cards: Any = None  # cards.Cards when AI cards are on: results finalize the task's card
        # Several hosts: cluster/fence.py's DeliveryFence — send only while this host holds the task (None: one host).
        # It answers the seconds this host may go on sending (0: another host holds the task), None to ask later.
        self.fence: Callable[[Task], float | None] | None = None
        self._notices = ThreadPoolExecutor(max_workers=NOTICE_THREADS, thread_name_prefix="notice")
        self._deliveries = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deliver")

    def prestart(self, timeout: float = 5.0) -> None:
        """Start every notice thread now: a burst of messages otherwise starts them one by one on the intake
        thread, each start a hand-off of the GIL while acknowledgements wait."""
        ready = threading.Barrier(NOTICE_THREADS + 1)
        for _ in range(NOTICE_THREADS):
            self._notices.submit(ready.wait, timeout)
        try:
            ready.wait(timeout)
        except threading.BrokenBarrierError:
            log.warning("通知线程未能全部预先启动")

    # -- notices

    def notice(self, route: Route, text: str, *, task_id: str = "", allow_webhook: bool = True,
               markdown: bool = False) -> Future:
        """Send a notice (command answer, refusal, progress note) to a chat, off the calling thread.

        One person's notices in one chat go out one after another, in the order they were made (their two
        acknowledgements in a row arrive in that order); everyone else's at once, so a notice DingTalk is slow to take
        holds up nobody else in a busy group. With a `task_id`, that task's result will not overtake it.
        """
        future: Future = Future()
        chat = (route.conversation_id if route.is_group else "", route.user_id)
        job = (future, partial(self._send_notice, route, text, allow_webhook, task_id, markdown))
        with self._lock:
            queue = self._chats.setdefault(chat, collections.deque())
            queue.append(job)  # after that chat's notices still going out, if any
            first = len(queue) == 1
        if first:
            try:
                self._notices.submit(self._send_in_order, chat)
            except RuntimeError:  # shut down
                with self._lock:
                    self._chats.pop(chat, None)
                raise
        if task_id:
            with self._lock:
                self._before_result.setdefault(task_id, []).append(future)
            future.add_done_callback(lambda done: self._forget_notice(task_id, done))
        return future

    def _send_in_order(self, chat: tuple[str, str]) -> None:
        """Send one person's notices in one chat, those made meanwhile too, on this thread, until none is left."""
        while True:
            with self._lock:
                future, send = self._chats[chat][0]
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(send())
                except BaseException as exc:  # _send_notice logs its own failures; this is the unexpected rest
                    future.set_exception(exc)
            with self._lock:
                queue = self._chats[chat]
                queue.popleft()
                if not queue:
                    del self._chats[chat]
                    return

    def _forget_notice(self, task_id: str, done: Future) -> None:
        with self._lock:
            waiting = self._before_result.get(task_id)
            if waiting is not None and done in waiting:
                waiting.remove(done)
                if not waiting:
                    del self._before_result[task_id]

    def _send_notice(self, route: Route, text: str, allow_webhook: bool, task_id: str,
                     markdown: bool = False) -> Delivery:
        notice_log = TaskLogger(log, task_id or "-", route.user_id)
        alive = allow_webhook and route.session_webhook_alive(self.clock() * 1000)
        if not alive and self.budget is not None and not self.budget.push_allowed(urgent=False):
            notice_log.warning("通知未推送: 本月钉钉接口调用接近预算，只推送任务结果")
            return Delivery(ok=False, error="notice not pushed: monthly API budget")
        try:
            with serving(task_id):  # its metered calls are the task's (usage/)
                delivery = self.sender.send(route, text, allow_webhook=allow_webhook, markdown=markdown,
                                            retry_window=self.notice_retry_window)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            notice_log.exception("通知发送出错")
            return Delivery(ok=False, error=type(exc).__name__)
        if not delivery.ok:
            notice_log.warning("通知发送失败: %s", delivery.error)
        return delivery

    def acknowledge(self, task: Task, text: str, *, allow_webhook: bool = True) -> None:
        """Send a task's acknowledgement; the task's result will not overtake it."""
        self.notice(task.route, text, task_id=task.id, allow_webhook=allow_webhook)

    # -- results

    def deliver_later(self, task: Task) -> Future:
        """Deliver a finished task's result on a delivery thread."""
        future = self._deliveries.submit(self.deliver_result, task)
        with self._lock:
            self._pending_deliveries.add(future)
        future.add_done_callback(self._delivery_done)
        return future

    def _delivery_done(self, future: Future) -> None:
        with self._lock:
            self._pending_deliveries.discard(future)

    def deliver_result(self, task: Task) -> bool:
        """Send a finished task's result (webhook for short tasks, push for background ones); record it."""
        with self._lock:
            earlier = list(self._before_result.get(task.id, ()))
        futures_wait(earlier, timeout=ACK_WAIT)  # the acknowledgement and notices go first (failures were logged)
        lease = self._fenced(task)
        if lease is None:
            return False
        text = texts.result(task, self.clock())
        if task.label and self.budget is not None and not self.budget.cards_allowed(task.user_id):
            text = texts.within_one_push(text, PUSH_MAX_BYTES - 1024)  # a fire near the budget: one call
        with serving(task.id):
            if self.cards is not None and self.cards.finish(task):
                return self._delivered(task, "card")
        # Several hosts: each send retries only within the lease it started under (the fence's answer), and goes
        # on after the fence is asked again, for as long as one send would have retried on one host.
        give_up = self.clock() + getattr(self.sender, "retry_window", 0.0)
        while True:
            delivery = self._send_result(task, text, None if self.fence is None else lease)
            if delivery.ok:
                return self._delivered(task, delivery.path)
            if self.fence is None or not delivery.out_of_time or self.clock() >= give_up:
                break
            task_log(log, task).info("任务 %s 的结果在租约内未能送达，确认本主机仍持有该任务后继续重试", task.id)
            lease = self._fenced(task)
            if lease is None:
                return False
            lease = max(0.0, min(lease, give_up - self.clock()))
        self._after_failure(task, delivery)
        return False

    def _fenced(self, task: Task) -> float | None:
        """The seconds this host may go on sending the task's result (inf on one host); None when it may not now:
        another host holds the task (not sent here, ever), or the fence cannot tell yet (tried again soon)."""
        lease = self.fence(task) if self.fence is not None else float("inf")
        if lease:
            return lease
        with self._lock:
            attempts = self._retries.pop(task.id, (task, 0.0, 0))[2]
            if lease is None:
                self._retries[task.id] = (task, self.clock() + FENCE_RETRY, attempts)
        return None

    def _send_result(self, task: Task, text: str, retry_window: float | None) -> Delivery:
        """One send of the result: the session webhook while it lives (free), for background results too; else a
        push, retried within `retry_window` (None: the sender's own)."""
        try:
            with serving(task.id):  # its metered calls are the task's (usage/)
                return self.sender.send(task.route, text, markdown=task.status == SUCCEEDED, title="CodeBuddy 回复",
                                        retry_window=retry_window)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            task_log(log, task).exception("任务 %s 结果发送出错", task.id)
            return Delivery(ok=False, error=type(exc).__name__)

    def _delivered(self, task: Task, path: str) -> bool:
        """Record a result as delivered (by webhook, a push or its AI card)."""
        tlog = task_log(log, task)
        with self._lock:
            self._retries.pop(task.id, None)
        self._mark_delivered(task)
        self._written()  # a crash right after a delivery must not find the result undelivered and send it again
        if path == "webhook":
            tlog.info("任务结果已回复: %s", task.id)
        else:
            tlog.info("任务结果已推送: %s (%s)", task.id, path)
        return True

    def _after_failure(self, task: Task, delivery: Delivery) -> None:
        """Schedule the next delivery of a result, or give it up (permanent refusal, or too old)."""
        tlog = task_log(log, task)
        now = self.clock()
        give_up_at = (task.finished_at or now) + self.give_up_after
        if delivery.permanent or now >= give_up_at:
            reason = "钉钉拒绝且无法重试" if delivery.permanent else f"{self.give_up_after / 3600:g} 小时内未能送达"
            tlog.error("任务 %s 结果发送失败 (不再重试，已放弃: %s): %s", task.id, reason, delivery.error)
            with self._lock:
                self._retries.pop(task.id, None)
            self._mark_undeliverable(task)
            return
        with self._lock:
            _, _, attempts = self._retries.get(task.id, (task, 0.0, 0))
            due = min(give_up_at, now + min(RETRY_BACKOFF_MAX, self.retry_backoff * 2 ** attempts))
            self._retries[task.id] = (task, due, attempts + 1)
        tlog.error("任务 %s 结果发送失败 (%.0f 秒后重试): %s", task.id, due - now, delivery.error)

    def retry_due(self, now: float) -> int:
        """Send again the undelivered results whose pause is over; how many were sent."""
        with self._lock:
            due = [task for task, at, _ in self._retries.values() if at <= now]
            for task in due:
                attempts = self._retries[task.id][2]
                self._retries[task.id] = (task, float("inf"), attempts)  # not again until this attempt ends
        for task in due:
            task_log(log, task).info("重新发送任务结果: %s", task.id)
            self.deliver_later(task)
        return len(due)

    @property
    def waiting_retries(self) -> int:
        """Results waiting for their next delivery attempt."""
        with self._lock:
            return len(self._retries)

    # -- shutdown

    def wait_for_deliveries(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for results already on their way."""
        with self._lock:
            pending = list(self._pending_deliveries)
        futures_wait(pending, timeout=timeout)

    def shutdown(self) -> None:
        """Drop what has not started; nothing new is sent."""
        self._notices.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # what no thread will send now: cancelled, so nothing waits for it
            waiting = [future for queue in self._chats.values() for future, _ in queue]
        for future in waiting:
            future.cancel()
        self._deliveries.shutdown(wait=False, cancel_futures=True)
