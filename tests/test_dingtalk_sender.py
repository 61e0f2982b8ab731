"""The sender (dingtalk_sender.py): the access token fetched once for many threads and refreshed before expiry; a push
that gave up because its retry window ended says so."""

from __future__ import annotations

import threading
import time

from dingtalk.route import Route
from dingtalk_sender import AccessTokenProvider, DingTalkSender, HttpReply


class _CountingHttp:
    """A JsonHttp stand-in that answers every token request with a new token."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def post_json(self, url, body, headers=None):
        with self.lock:
            self.calls += 1
            number = self.calls
        time.sleep(0.05)
        return HttpReply(200, {"accessToken": f"tok{number}", "expireIn": 7200}, {}, "")


def test_token_is_fetched_once_for_many_threads_and_refreshed_before_expiry():
    now = [0.0]
    session = _CountingHttp()
    provider = AccessTokenProvider(session, "http://x", "k", "s", clock=lambda: now[0], refresh_margin=300)
    results = []
    threads = [threading.Thread(target=lambda: results.append(provider.get())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.calls == 1 and set(results) == {"tok1"}
    now[0] = 7200 - 301
    assert provider.get() == "tok1"
    now[0] = 7200 - 299
    assert provider.get() == "tok2"
    provider.invalidate("tok2")
    assert provider.get() == "tok3"


class _FailingPushes:
    """A JsonHttp stand-in: tokens are given, every push answers `status`."""

    def __init__(self, status: int):
        self.status = status
        self.pushes = 0

    def post_json(self, url, body, headers=None, method="POST"):
        if url.endswith("/accessToken"):
            return HttpReply(200, {"accessToken": "tok", "expireIn": 7200}, {}, "")
        self.pushes += 1
        return HttpReply(self.status, {"code": "Busy" if self.status >= 500 else "invalidParameter"}, {}, "")


def test_a_push_that_gave_up_because_its_retry_window_ended_says_so_and_a_refused_one_does_not():
    busy = _FailingPushes(503)
    sender = DingTalkSender("http://x", "k", "s", "k", http=busy, retry_window=600)
    delivery = sender.push(Route("1", "u1", "c"), "答案", retry_window=0.1)  # the caller's window: one attempt fits
    assert not delivery.ok and delivery.out_of_time and not delivery.permanent and busy.pushes == 1
    refused = _FailingPushes(400)
    delivery = DingTalkSender("http://x", "k", "s", "k", http=refused).push(Route("1", "u1", "c"), "答案")
    assert not delivery.ok and delivery.permanent and not delivery.out_of_time
