"""Operating the bot as a service: the doctor, the task table, the terminal console, systemd notifications
and the optional 127.0.0.1 /healthz + /metrics server.

`bot.py`'s `main()` wires `run_check`, `print_tasks` and `run_console` to `python bot.py check|tasks|console`;
`run_daemon()` uses `SystemdNotifier` + `notify_systemd` (sd_notify READY/STOPPING/WATCHDOG), `TimedClient`
(feeds the task duration histogram) and `start_status_server`. Standard library only; nothing here decides
what happens to a message: the console drives the same `ChatApp` → `AsyncTaskManager` → `CodeBuddyClient`
path as DingTalk, with `ConsoleSender` printing what the chat would show.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TextIO
from urllib.parse import quote

from async_task_manager import STATUS_LABELS, AsyncTaskManager, MemoryTaskStore, SQLiteTaskStore, Task
from codebuddy_client import CodeBuddyClient, RunResult, sandbox_from_config
from config import KILL_GRACE, SETTINGS, Config, ConfigError, load_config, parse_positive_int
from dingtalk_sender import AccessTokenProvider, Delivery, DeliveryError, JsonHttp, Route, open_stream_connection

log = logging.getLogger("ops")

# systemd gets READY=1 when the stream first connects, or after this many seconds of trying (so a DingTalk
# outage at boot does not fail the unit's start; the bot keeps reconnecting).
READY_TIMEOUT = 30.0
# Buckets (seconds) of the task duration histogram: CLI runs take from seconds to TASK_TIMEOUT (30 min).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")
DELIVERY_PATHS = ("webhook", "batchSend", "group")
OK_MARK, FAIL_MARK = "✓", "✗"


# ---------------------------------------------------------------- systemd notify


def _notify_address(value: str) -> str | None:
    """The socket address in $NOTIFY_SOCKET: a path, or '@name' for an abstract socket; None if unusable."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class SystemdNotifier:
    """Sends sd_notify datagrams ("READY=1", "STOPPING=1", "WATCHDOG=1") to $NOTIFY_SOCKET, stdlib only.

    Does nothing when the bot is not started by systemd with Type=notify (no NOTIFY_SOCKET).
    """

    def __init__(self, notify_socket: str = "", watchdog_usec: int = 0) -> None:
        self.address = _notify_address(notify_socket)
        # systemd's advice: ping at half the watchdog timeout.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec > 0 else 0.0
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int | None = None) -> SystemdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID as systemd sets them."""
        try:
            watchdog_usec = int(environ.get("WATCHDOG_USEC") or 0)
        except ValueError:
            watchdog_usec = 0
        watchdog_pid = environ.get("WATCHDOG_PID", "")
        if watchdog_pid and watchdog_pid != str(pid if pid is not None else os.getpid()):
            watchdog_usec = 0  # the watchdog is meant for another process
        return cls(environ.get("NOTIFY_SOCKET", ""), watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of `KEY=value` lines; False when not under systemd or the send failed."""
        if self.address is None or not fields:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall("\n".join(fields).encode("utf-8"))
        except OSError as exc:
            if not self._warned:  # a broken socket would otherwise log on every watchdog ping
                self._warned = True
                log.warning("sd_notify 发送失败 (%s): %s", fields[0], exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self) -> bool:
        return self.notify("STOPPING=1", "STATUS=stopping: finishing running tasks")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")


async def notify_systemd(notifier: SystemdNotifier, is_connected: Callable[[], bool], *,
                         ready_timeout: float = READY_TIMEOUT, poll: float = 0.2,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """READY=1 once the stream first connects (or after `ready_timeout`), then STATUS= changes and WATCHDOG=1.

    Runs on the daemon's event loop until cancelled: if that loop hangs, the pings stop and systemd restarts
    the bot (WatchdogSec=).
    """
    if not notifier.enabled:
        return
    started = clock()
    ready = False
    last_ping = float("-inf")
    was_connected: bool | None = None
    while True:
        now = clock()
        connected = bool(is_connected())
        status = "DingTalk Stream connected" if connected else "connecting to DingTalk Stream"
        if not ready and (connected or now - started >= ready_timeout):
            notifier.ready(status)
            ready = True
        elif ready and connected != was_connected:
            notifier.notify(f"STATUS={status}")
        was_connected = connected
        if notifier.watchdog_interval and now - last_ping >= notifier.watchdog_interval:
            notifier.watchdog()
            last_ping = now
        await asyncio.sleep(poll)


# ---------------------------------------------------------------- task durations


@dataclass
class _Series:
    counts: list[int]  # per bucket, not cumulative
    total: float = 0.0
    count: int = 0


class DurationHistogram:
    """A thread-safe Prometheus-style histogram of CLI run durations, one series per outcome."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}

    def observe(self, outcome: str, seconds: float) -> None:
        """Record one run of `seconds` that ended with `outcome`."""
        with self._lock:
            series = self._series.setdefault(outcome, _Series([0] * len(self.buckets)))
            for index, bound in enumerate(self.buckets):
                if seconds <= bound:
                    series.counts[index] += 1
                    break
            series.total += seconds
            series.count += 1

    def snapshot(self, outcome: str) -> tuple[list[int], float, int]:
        """(cumulative count per bucket, sum of seconds, count) for one outcome."""
        with self._lock:
            series = self._series.get(outcome) or _Series([0] * len(self.buckets))
            cumulative, running = [], 0
            for value in series.counts:
                running += value
                cumulative.append(running)
            return cumulative, series.total, series.count


def run_outcome(result: RunResult) -> str:
    """The task status a run result leads to: succeeded, failed, timed_out or cancelled."""
    if result.ok:
        return "succeeded"
    if result.timed_out:
        return "timed_out"
    if result.cancelled:
        return "cancelled"
    return "failed"


class TimedClient:
    """Wraps a CodeBuddy client so every run's duration lands in a histogram; otherwise the same client."""

    def __init__(self, client: Any, histogram: DurationHistogram) -> None:
        self.client = client
        self.histogram = histogram

    def run(self, prompt: str, **kwargs: Any) -> RunResult:
        """Run through the wrapped client and record how long it took."""
        result = self.client.run(prompt, **kwargs)
        self.histogram.observe(run_outcome(result), result.duration)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


# ---------------------------------------------------------------- /healthz and /metrics


@dataclass
class StatusSources:
    """The daemon's live objects that /healthz and /metrics read."""

    manager: Any  # .stats
    sender: Any  # .stats (webhook_ok, batchSend_failed, …), .tokens.fetches
    client: Any  # .running_processes
    stream: Any  # .connected, .reconnects
    task_db: str
    durations: DurationHistogram


def store_writable(path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the SQLite task DB at `path` exists and takes a write lock; (ok, reason when not)."""
    if path == ":memory:":
        return True, ""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        return False, f"{absolute} does not exist"
    try:
        db = sqlite3.connect(f"file:{quote(absolute)}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, f"{absolute}: {exc}"
    return True, ""


def health(sources: StatusSources) -> tuple[bool, dict]:
    """(healthy, JSON body): healthy when the stream is connected and the task DB is writable."""
    connected = bool(sources.stream.connected)
    writable, reason = store_writable(sources.task_db)
    body = {"status": "ok" if connected and writable else "unhealthy", "stream_connected": connected,
            "store_writable": writable}
    if reason:
        body["store_error"] = reason
    return connected and writable, body


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class _Exposition:
    """Builds the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        rendered = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in (labels or {}).items())
        self.lines.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(sources: StatusSources) -> str:
    """Every metric of the bot in the Prometheus text format."""
    stats = sources.manager.stats
    sent = dict(sources.sender.stats)
    out = _Exposition()
    out.family("dingtalk_bot_tasks", "gauge", "Live tasks by status (queued, running), and tasks finished since "
               "start by final status.")
    for status in STATUS_LABELS:
        out.sample("dingtalk_bot_tasks", stats.get(f"tasks_{status}", 0), {"status": status})
    out.family("dingtalk_bot_queue_length", "gauge", "Tasks waiting for a worker.")
    out.sample("dingtalk_bot_queue_length", stats.get("queue_length", 0))
    out.family("dingtalk_bot_running_tasks", "gauge", "Tasks running now.")
    out.sample("dingtalk_bot_running_tasks", stats.get("running", 0))
    out.family("dingtalk_bot_cli_processes", "gauge", "CodeBuddy CLI processes alive now.")
    out.sample("dingtalk_bot_cli_processes", sources.client.running_processes)
    out.family("dingtalk_bot_task_duration_seconds", "histogram", "Duration of CodeBuddy CLI runs, by outcome.")
    for outcome in OUTCOMES:
        cumulative, total, count = sources.durations.snapshot(outcome)
        for bound, value in zip(sources.durations.buckets, cumulative, strict=True):
            out.sample("dingtalk_bot_task_duration_seconds_bucket", value, {"outcome": outcome, "le": _number(bound)})
        out.sample("dingtalk_bot_task_duration_seconds_bucket", count, {"outcome": outcome, "le": "+Inf"})
        out.sample("dingtalk_bot_task_duration_seconds_sum", total, {"outcome": outcome})
        out.sample("dingtalk_bot_task_duration_seconds_count", count, {"outcome": outcome})
    out.family("dingtalk_bot_deliveries_total", "counter",
               "Messages delivered, by path (session webhook, 1:1 batchSend push, group push).")
    for path in DELIVERY_PATHS:
        out.sample("dingtalk_bot_deliveries_total", sent.get(f"{path}_ok", 0), {"path": path})
    out.family("dingtalk_bot_delivery_failures_total", "counter",
               "Deliveries that failed on a path (a failed webhook reply then falls back to a push).")
    for path in DELIVERY_PATHS:
        out.sample("dingtalk_bot_delivery_failures_total", sent.get(f"{path}_failed", 0), {"path": path})
    out.family("dingtalk_bot_token_fetches_total", "counter", "Access tokens fetched from DingTalk.")
    out.sample("dingtalk_bot_token_fetches_total", sources.sender.tokens.fetches)
    out.family("dingtalk_bot_stream_connected", "gauge", "1 while the DingTalk Stream websocket is connected.")
    out.sample("dingtalk_bot_stream_connected", 1 if sources.stream.connected else 0)
    out.family("dingtalk_bot_stream_reconnects_total", "counter", "DingTalk Stream reconnect attempts.")
    out.sample("dingtalk_bot_stream_reconnects_total", sources.stream.reconnects)
    return out.text()


class _StatusHandler(BaseHTTPRequestHandler):
    server: _StatusHTTPServer

    def do_GET(self) -> None:  # noqa: N802 (the http.server API)
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                healthy, body = health(self.server.sources)
                self._answer(200 if healthy else 503, "application/json",
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

    def __init__(self, address: tuple[str, int], sources: StatusSources) -> None:
        self.sources = sources
        super().__init__(address, _StatusHandler)


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


# ---------------------------------------------------------------- config for local commands


def load_local_config(environ: Mapping[str, str], dotenv_path: str | None = ".env") -> Config:
    """Settings for commands that never call DingTalk (tasks, console): the app credentials may be missing."""
    try:
        return load_config(environ, dotenv_path)
    except ConfigError:
        placeholders = {setting.env: "not-used-offline" for setting in SETTINGS if setting.required}
        return load_config({**placeholders, **environ}, dotenv_path)


def positive_int(raw: str) -> int:
    """argparse type: a whole number greater than 0."""
    return parse_positive_int("the value", raw)


# ---------------------------------------------------------------- the doctor


@dataclass(frozen=True)
class CheckResult:
    """One line of `python bot.py check`."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{OK_MARK if self.ok else FAIL_MARK} {self.name}: {self.detail}"


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _creatable(path: str, what: str) -> tuple[bool, str]:
    """Whether `path` (missing) could be created by this user; never creates anything."""
    parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return True, f"{os.path.abspath(path)} does not exist yet; {what} will create it"
    return False, f"{os.path.abspath(path)} does not exist and {parent} is not writable"


def check_workspace(path: str) -> CheckResult:
    """The CLI's working directory exists (or can be created) and takes a new file."""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the first run")
        return CheckResult("workspace", ok, detail)
    if not os.path.isdir(absolute):
        return CheckResult("workspace", False, f"{absolute} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=absolute, prefix=".bot-check-"):
            pass
    except OSError as exc:
        return CheckResult("workspace", False, f"{absolute} is not writable ({exc.strerror or exc})")
    return CheckResult("workspace", True, f"{absolute} is writable")


def check_task_db(path: str) -> CheckResult:
    """The task DB takes a write lock (or its directory lets the daemon create it)."""
    absolute = os.path.abspath(path)
    if path == ":memory:":
        return CheckResult("task DB", True, "in memory (tasks are lost on restart)")
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the daemon")
        return CheckResult("task DB", ok, detail)
    ok, reason = store_writable(absolute)
    return CheckResult("task DB", ok, f"{absolute} is writable" if ok else f"not writable: {reason}")


def check_log_file(path: str) -> CheckResult:
    """The log file can be appended to (or created); otherwise the daemon logs to stderr."""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the daemon")
        if not ok:
            detail += " (the bot would log to stderr, i.e. the journal)"
        return CheckResult("log file", ok, detail)
    try:
        with open(absolute, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return CheckResult("log file", False, f"{absolute} is not writable ({exc.strerror or exc}); "
                                              "the bot would log to stderr")
    return CheckResult("log file", True, f"{absolute} is writable")


def check_access_token(config: Config, http: JsonHttp | None = None) -> CheckResult:
    """Fetch an access token: proves DINGTALK_CLIENT_ID/SECRET and that the OpenAPI endpoint answers."""
    provider = AccessTokenProvider(http or JsonHttp(pool_size=1, transport_retries=0),
                                   config.openapi_endpoint, config.client_id, config.client_secret)
    url = config.openapi_endpoint + "/v1.0/oauth2/accessToken"
    try:
        provider.get()
    except DeliveryError as exc:
        hint = "" if exc.retryable else " (check DINGTALK_CLIENT_ID and DINGTALK_CLIENT_SECRET)"
        return CheckResult("DingTalk access token", False, f"{exc} from {url}{hint}")
    return CheckResult("DingTalk access token", True, f"fetched from {url}")


def check_stream_gateway(config: Config, http: JsonHttp | None = None) -> CheckResult:
    """Ask the Stream gateway for a connection ticket: proves the app may use Stream mode."""
    url = config.openapi_endpoint + "/v1.0/gateway/connections/open"
    connection, error = open_stream_connection(http or JsonHttp(pool_size=1, transport_retries=0),
                                               config.openapi_endpoint, config.client_id, config.client_secret,
                                               ua="dingtalk-codebuddy-bot/check")
    if connection is not None:
        return CheckResult("DingTalk Stream", True, "the gateway accepted the app (Stream mode)")
    if error.startswith("unreachable"):
        return CheckResult("DingTalk Stream", False, f"{url} {error}")
    return CheckResult("DingTalk Stream", False, f"connections/open refused: {error}")


def check_cli(config: Config, timeout: float = 20.0) -> CheckResult:
    """`CODEBUDDY_BIN --version` runs."""
    import shutil
    import subprocess

    client = CodeBuddyClient.from_config(config)
    shown = shutil.which(client.binary) or client.binary
    try:
        version = client.version(timeout=timeout)
    except FileNotFoundError:
        return CheckResult("CodeBuddy CLI", False, f"{config.codebuddy_bin} not found (install the CLI, or set "
                                                   "CODEBUDDY_BIN to its path)")
    except PermissionError:
        return CheckResult("CodeBuddy CLI", False, f"{shown} is not executable")
    except subprocess.TimeoutExpired:
        return CheckResult("CodeBuddy CLI", False, f"{shown} --version did not answer in {timeout:.0f} s")
    except (OSError, RuntimeError) as exc:
        return CheckResult("CodeBuddy CLI", False, f"{shown} --version failed: {exc}")
    return CheckResult("CodeBuddy CLI", True, f"{shown} {version.splitlines()[0] if version else '(no version)'}")


def check_sandbox(config: Config) -> CheckResult:
    """Every run can start in its sandbox (CODEBUDDY_SANDBOX=none fails: runs are not isolated)."""
    sandbox = sandbox_from_config(config, config.codebuddy_bin)
    if sandbox.name == "none":
        return CheckResult("sandbox", False, "CODEBUDDY_SANDBOX=none: runs are not isolated (every chat user can make "
                                             "the agent read .env and write the bot's files); set it to bwrap")
    problem = sandbox.probe()
    if problem:
        return CheckResult("sandbox", False, problem)
    return CheckResult("sandbox", True, f"{sandbox.version() or sandbox.name}: each conversation in its own jail")


def describe_settings(config: Config, environ: Mapping[str, str], dotenv_path: str | None) -> list[str]:
    """One line per setting: name, value (secrets masked) and where it came from."""
    from dotenv import dotenv_values

    in_file = dotenv_values(dotenv_path) if dotenv_path and os.path.isfile(dotenv_path) else {}
    rows = config.describe()
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, shown in rows:
        if (environ.get(name) or "").strip():
            source = "environment"
        elif (in_file.get(name) or "").strip():
            source = dotenv_path or ".env"
        else:
            source = "default"
        lines.append(f"  {name.ljust(width)}  {shown or '(unset)'}  [{source}]")
    return lines


def run_check(environ: Mapping[str, str], *, dotenv_path: str | None = ".env", out: TextIO | None = None,
              cli_timeout: float = 20.0) -> int:
    """`python bot.py check`: print the settings and one ✓/✗ line per check; 0 only if every check passed."""
    out = out or sys.stdout
    try:
        config = load_config(environ, dotenv_path)
    except ConfigError as exc:
        print(CheckResult("configuration", False, str(exc)).line(), file=out)
        return 1
    except OSError as exc:  # e.g. a .env the user may not read
        print(CheckResult("configuration", False, f"cannot read {exc.filename or dotenv_path}: "
                                                  f"{exc.strerror or exc}").line(), file=out)
        return 1
    print("Settings (.env and the environment; the environment wins):", file=out)
    for line in describe_settings(config, environ, dotenv_path):
        print(line, file=out)
    print(file=out, flush=True)
    results = [CheckResult("configuration", True, f"{len(SETTINGS)} settings valid")]
    print(results[0].line(), file=out, flush=True)
    for check in (lambda: check_access_token(config), lambda: check_stream_gateway(config),
                  lambda: check_cli(config, cli_timeout), lambda: check_sandbox(config),
                  lambda: check_workspace(config.codebuddy_workdir),
                  lambda: check_task_db(config.task_db), lambda: check_log_file(config.log_file)):
        result = check()
        results.append(result)
        print(result.line(), file=out, flush=True)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print("  note: running as root, so file checks pass for root; run it as the service user "
              "(sudo -u dingtalk-bot …) to check what the daemon may write", file=out)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed.", file=out)
        return 1
    print(f"All {len(results)} checks passed.", file=out)
    return 0


# ---------------------------------------------------------------- the task table


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _display_width(text))


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    if _display_width(text) <= width:
        return text
    clipped = ""
    for char in text:
        if _display_width(clipped + char) > width - 1:
            break
        clipped += char
    return clipped + "…"


def format_task_table(tasks: list[Task], now: float) -> str:
    """Tasks as an aligned text table (Chinese prompts count as two columns)."""
    header = ("ID", "STATUS", "USER", "CREATED", "ELAPSED", "MODE", "DELIVERED", "PROMPT")
    rows = [header]
    for task in tasks:
        rows.append((task.id, task.status, task.user_id,
                     datetime.fromtimestamp(task.created_at).strftime("%Y-%m-%d %H:%M:%S"),
                     f"{task.elapsed(now):.0f}s", "background" if task.background else "sync",
                     "yes" if task.delivered else "no", _clip(task.prompt, 40)))
    widths = [max(_display_width(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(_pad(cell, widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows)


def select_tasks(store: SQLiteTaskStore, *, user: str | None = None, status: str | None = None,
                 limit: int = 20) -> list[Task]:
    """The newest `limit` tasks, optionally of one user and/or one status."""
    if status is None:
        return store.recent_for_user(user, limit)
    tasks = [t for t in store.load([status]) if user is None or t.user_id == user]
    return sorted(tasks, key=lambda t: t.created_at, reverse=True)[:limit]


def print_tasks(db_path: str, *, user: str | None = None, status: str | None = None, limit: int = 20,
                out: TextIO | None = None, now: float | None = None) -> int:
    """`python bot.py tasks`: a table of tasks from the SQLite task DB; 1 if there is no DB."""
    out = out or sys.stdout
    absolute = os.path.abspath(db_path)
    if not os.path.isfile(absolute):
        print(f"no task DB at {absolute} (set TASK_DB, or run the bot once)", file=sys.stderr)
        return 1
    store = SQLiteTaskStore(absolute)
    try:
        tasks = select_tasks(store, user=user, status=status, limit=limit)
    finally:
        store.close()
    if not tasks:
        print("no tasks", file=out)
        return 0
    print(format_task_table(tasks, time.time() if now is None else now), file=out)
    print(f"{len(tasks)} task(s), newest first, from {absolute}", file=out)
    return 0


# ---------------------------------------------------------------- the console


class ConsoleSender:
    """The sender seam of `DingTalkSender`, printing what the chat would show instead of calling DingTalk.

    It picks the path the real sender would (the session webhook while it is alive and allowed, else a
    push), so the console shows which answers are replies and which are pushed results.
    """

    def __init__(self, out: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.out = out or sys.stdout
        self.stats: dict[str, int] = {}
        self.last_activity = clock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()

    def print_line(self, text: str) -> None:
        """Print a line of the console itself (never interleaved with a message)."""
        with self._lock:
            print(text, file=self.out, flush=True)

    def send(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             allow_webhook: bool = True) -> Delivery:
        """Print `text` under a header naming the path it would take; always delivered."""
        if allow_webhook and route.session_webhook_alive(self._wall_clock() * 1000):
            path, how = "webhook", "webhook"
        else:
            path = "group" if route.is_group else "batchSend"
            how = f"push {path}"
        header = f"[bot · {how}" + (f' · markdown "{title}"' if markdown else "") + "]"
        body = text.replace("\n", "\n  ")  # indented continuation lines: one message reads as one block
        with self._lock:
            print(f"{header} {body}", file=self.out, flush=True)
            self.stats[f"{path}_ok"] = self.stats.get(f"{path}_ok", 0) + 1
            self.last_activity = self._clock()
        return Delivery(ok=True, path=path)


def _busy(manager: AsyncTaskManager) -> bool:
    stats = manager.stats
    if stats["queue_length"] or stats["running"]:
        return True
    return any(not (task.finished and task.delivered) for task in manager.tasks_for(None, limit=10_000))


def wait_until_idle(manager: AsyncTaskManager, sender: ConsoleSender, *, quiet: float = 0.3, poll: float = 0.05,
                    timeout: float | None = None, clock: Callable[[], float] = time.monotonic) -> bool:
    """Block until no task is queued, running or undelivered and nothing was printed for `quiet` seconds.

    The quiet period lets answers already on their way (a /cancel confirmation, a command reply) come out.
    Returns False if `timeout` passed first.
    """
    started = clock()
    last_busy = started
    while True:
        now = clock()
        if _busy(manager):
            last_busy = now
        elif now - max(last_busy, sender.last_activity) >= quiet:
            return True
        if timeout is not None and now - started >= timeout:
            return False
        time.sleep(poll)


def build_console_manager(config: Config, sender: ConsoleSender) -> AsyncTaskManager:
    """A task manager like the daemon's (same settings, real CLI) with an in-memory store and the console sender."""
    return AsyncTaskManager.from_config(config, CodeBuddyClient.from_config(config), sender, MemoryTaskStore())


CONSOLE_BANNER = ("CodeBuddy console: each line you type goes to the bot as a DingTalk 1:1 message would.\n"
                  "/help lists the commands; Ctrl-D quits after running tasks finish, Ctrl-C quits at once.")
# The console's session webhook never expires, like a chat the user keeps open.
_CONSOLE_WEBHOOK_TTL = 10 * 365 * 86400.0


def run_console(config: Config, app_factory: Callable[[Any, Config], Any], message_factory: Callable[..., Any], *,
                user_id: str = "console", stdin: TextIO | None = None, out: TextIO | None = None,
                quiet: float = 0.3, wall_clock: Callable[[], float] = time.time) -> int:
    """`python bot.py console`: chat through `ChatApp` in the terminal; EOF waits for running tasks, then 0.

    `app_factory(manager, config)` is bot.ChatApp and `message_factory(**fields)` bot.IncomingMessage: the
    console builds the same neutral message a DingTalk frame becomes.
    """
    stdin = stdin or sys.stdin
    sender = ConsoleSender(out, wall_clock=wall_clock)
    manager = build_console_manager(config, sender)
    app = app_factory(manager, config)
    interactive = stdin.isatty()
    if interactive:
        sender.print_line(CONSOLE_BANNER)
    manager.start()
    conversation = f"console-{user_id}"
    try:
        while True:
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if not interactive:
                sender.print_line(f"> {text}")  # a piped transcript shows what was said
            app.handle(message_factory(
                msg_id=f"console-{uuid.uuid4().hex}", user_id=user_id, user_name=user_id, conversation_type="1",
                conversation_id=conversation, text=text, msgtype="text", session_webhook="console://session",
                webhook_expires_ms=int((wall_clock() + _CONSOLE_WEBHOOK_TTL) * 1000)))
        wait_until_idle(manager, sender, quiet=quiet)
    except KeyboardInterrupt:
        sender.print_line("interrupted: stopping running tasks")
        manager.shutdown(0, after_grace=KILL_GRACE + 1)
        return 130
    manager.shutdown(0, after_grace=KILL_GRACE + 1)
    return 0
