"""What the bot checks and says as it starts: the settings (every problem at once), the sandbox, the CLI, and a task
DB that does not answer yet (waited for)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cluster.hosts import open_task_store, this_host
from codebuddy.cli_setup import INSTALL_FIX, choose_cli, login_state
from codebuddy_client import sandbox_from_config
from config import SETTINGS, Config, ConfigError, read_config
from ops.store_admin import clock_problem
from ops.systemd_notify import SystemdNotifier
from store.journal import JournaledStore
from store.postgres import StoreUnreachable, is_postgres_url
from store.schema import StoreError

log = logging.getLogger("bot")

STORE_RETRY = (1.0, 30.0)  # seconds between tries to open an unreachable task DB: the first, doubling up to the last


class StartCancelled(Exception):
    """SIGTERM or SIGINT came while the bot waited for its task DB: it stops without having started."""


def load_local_config(environ: Mapping[str, str], dotenv_path: str | None = ".env") -> Config:
    """Settings for the console, which never calls DingTalk: the app credentials may be missing (or examples)."""
    config, error = read_config(environ, dotenv_path)
    offline = {setting.env for setting in SETTINGS if setting.required}
    if error is not None:
        problems = [problem for problem in error.problems if problem.split()[0] not in offline]
        if problems:
            raise ConfigError(problems, [name for name in error.unfilled if name not in offline])
    return config


def config_failure(error: ConfigError) -> str:
    """The one message a configuration error ends the start with: every setting to fix, and how."""
    if len(error.problems) == 1:
        return f"配置错误: {error.problems[0]}"
    where = os.path.abspath(".env") + " (or the environment)"
    return (f"配置错误: {len(error.problems)} settings to fix in {where}, then start again:\n"
            + "\n".join(f"  - {problem}" for problem in error.problems))


def sandbox_problem(config: Config) -> str:
    """Probe the sandbox every run starts in, once: "" when it works, else the start-up error saying why."""
    try:
        sandbox = sandbox_from_config(config)
    except ValueError as exc:  # a bad CODEBUDDY_EGRESS_ALLOW or _DENY entry
        return f"配置错误: {exc}"
    problem = sandbox.probe()
    if problem:
        return f"配置错误: CodeBuddy 沙箱不可用 (CODEBUDDY_SANDBOX={sandbox.name}): {problem}"
    if sandbox.name == "none":
        log.warning("CODEBUDDY_SANDBOX=none: CodeBuddy 运行未隔离 (runs are not isolated): every chat user can make "
                    "the agent read and write whatever this Unix user can, .env included")
    else:
        log.info("CodeBuddy 沙箱: %s (每个会话独立的工作区，系统目录只读)", sandbox.name)
    return ""


def report_cli(config: Config) -> None:
    """Say at start which CodeBuddy CLI runs; warn when it is missing or cannot sign in (every prompt would fail)."""
    choice = choose_cli(config.codebuddy_bin)
    if choice.found:
        log.info("CodeBuddy CLI: %s (%s)", choice.path, choice.origin)
    else:
        log.warning("CodeBuddy CLI 未找到: %s (%s); every prompt will fail. Fix: %s", choice.path, choice.origin,
                    INSTALL_FIX)
    login = login_state({**os.environ, **dict(config.cli_env)}, os.path.expanduser("~"))
    if not login.ok:
        log.warning("CodeBuddy 账号未设置: %s", login.detail)


def claim_host_identity(config: Config) -> tuple[object | None, str]:
    """Hold this process's host identity for its life (an flock in CODEBUDDY_WORKDIR, released when the process
    ends): (the held lock, "") or (None, the start-up error) when another live process of this installation has
    it — two processes under one name would renew each other's leases and break the per-user limits."""
    name = this_host(config)
    os.makedirs(config.codebuddy_workdir, mode=0o700, exist_ok=True)
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    handle = open(os.path.join(config.codebuddy_workdir, f".host-{digest}.lock"), "a")  # noqa: SIM115 (held)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None, (f"配置错误: another bot process already runs as host {name!r} here "
                      f"(CODEBUDDY_WORKDIR={os.path.abspath(config.codebuddy_workdir)}): stop it, or give each "
                      "process its own HOST_NAME and CODEBUDDY_WORKDIR")
    return handle, ""


def open_task_store_when_up(config: Config, opener: Callable[[Config], JournaledStore] = open_task_store, *,
                            retry: tuple[float, float] = STORE_RETRY,
                            environ: Mapping[str, str] | None = None) -> JournaledStore:
    """The daemon's task store. A PostgreSQL server that does not answer (StoreUnreachable) is tried again with
    backoff, each try logged, `/healthz` answering 503 "unhealthy" meanwhile and systemd's start timeout extended;
    a restart would not do better, and `RestartPreventExitStatus=2` would keep the bot down for good. Any other
    StoreError (a newer schema, not the bot's DB, a bad URL) is raised at once: exit 2, for the operator to fix.
    Raises StartCancelled on SIGTERM/SIGINT while waiting."""
    try:
        return opener(config)
    except StoreUnreachable as exc:
        failure = exc
    notifier = SystemdNotifier.from_environ(os.environ if environ is None else environ)
    stop = threading.Event()
    previous = _on_stop_signals(stop.set)
    waiting = _WaitingStatus(config.status_port)
    delay, attempt = retry[0], 1
    try:
        while True:
            reason = str(failure)
            waiting.reason = f"task DB unreachable, try {attempt} failed; trying again in {delay:.0f} s: {reason}"
            log.error("任务数据库无法连接 (第 %d 次尝试)，%.0f 秒后重试: %s", attempt, delay, reason)
            # Not READY yet: the start timeout is pushed back past the next try, so systemd keeps waiting too.
            notifier.notify(f"EXTEND_TIMEOUT_USEC={int((delay + 60) * 1_000_000)}",
                            f"STATUS=waiting for the task DB (try {attempt})")
            if stop.wait(delay):
                log.warning("等待任务数据库时收到停止信号，机器人未启动")
                raise StartCancelled
            attempt += 1
            try:
                store = opener(config)
            except StoreUnreachable as exc:
                failure, delay = exc, min(delay * 2, retry[1])
                continue
            log.warning("任务数据库已连接 (第 %d 次尝试)，继续启动", attempt)
            return store
    finally:
        waiting.stop()
        _restore_signals(previous)


def _on_stop_signals(handler: Callable[[], None]) -> dict[int, Any]:
    """Have SIGTERM and SIGINT call `handler` (main thread only); the handlers they had."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, lambda *_: handler()) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore_signals(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _WaitingStatus:
    """/healthz (and any other path) while the bot waits for its task DB: 503, "unhealthy", and why."""

    def __init__(self, port: int | None) -> None:
        self.reason = ""
        self._server: ThreadingHTTPServer | None = None
        if port is None:
            return
        status = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                body = {"status": "unhealthy", "starting": True, "store_writable": False, "stream_connected": False,
                        "reasons": [status.reason]}
                data = (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8")
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server API)
                pass

        try:
            self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            log.error("状态服务无法监听 127.0.0.1:%d (%s)", port, exc.strerror or exc)
            return
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="status-waiting",
                         daemon=True).start()
        log.info("状态服务已启动 (等待任务数据库): http://127.0.0.1:%d/healthz", self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def refuse_a_clock_far_off(config: Config, store: JournaledStore,
                           clock: Callable[[], float] = time.time) -> None:
    """With a PostgreSQL task DB: StoreError (exit 2, for the operator) when this host's clock is far off the DB's."""
    if not is_postgres_url(config.task_db):
        return
    problem = clock_problem(config.task_db, clock=clock, timeout=config.db_statement_timeout)
    if problem:
        store.close()
        raise StoreError(problem)
