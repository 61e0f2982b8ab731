"""Notices (tasks/delivery.py): one person's go out in order while nobody else is held up."""

from __future__ import annotations

import threading
import time

from dingtalk.route import Route
from dingtalk_sender import Delivery
from tasks.delivery import Outbox


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
