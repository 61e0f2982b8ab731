"""Notices and results (tasks/delivery.py): one person's notices go out in order while nobody else is held up; with
several hosts a result's retries stay within the lease they started under."""

from __future__ import annotations

import threading
import time

from dingtalk.route import Route
from dingtalk_sender import Delivery
from tasks.delivery import Outbox
from tasks.task import SUCCEEDED, Task


def test_one_persons_notices_in_a_chat_go_out_in_order_while_nobody_else_is_held_up():
    sent: list[tuple[str, str]] = []
    lock = threading.Lock()
    slow_chat_started = threading.Event()

    class Sender:
        def send(self, route, text, **_):
            if route.user_id == "slow":
                slow_chat_started.set()
                time.sleep(0.02 * (3 - int(text) % 3))  # later notices would finish first if sent at once
            with lock:
                sent.append((route.user_id, text))
            return Delivery(ok=True, path="webhook")

    outbox = Outbox(Sender(), clock=time.time, mark_delivered=lambda t: None, mark_undeliverable=lambda t: None)
    outbox.prestart()
    slow, other = Route("2", "slow", "cidGroup"), Route("2", "other", "cidGroup")  # two people in one group
    futures = [outbox.notice(slow, str(n)) for n in range(12)]
    assert slow_chat_started.wait(5)
    assert outbox.notice(other, "x").result(timeout=5).ok
    with lock:  # the other person's notice did not wait for the slow one's twelve
        assert ("other", "x") in sent and len([s for s in sent if s[0] == "slow"]) < 12
    assert all(f.result(timeout=10).ok for f in futures)
    assert [text for user, text in sent if user == "slow"] == [str(n) for n in range(12)]
    outbox.shutdown()


def _finished_task() -> Task:
    return Task(id="a" * 16, user_id="u1", user_name="U", conversation_key="c", route=Route("1", "u1", "c"),
                prompt="p", created_at=time.time(), status=SUCCEEDED, result="答案", finished_at=time.time(),
                background=True)


def test_a_results_retries_stay_within_the_lease_they_started_under_and_the_fence_is_asked_again_after():
    calls: list[tuple] = []
    grants = iter([20.0, 15.0, 0])  # the fence's answers: 20 s of lease left, then 15 s, then another host holds it

    def fence(task):
        calls.append(("fence", task.id))
        return next(grants)

    class Sender:
        retry_window = 600.0  # DELIVERY_RETRY_WINDOW: what one send would retry for without a lease

        def send(self, route, text, *, retry_window=None, **_):
            calls.append(("send", retry_window))  # DingTalk failing all along: each send spends its window
            return Delivery(ok=False, path="batchSend", error="gave up after 4 attempts: HTTP 503", out_of_time=True)

    outbox = Outbox(Sender(), clock=time.time, mark_delivered=lambda t: None, mark_undeliverable=lambda t: None)
    outbox.fence = fence
    assert outbox.deliver_result(_finished_task()) is False
    # Each send retries only for the lease it started under; before going on the fence is asked again, and once
    # another host holds the task nothing more is sent here, now or later.
    assert calls == [("fence", "a" * 16), ("send", 20.0), ("fence", "a" * 16), ("send", 15.0), ("fence", "a" * 16)]
    assert outbox.waiting_retries == 0
    outbox.shutdown()


def test_without_a_fence_a_result_is_sent_with_the_senders_own_retry_window_once():
    windows: list = []

    class Sender:
        retry_window = 600.0

        def send(self, route, text, *, retry_window=None, **_):
            windows.append(retry_window)
            return Delivery(ok=False, path="batchSend", error="gave up after 9 attempts", out_of_time=True)

    outbox = Outbox(Sender(), clock=time.time, mark_delivered=lambda t: None, mark_undeliverable=lambda t: None)
    assert outbox.deliver_result(_finished_task()) is False
    assert windows == [None] and outbox.waiting_retries == 1  # one host: as before, the outbox's backoff retries it
    outbox.shutdown()
