"""Operating the bot: the doctor, the task table, the console, sd_notify, /healthz and /metrics.

The doctor, `tasks` and the console run as `python bot.py COMMAND` subprocesses; sd_notify and the status
server are checked on a running daemon connected to the local DingTalk stand-in.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import SimpleNamespace

from prometheus_client import parser as metrics_parser  # a dev dependency: missing, these tests fail, never skip

from chat import console
from codebuddy_client import RunResult
from dingtalk.api_budget import month_of
from dingtalk.route import Route
from ops import doctor, metrics, status_server, systemd_notify, task_table
from store.base import StoreHealth
from store.memory import MemoryTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.task import Task
from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT, cli_runs, fake_cli_env, run_alive, send_pushed

BOT = str(ROOT / "bot.py")


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean environment for `python bot.py …` with every path inside tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DINGTALK_", "CODEBUDDY_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update({
        "NO_PROXY": "127.0.0.1,localhost", "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
        **fake_cli_env(tmp_path), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
        "LOG_FILE": str(tmp_path / "logs" / "bot.log"), "TASK_DB": str(tmp_path / "data" / "tasks.db"),
    })
    env.update(overrides)
    return env


def _run_bot(tmp_path: Path, *args: str, timeout: float = 30, **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BOT, *args], cwd=tmp_path, env=_env(tmp_path, **overrides),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            return response.status, response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8")


# ---------------------------------------------------------------- the command line


def test_help_documents_every_command(tmp_path):
    result = _run_bot(tmp_path, "--help")
    assert result.returncode == 0
    for command in ("run", "check", "tasks", "console"):
        assert re.search(rf"^\s+{command}\s+\S", result.stdout, re.M), result.stdout
    tasks_help = _run_bot(tmp_path, "tasks", "--help").stdout
    assert "--user" in tasks_help and "--status" in tasks_help and "--limit" in tasks_help


# ---------------------------------------------------------------- the doctor


def test_check_passes_with_good_credentials_and_masks_the_secret(tmp_path, standin):
    result = _run_bot(tmp_path, "check", DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET=CLIENT_SECRET,
                      DINGTALK_OPENAPI_ENDPOINT=standin.base_url, CODEBUDDY_API_KEY="ck-test-key")
    assert result.returncode == 0, result.stdout + result.stderr
    marks = [line for line in result.stdout.splitlines() if line.startswith(("✓", "✗"))]
    assert [m.split(":")[0] for m in marks] == ["✓ configuration", "✓ DingTalk access token", "✓ DingTalk Stream",
                                                "✓ CodeBuddy CLI", "✓ CodeBuddy login", "✓ sandbox", "✓ workspace",
                                                "✓ task DB", "✓ log file"]
    assert "2.163.0 (fake)" in result.stdout
    assert "· warm sessions: up to 4 CLI processes kept, ended after 600 s idle; tools the mode does not allow are " \
           "asked of the sender (300 s to answer)" in result.stdout
    assert "· API budget: 0 of 5000 metered calls this month (no task DB yet)" in result.stdout  # not a check
    assert re.search(r"DINGTALK_CLIENT_ID\s+test-client-id\s+\[environment\]", result.stdout)
    assert re.search(r"SYNC_TIMEOUT\s+60.0\s+\[default\]", result.stdout)
    assert CLIENT_SECRET not in result.stdout + result.stderr
    assert standin.token_fetches == 1
    assert not (tmp_path / "data").exists() and not (tmp_path / "logs").exists()  # the doctor creates nothing


def test_check_with_a_bad_secret_fails_on_the_token_line(tmp_path, standin):
    result = _run_bot(tmp_path, "check", DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET="wrong-secret",
                      DINGTALK_OPENAPI_ENDPOINT=standin.base_url)
    assert result.returncode == 1
    token_line = next(line for line in result.stdout.splitlines() if "DingTalk access token" in line)
    assert token_line.startswith("✗") and "InvalidAuthentication" in token_line
    assert "DINGTALK_CLIENT_SECRET" in token_line
    assert "✓ CodeBuddy CLI" in result.stdout  # the other checks still run
    assert "wrong-secret" not in result.stdout


def test_check_with_a_missing_cli_fails(tmp_path, standin):
    result = _run_bot(tmp_path, "check", DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET=CLIENT_SECRET,
                      DINGTALK_OPENAPI_ENDPOINT=standin.base_url, CODEBUDDY_BIN=str(tmp_path / "no-such-codebuddy"))
    assert result.returncode == 1
    cli_line = next(line for line in result.stdout.splitlines() if "CodeBuddy CLI" in line)
    assert cli_line.startswith("✗") and "not found" in cli_line
    assert "✓ DingTalk access token" in result.stdout


def test_check_without_credentials_fails_on_configuration():
    out = io.StringIO()
    assert doctor.run_check({}, dotenv_path=None, out=out) == 1
    assert "✗ configuration: 2 settings to fix" in out.getvalue()
    assert "    - DINGTALK_CLIENT_ID is not set" in out.getvalue()


def test_check_reports_paths_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert not doctor.check_workspace(str(blocker)).ok
    assert not doctor.check_task_db(str(blocker / "tasks.db")).ok
    assert not doctor.check_log_file(str(blocker / "bot.log")).ok
    assert doctor.check_log_file(str(tmp_path / "new" / "bot.log")).ok


# ---------------------------------------------------------------- the task table


def _task(task_id: str, user: str, status: str, created: float, prompt: str, **fields) -> Task:
    return Task(id=task_id, user_id=user, user_name=user, conversation_key=user,
                route=Route(conversation_type="1", user_id=user, conversation_id=""), prompt=prompt, status=status,
                created_at=created, finished_at=created + 12 if status != "running" else None, **fields)


def test_tasks_prints_a_filtered_table_from_the_task_db(tmp_path):
    db = tmp_path / "data" / "tasks.db"
    store = SQLiteTaskStore(str(db))
    now = time.time()
    store.save(_task("aaaa0001", "u1", "succeeded", now - 300, "请生成报告: 第三季度销售情况", background=True,
                     delivered=True))
    store.save(_task("aaaa0002", "u1", "failed", now - 200, "do it [fail]", error="boom"))
    store.save(_task("aaaa0003", "u2", "succeeded", now - 100, "hello"))
    store.save(_task("aaaa0004", "u1", "succeeded", now - 50, "second\nline"))
    store.close()
    result = _run_bot(tmp_path, "tasks", "--user", "u1", "--status", "succeeded", "--limit", "5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "USER", "CREATED", "ELAPSED", "MODE", "DELIVERED", "REASON", "PROMPT"]
    assert [line.split()[0] for line in lines[1:3]] == ["aaaa0004", "aaaa0001"]  # newest first, u1 only
    assert "background" in lines[2] and "12s" in lines[2] and "请生成报告" in lines[2]
    assert "second line" in lines[1]
    assert lines[3].startswith("2 task(s)")
    everyone = _run_bot(tmp_path, "tasks", "--limit", "3").stdout.splitlines()
    assert [line.split()[0] for line in everyone[1:4]] == ["aaaa0004", "aaaa0003", "aaaa0002"]


def test_tasks_without_a_db_says_so(tmp_path):
    result = _run_bot(tmp_path, "tasks", "--db", str(tmp_path / "missing.db"))
    assert result.returncode == 1 and "no task DB" in result.stderr
    assert not (tmp_path / "missing.db").exists()


def test_task_table_aligns_chinese_prompts():
    now = time.time()
    table = task_table.format_task_table([_task("b1", "u1", "running", now, "分析公司" * 20),
                                   _task("b2", "user-two", "queued", now, "short")], now)
    header, first, second = table.splitlines()
    prompt_column = task_table._display_width(header[:header.index("PROMPT")])
    for row in (first, second):
        cut = next(i for i in range(len(row)) if task_table._display_width(row[:i]) >= prompt_column)
        assert row[cut - 2:cut] == "  "
    assert first.endswith("…") and task_table._display_width(first) - prompt_column <= 40


# ---------------------------------------------------------------- the console


class _Console:
    """`python bot.py console` on pipes; a thread collects what it prints."""

    def __init__(self, tmp_path: Path, **overrides: str) -> None:
        self.proc = subprocess.Popen([sys.executable, BOT, "console"], cwd=tmp_path, env=_env(tmp_path, **overrides),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, encoding="utf-8")
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def say(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.text, re.M)
            if match:
                return match
            time.sleep(0.05)
        raise AssertionError(f"console never printed {pattern!r}:\n{self.text}")

    def close(self, timeout: float = 15.0) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return code


def test_console_answers_short_and_long_prompts_status_and_cancel(tmp_path):
    console = _Console(tmp_path)
    try:
        console.say("你好")
        console.wait_for(r"^\[bot · webhook\] 收到任务，正在处理中… \(任务ID: \w+\)")
        console.wait_for(r'^\[bot · webhook · markdown "CodeBuddy 回复"\] 回答: 你好')

        console.say("请生成报告: Q3 销售 [sleep=0.3]")
        long_id = console.wait_for(r"已转入后台执行 \(任务ID: (\w+)\)").group(1)
        # A background result goes by the webhook while it lives (free), like the real sender's.
        console.wait_for(rf'^\[bot · webhook · markdown "CodeBuddy 回复"\] \*\*任务 {long_id} 已完成\*\*')

        console.say("/status")
        console.wait_for(rf"^\[bot · webhook\] 任务 {long_id}: 已完成")

        console.say("写个脚本 [sleep=30]")
        console.wait_for(r"收到任务，正在处理中… \(任务ID: \w+\)(?:.|\n)*收到任务，正在处理中… \(任务ID: \w+\)")
        slow_id = re.findall(r"收到任务，正在处理中… \(任务ID: (\w+)\)", console.text)[-1]
        deadline = time.monotonic() + 10
        while len(cli_runs(tmp_path)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(cli_runs(tmp_path)) == 3, "the slow prompt never started"
        console.say("/status")
        console.wait_for(r"^\[bot · webhook\] 任务 \w+: 执行中")
        console.say("/cancel")
        cancelled = console.wait_for(r"^\[bot · webhook\] 已取消任务 (\w+)$").group(1)
        assert cancelled == slow_id
        started = time.monotonic()
        assert console.close() == 0
        assert time.monotonic() - started < 5
    finally:
        if console.proc.poll() is None:
            console.proc.kill()
    assert not run_alive(cli_runs(tmp_path)[2])
    assert "> 你好" in console.text and "> /cancel" in console.text
    log = (tmp_path / "logs" / "bot.log").read_text(encoding="utf-8")
    assert "检测到长时间任务" in log and "任务结果已回复" in log


def test_console_end_of_input_waits_for_running_tasks(tmp_path):
    result = subprocess.run([sys.executable, BOT, "console", "--user", "alice"], cwd=tmp_path, env=_env(tmp_path),
                            input="生成报告 [sleep=1]\n/tasks\n", capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\[bot · webhook · markdown \"CodeBuddy 回复\"\] \*\*任务 \w+ 已完成\*\*", result.stdout)
    assert "最近的任务" in result.stdout
    assert cli_runs(tmp_path)[0]["prompt"] == "生成报告 [sleep=1]"


def test_console_sender_takes_the_path_the_real_sender_would():
    out = io.StringIO()
    sender = console.ConsoleSender(out, wall_clock=lambda: 1000.0)
    alive = Route(conversation_type="1", user_id="u1", conversation_id="c", session_webhook="x",
                  webhook_expires_ms=2_000_000)
    expired = Route(conversation_type="2", user_id="u1", conversation_id="c", session_webhook="x",
                    webhook_expires_ms=1_000)
    assert sender.send(alive, "a\nb").path == "webhook"
    assert sender.send(alive, "pushed", allow_webhook=False).path == "batchSend"
    assert sender.send(expired, "group", markdown=True, title="T").path == "group"
    assert out.getvalue().splitlines() == ["[bot · webhook] a", "  b", "[bot · push batchSend] pushed",
                                           '[bot · push group · markdown "T"] group']
    assert sender.stats == {"webhook_ok": 1, "batchSend_ok": 1, "group_ok": 1}


# ---------------------------------------------------------------- sd_notify


class _NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET; collects every message."""

    def __init__(self, address: str) -> None:
        self.name = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                self.messages.append(self.sock.recv(4096).decode("utf-8"))
            except TimeoutError:
                continue
            except OSError:
                return

    def wait_for(self, field: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if field in message.split("\n"):
                    return message
            time.sleep(0.02)
        raise AssertionError(f"no {field} in {self.messages}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_notifier_writes_to_path_and_abstract_sockets(tmp_path):
    for address in (str(tmp_path / "notify.sock"), f"@dingtalk-bot-test-{uuid.uuid4().hex}"):
        receiver = _NotifySocket(address)
        try:
            notifier = systemd_notify.SystemdNotifier.from_environ({"NOTIFY_SOCKET": address,
                                                                    "WATCHDOG_USEC": "4000000"})
            assert notifier.watchdog_interval == 2.0
            assert notifier.ready("up") and notifier.watchdog() and notifier.stopping()
            receiver.wait_for("STOPPING=1")
            assert receiver.messages[:2] == ["READY=1\nSTATUS=up", "WATCHDOG=1"]
        finally:
            receiver.close()


def test_notifier_is_a_no_op_outside_systemd_and_ignores_another_pids_watchdog():
    assert not systemd_notify.SystemdNotifier.from_environ({}).ready()
    assert systemd_notify.SystemdNotifier.from_environ({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000",
                                             "WATCHDOG_PID": "1"}, pid=2).watchdog_interval == 0
    assert not systemd_notify.SystemdNotifier("/nonexistent/notify.sock").ready()  # a failed send never raises


def test_ready_is_sent_after_the_timeout_when_the_stream_never_connects():
    sent: list[tuple[str, ...]] = []
    notifier = systemd_notify.SystemdNotifier("@unused", watchdog_usec=20_000)
    notifier.notify = lambda *fields: sent.append(fields) or True  # type: ignore[method-assign]

    async def scenario() -> None:
        task = asyncio.create_task(systemd_notify.notify_systemd(notifier, lambda: False, ready_timeout=0.1, poll=0.01))
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(scenario())
    firsts = [fields[0] for fields in sent]
    assert firsts.count("READY=1") == 1 and firsts.index("READY=1") > 0  # not before the timeout
    assert firsts.count("WATCHDOG=1") >= 5


def test_daemon_tells_systemd_ready_watchdog_and_stopping(make_bot):
    receiver = _NotifySocket(f"@dingtalk-bot-test-{uuid.uuid4().hex}")
    try:
        bot = make_bot(NOTIFY_SOCKET=receiver.name, WATCHDOG_USEC="300000")
        ready = receiver.wait_for("READY=1")
        assert "STATUS=DingTalk Stream connected" in ready.split("\n")
        receiver.wait_for("WATCHDOG=1")
        assert not any("STOPPING=1" in m for m in receiver.messages)
        assert bot.terminate() == 0
        receiver.wait_for("STOPPING=1", timeout=2)
    finally:
        receiver.close()


# ---------------------------------------------------------------- /healthz and /metrics


def _parse_metrics(text: str, host: str | None = None) -> dict[tuple[str, frozenset], float]:
    """Every sample by name and labels; with `host`, each must carry host="<host>" (the key leaves it out)."""
    samples = {}
    for family in metrics_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if host is not None:
                assert labels.pop("host", None) == host, sample
            samples[(sample.name, frozenset(labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_status_port_serves_healthz_and_metrics(standin, make_bot):
    bot = make_bot(STATUS_PORT="0", HOST_NAME="bot-a")
    port = bot.status_port()
    base = f"http://127.0.0.1:{port}"
    healthy = {"status": "ok", "stream_connected": True, "stream_connections": {"live": 2, "wanted": 2},
               "store_writable": True, "store_pending": 0, "dead_threads": [],
               "warm_processes": {"live": 0, "idle": 0, "busy": 0, "spares": 0, "capacity": 4, "hits": 0,
                                  "misses": 0, "adopted": 0, "ended": 0, "rss_bytes": 0}}
    # Both connections up and the start's own writes (the host's row, …) committed, which store_pending counts: a
    # moment's write in flight is not a fault, so the answer is awaited whole (the last one read is compared).
    answers: list[tuple[int, str]] = []
    with contextlib.suppress(AssertionError):
        standin.wait_for(lambda: answers.append(_get(base + "/healthz")) or (
            answers[-1][0] == 200 and json.loads(answers[-1][1]) == healthy), timeout=20)
    status, body = answers[-1]
    assert status == 200, body
    assert json.loads(body) == healthy

    short = standin.send_bot_message("你好", sender_staff_id="u1")
    standin.wait_for(lambda: len(standin.webhook_posts(short.session)) >= 2)
    send_pushed(standin, "生成报告: 本周", sender_staff_id="u2")
    standin.wait_for(lambda: standin.batch_sends())
    bot.wait_log("任务结果已推送")
    again = standin.send_bot_message("再问一次", sender_staff_id="u1")
    standin.wait_for(lambda: len(standin.webhook_posts(again.session)) >= 2)

    status, text = _get(base + "/metrics")
    assert status == 200
    samples = _parse_metrics(text, host="bot-a")  # several processes on one app: each sample says whose
    assert _value(samples, "dingtalk_bot_deliveries_total", path="webhook") == 5  # 3 acks + 2 answers
    assert _value(samples, "dingtalk_bot_deliveries_total", path="batchSend") == 1
    assert _value(samples, "dingtalk_bot_delivery_failures_total", path="group") == 0
    assert _value(samples, "dingtalk_bot_token_fetches_total") == 1
    assert _value(samples, "dingtalk_bot_api_calls_total", kind="batchSend") == 1  # the month's budget
    assert _value(samples, "dingtalk_bot_api_calls_month", month=month_of(time.time())) == 1
    assert _value(samples, "dingtalk_bot_api_call_budget") == 5000
    assert _value(samples, "dingtalk_bot_api_quota_exhausted") == 0
    assert _value(samples, "dingtalk_bot_tasks", status="succeeded") == 3
    assert _value(samples, "dingtalk_bot_usage_runs_total") == 3  # usage/: every run recorded
    assert _value(samples, "dingtalk_bot_usage_tokens_total", kind="input") == 0  # the fake CLI reported none
    assert _value(samples, "dingtalk_bot_queue_length") == 0
    assert _value(samples, "dingtalk_bot_running_tasks") == 0
    # Two conversations, two warm processes; u1's second message went to the process of its first.
    assert _value(samples, "dingtalk_bot_cli_processes") == 2
    assert _value(samples, "dingtalk_bot_warm_processes", state="idle") == 2
    assert _value(samples, "dingtalk_bot_warm_processes", state="busy") == 0
    assert _value(samples, "dingtalk_bot_warm_runs_total", result="hit") == 1
    assert _value(samples, "dingtalk_bot_warm_runs_total", result="miss") == 2
    assert _value(samples, "dingtalk_bot_warm_capacity") == 4
    assert _value(samples, "dingtalk_bot_warm_memory_bytes") > 10 * 2**20  # two Python fake CLIs, at least
    assert _value(samples, "dingtalk_bot_stream_connected") == 1
    assert _value(samples, "dingtalk_bot_stream_connections", state="live") == 2
    assert _value(samples, "dingtalk_bot_stream_connections", state="wanted") == 2
    assert _value(samples, "dingtalk_bot_stream_reconnects_total") == 0
    assert _value(samples, "dingtalk_bot_task_duration_seconds_count", outcome="succeeded") == 3
    assert _value(samples, "dingtalk_bot_task_duration_seconds_bucket", outcome="succeeded", le="+Inf") == 3
    assert _value(samples, "dingtalk_bot_task_duration_seconds_bucket", outcome="succeeded", le="5") == 3
    assert _value(samples, "dingtalk_bot_task_duration_seconds_count", outcome="failed") == 0
    assert _get(base + "/nothing")[0] == 404


WARM_STATS = {"live": 1, "idle": 0, "busy": 1, "capacity": 4, "hits": 3, "misses": 1, "ended": 0, "rss_bytes": 1}


def _sources(tmp_path: Path, connected: bool, store=None, dead=()) -> metrics.StatusSources:
    return metrics.StatusSources(
        manager=SimpleNamespace(stats={"tasks_running": 1, "queue_length": 2, "running": 1},
                                outbox=SimpleNamespace(waiting_retries=0)),
        sender=SimpleNamespace(stats={"webhook_failed": 4}, tokens=SimpleNamespace(fetches=0)),
        client=SimpleNamespace(running_processes=1, warm_stats=lambda: dict(WARM_STATS)),
        stream=SimpleNamespace(connected=connected, reconnects=3),
        store=store if store is not None else MemoryTaskStore(), supervisor=SimpleNamespace(dead=lambda: list(dead)),
        intake=SimpleNamespace(backlog_age=lambda now: 0.0), durations=metrics.DurationHistogram())


def test_healthz_is_503_or_degraded_and_says_why(tmp_path):
    server = status_server.StatusServer(_sources(tmp_path, connected=False, dead=["worker-2"]), 0).start()
    try:
        assert server._server.server_address[0] == "127.0.0.1"
        status, body = _get(f"http://127.0.0.1:{server.port}/healthz")
        body = json.loads(body)
        assert status == 503 and body["status"] == "unhealthy" and body["stream_connected"] is False
        assert body["dead_threads"] == ["worker-2"]
        assert body["reasons"] == ["thread worker-2 is dead", "DingTalk Stream not connected"]
    finally:
        server.stop()
    down = SimpleNamespace(health=lambda: StoreHealth(ok=False, reason="database is locked", pending=7))
    degraded = status_server.StatusServer(_sources(tmp_path, connected=True, store=down), 0).start()
    try:
        status, body = _get(f"http://127.0.0.1:{degraded.port}/healthz")
        body = json.loads(body)
        assert status == 200 and body["status"] == "degraded" and body["store_writable"] is False
        assert body["store_error"] == "database is locked" and body["store_pending"] == 7
    finally:
        degraded.stop()


def test_metrics_histogram_and_counters_render_in_prometheus_format(tmp_path):
    sources = _sources(tmp_path, connected=True)
    timed = metrics.TimedClient(SimpleNamespace(run=lambda prompt, **kw: RunResult(ok=False, timed_out=True,
                                                                               duration=float(prompt)),
                                            running_processes=1), sources.durations)
    for seconds in ("0.5", "45", "5000"):
        timed.run(seconds)
    assert timed.running_processes == 1  # everything else passes through
    samples = _parse_metrics(metrics.render_metrics(sources))
    buckets = {le: _value(samples, "dingtalk_bot_task_duration_seconds_bucket", outcome="timed_out", le=le)
               for le in ("1", "30", "60", "3600", "+Inf")}
    assert buckets == {"1": 1, "30": 1, "60": 2, "3600": 2, "+Inf": 3}
    assert _value(samples, "dingtalk_bot_task_duration_seconds_sum", outcome="timed_out") == 5045.5
    assert _value(samples, "dingtalk_bot_delivery_failures_total", path="webhook") == 4
    assert _value(samples, "dingtalk_bot_stream_reconnects_total") == 3
    assert _value(samples, "dingtalk_bot_tasks", status="running") == 1
    assert _value(samples, "dingtalk_bot_tasks", status="queued") == 0


def test_status_port_already_taken_is_logged_not_fatal(tmp_path, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert status_server.start_status_server(port, _sources(tmp_path, True)) is None
    assert "状态服务无法监听" in caplog.text
    assert status_server.start_status_server(None, _sources(tmp_path, True)) is None
