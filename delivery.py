"""Getting words to the user off the caller's thread: acknowledgements, notices and task results.

Notices and results go out on thread pools of their own, never on a CLI worker or the stream's event loop;
a task's result waits for its acknowledgement, and every failure is logged once, with the task id.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import task_texts
from dingtalk_sender import Delivery, Route
from logs import TaskLogger, task_log
from seams import Sender
from task import SUCCEEDED, Task

log = logging.getLogger("async_task_manager")

ACK_WAIT = 30.0  # seconds a result waits for its task's acknowledgement to go out first


class Outbox:
    """Sends notices and results through the sender on its own threads; results are recorded as delivered."""

    def __init__(self, sender: Sender, *, clock: Callable[[], float],
                 mark_delivered: Callable[[Task], object]) -> None:
        self.sender = sender
        self.clock = clock
        self._mark_delivered = mark_delivered
        self._lock = threading.Lock()
        self._acks: dict[str, Future] = {}  # acknowledgements still on their way, by task id
        self._pending_deliveries: set[Future] = set()
        self._notices = ThreadPoolExecutor(max_workers=32, thread_name_prefix="notice")
        self._deliveries = ThreadPoolExecutor(max_workers=8, thread_name_prefix="deliver")

    # -- notices

    def notice(self, route: Route, text: str, *, task_id: str = "", allow_webhook: bool = True) -> Future:
        """Send a notice (command answer, refusal, progress note) to a chat, off the calling thread."""
        return self._notices.submit(self._send_notice, route, text, allow_webhook, task_id)

    def _send_notice(self, route: Route, text: str, allow_webhook: bool, task_id: str) -> Delivery:
        notice_log = TaskLogger(log, task_id or "-", route.user_id)
        try:
            delivery = self.sender.send(route, text, allow_webhook=allow_webhook)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            notice_log.exception("通知发送出错")
            return Delivery(ok=False, error=type(exc).__name__)
        if not delivery.ok:
            notice_log.warning("通知发送失败: %s", delivery.error)
        return delivery

    def acknowledge(self, task: Task, text: str, *, allow_webhook: bool = True) -> None:
        """Send a task's acknowledgement; the task's result will not overtake it."""
        ack = self.notice(task.route, text, task_id=task.id, allow_webhook=allow_webhook)
        with self._lock:
            self._acks[task.id] = ack
        ack.add_done_callback(lambda _: self._forget_ack(task.id, ack))

    def _forget_ack(self, task_id: str, ack: Future) -> None:
        with self._lock:
            if self._acks.get(task_id) is ack:
                del self._acks[task_id]

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
            ack = self._acks.get(task.id)
        if ack is not None:
            try:
                ack.result(timeout=ACK_WAIT)  # the acknowledgement goes first
            except Exception:
                pass  # a failed acknowledgement was logged by _send_notice; the result still goes out
        tlog = task_log(log, task)
        try:
            delivery = self.sender.send(task.route, task_texts.result(task, self.clock()),
                                        markdown=task.status == SUCCEEDED, title="CodeBuddy 回复",
                                        allow_webhook=not task.background)
        except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
            tlog.exception("任务 %s 结果发送出错", task.id)
            delivery = Delivery(ok=False, error=type(exc).__name__)
        if delivery.ok:
            self._mark_delivered(task)
            if delivery.path == "webhook":
                tlog.info("任务结果已回复: %s", task.id)
            else:
                tlog.info("任务结果已推送: %s (%s)", task.id, delivery.path)
            return True
        tlog.error("任务 %s 结果发送失败 (%s): %s", task.id, "不再重试" if delivery.permanent else "下次启动时重试",
                   delivery.error)
        return False

    # -- shutdown

    def wait_for_deliveries(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for results already on their way."""
        with self._lock:
            pending = list(self._pending_deliveries)
        futures_wait(pending, timeout=timeout)

    def shutdown(self) -> None:
        """Drop what has not started; nothing new is sent."""
        self._notices.shutdown(wait=False, cancel_futures=True)
        self._deliveries.shutdown(wait=False, cancel_futures=True)
