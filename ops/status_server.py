"""The optional 127.0.0.1 HTTP server: /healthz (see ops/health.py) and /metrics (Prometheus)."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ops import health
from ops.metrics import StatusSources, render_metrics

log = logging.getLogger("ops")



class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusHTTPServer
    timeout = 10.0  # seconds a connection may stay silent: an idle or slow client does not hold a thread for ever

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                code, body = health.assess(self.server.sources)
                self._answer(code, "application/json",
                             json.dumps(body, ensure_ascii=False) + "\n")
            elif path == "/metrics":
                self._answer(200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(self.server.sources))
            else:
                self._answer(404, "text/plain; charset=utf-8", "not found: try /healthz or /metrics\n")
        except Exception:
            log.exception("状态服务处理 %s 失败", path)
            self._answer(500, "text/plain; charset=utf-8", "internal error\n")

    def _answer(self, status: int, content_type: str, text: str) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
        log.debug("status server: " + format, *args)


class _StatusHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    max_connections = 16  # connections served at once; more are closed at once (threads stay bounded)
    request_queue_size = 64  # the listen backlog: a burst of connections is taken in, not left to retransmit

    def __init__(self, address: tuple[str, int], sources: StatusSources) -> None:
        self.sources = sources
        self._slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(address, _StatusHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class StatusServer:
    """`http.server` on a daemon thread serving /healthz and /metrics (127.0.0.1 only by default)."""

    def __init__(self, sources: StatusSources, port: int, host: str = "127.0.0.1") -> None:
        self._server = _StatusHTTPServer((host, port), sources)  # binds now: raises OSError if the port is taken
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="status-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()


def start_status_server(port: int | None, sources: StatusSources) -> StatusServer | None:
    """Start the status server when STATUS_PORT is set; if the port cannot be bound, log it and run without."""
    if port is None:
        return None
    try:
        server = StatusServer(sources, port).start()
    except OSError as exc:
        log.error("状态服务无法监听 127.0.0.1:%d (%s)，/healthz 和 /metrics 不可用", port, exc.strerror or exc)
        return None
    log.info("状态服务已启动: http://127.0.0.1:%d/healthz /metrics", server.port)
    return server
