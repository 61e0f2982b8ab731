"""The status server's own bounds: idle connections time out and hold at most a fixed number of threads."""

from __future__ import annotations

import socket
import threading
import urllib.request

from ops import status_server
from tests.ops.test_ops import _sources
from tests.standin import poll_until


def test_a_hundred_idle_connections_hold_few_threads_and_healthz_answers_again_after_their_timeout(
        tmp_path, monkeypatch):
    # 2.5 s: long enough that a loaded machine fills all 16 slots before the first idle connection times out
    monkeypatch.setattr(status_server._StatusHandler, "timeout", 2.5)
    server = status_server.StatusServer(_sources(tmp_path, connected=True), 0).start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    slots = server._server._slots
    try:
        poll_until(lambda: slots._value == 0, 10, 0.01, lambda: "every slot taken by an idle connection")
        assert threading.active_count() <= before + status_server._StatusHTTPServer.max_connections + 1
        poll_until(lambda: threading.active_count() <= before + 1, 45, 0.05, lambda: "idle connections timed out")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as reply:
            assert reply.status == 200
    finally:
        for sock in idle:
            sock.close()
        server.stop()
