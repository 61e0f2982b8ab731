"""The optional 127.0.0.1 HTTP server: /healthz (see ops/health.py), /metrics (Prometheus) and the admin page (/).

With STATUS_TOKEN set every path but /healthz asks for it (`Authorization: Bearer <token>` or `?token=<token>`,
compared in constant time); without it /healthz and /metrics are open, as for scrapers, and the admin page, which
shows who uses the bot, is refused. The token is never logged: request lines are logged with it masked.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

from common.redaction import replace_secrets
from ops import health
from ops.admin_page import CONTENT_SECURITY_POLICY, render_admin_page
from ops.admin_view import admin_view
from ops.metrics import StatusSources, render_metrics

log = logging.getLogger("ops")

TEXT = "text/plain; charset=utf-8"
# Every answer: nothing cached, sniffed, framed or sent on as a referrer; the page may load nothing but its own style.
SECURITY_HEADERS = (("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                    ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
                    ("Content-Security-Policy", CONTENT_SECURITY_POLICY))
UNAUTHORIZED = "unauthorized: send STATUS_TOKEN as Authorization: Bearer <token> or ?token=<token>\n"
PAGE_OFF = "forbidden: the admin page shows who uses the bot; set STATUS_TOKEN to open it (docs/operations.md)\n"
_TOKEN_IN_QUERY = re.compile(r"(?i)([?&;]token=)[^&;\s\"]*")


def presented_token(path: str, authorization: str) -> str:
    """The token a request presents: its `Authorization: Bearer` header, else its `token` query parameter."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    query = path.split("?", 1)[1] if "?" in path else ""
    return parse_qs(query, keep_blank_values=True).get("token", [""])[0]


def token_matches(presented: str, token: str) -> bool:
    """Whether `presented` is `token`, compared in constant time (an empty token never matches)."""
    return bool(token) and hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8"))


def mask_token(text: str, token: str) -> str:
    """`text` (a request line) with any ?token= value and the token itself shown as ***."""
    return replace_secrets(_TOKEN_IN_QUERY.sub(r"\1***", text), (token,))


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusHTTPServer
    timeout = 10.0  # seconds a connection may stay silent: an idle or slow client does not hold a thread for ever

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        sources = self.server.sources
        try:
            if path == "/healthz":  # always open: the watchdog, `bot.py check` and load balancers ask it
                code, body = health.assess(sources)
                self._answer(code, "application/json",
                             json.dumps(body, ensure_ascii=False) + "\n")
            elif sources.token and not token_matches(presented_token(self.path, self.headers.get("Authorization",
                                                                                                 "")), sources.token):
                self._answer(401, TEXT, UNAUTHORIZED, (("WWW-Authenticate", 'Bearer realm="dingtalk-bot"'),))
            elif path == "/metrics":
                self._answer(200, "text/plain; version=0.0.4; charset=utf-8", render_metrics(sources))
            elif path == "/" and not sources.token:
                self._answer(403, TEXT, PAGE_OFF)
            elif path == "/":
                self._answer(200, "text/html; charset=utf-8", render_admin_page(admin_view(sources, time.time())))
            else:
                self._answer(404, TEXT, "not found: try /healthz, /metrics or /\n")
        except Exception:
            log.exception("状态服务处理 %s 失败", path)
            self._answer(500, TEXT, "internal error\n")

    def _answer(self, status: int, content_type: str, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (*SECURITY_HEADERS, *headers):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
        log.debug("status server: %s", mask_token(format % args, self.server.sources.token))


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
    """`http.server` on a daemon thread serving /healthz, /metrics and / (127.0.0.1 only by default)."""

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
    log.info("状态服务已启动: http://127.0.0.1:%d/healthz /metrics; 管理页 / %s", server.port,
             "需要 STATUS_TOKEN" if sources.token else "未开启 (未设置 STATUS_TOKEN)")
    return server
