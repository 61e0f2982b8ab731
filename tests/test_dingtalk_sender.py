"""The sender's access token (dingtalk_sender.py): fetched once for many threads, refreshed before expiry."""

from __future__ import annotations

import threading
import time

from dingtalk_sender import AccessTokenProvider


class _CountingHttp:
    """A JsonHttp stand-in that answers every token request with a new token."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def post_json(self, url, body, headers=None):
        from dingtalk_sender import HttpReply

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
