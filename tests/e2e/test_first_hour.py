"""The first hour: from `git clone` to a first answer without guessing (issue 12).

Each test runs `python bot.py …` as a subprocess, as a new operator would, against the local DingTalk
stand-in and the fake CLI (or the real one from the wheel where only it shows the behaviour).
"""

from __future__ import annotations

import os
import pty
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from codebuddy.cli_setup import CliChoice, choose_cli
from dingtalk.route import Route
from dingtalk_sender import HttpError, JsonHttp, open_stream_connection
from store.sqlite import SQLiteTaskStore
from tasks.admission import HELD_BY_CONVERSATION, HELD_BY_USER, HELD_BY_WORKERS, Limits, Occupancy
from tasks.task import Task
from tests.conftest import CLI_START_TIMEOUT, CLIENT_ID, CLIENT_SECRET, ROOT, fake_cli_env, real_cli_path, replies

BOT = str(ROOT / "bot.py")


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """A clean environment: no DINGTALK_/CODEBUDDY_ variables of the caller, every path inside tmp_path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DINGTALK_", "CODEBUDDY_", "NOTIFY_SOCKET", "WATCHDOG_", "LOG_FILE", "TASK_DB"))}
    env.update({"NO_PROXY": "127.0.0.1,localhost", "HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1",
                **fake_cli_env(tmp_path), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
                "TASK_DB": str(tmp_path / "data" / "tasks.db")})
    env.update(overrides)
    return {k: v for k, v in env.items() if v is not None}


def _run(tmp_path: Path, *args: str, timeout: float = 60, input: str | None = None,
         **overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BOT, *args], cwd=tmp_path, env=_env(tmp_path, **overrides),
                          capture_output=True, text=True, timeout=timeout, input=input,
                          stdin=None if input is not None else subprocess.DEVNULL)


# ---------------------------------------------------------------- 1. example values


def test_example_values_stop_the_bot_at_once_with_one_message_naming_each_setting(tmp_path):
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    started = time.monotonic()
    result = _run(tmp_path, "run", timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 10  # no connection attempt with "your-app-key"
    message = result.stderr
    assert message.startswith("配置错误: 3 settings to fix in ") and "Traceback" not in message
    lines = message.splitlines()
    assert [line.split()[1] for line in lines[1:4]] == ["DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET",
                                                       "CODEBUDDY_API_KEY"]
    assert "凭证与基础信息" in lines[1] and "Client Secret" in lines[2] and "codebuddy.ai" in lines[3]


def test_console_and_tasks_need_no_dingtalk_credentials_but_a_real_codebuddy_key(tmp_path):
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    refused = _run(tmp_path, "console", input="你好\n")
    assert refused.returncode == 2 and refused.stderr.startswith("配置错误: CODEBUDDY_API_KEY still holds")
    assert "DINGTALK" not in refused.stderr
    assert _run(tmp_path, "tasks").stderr.startswith("no task DB")  # tasks reads the DB only
    text = (tmp_path / ".env").read_text().replace("your-codebuddy-api-key", "ck-test-key")
    (tmp_path / ".env").write_text(text)
    answered = _run(tmp_path, "console", input="你好\n")
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "回答: 你好" in answered.stdout


# ---------------------------------------------------------------- 2 and 9. where the log goes


def _daemon(tmp_path: Path, standin, stderr, **overrides: str) -> subprocess.Popen:
    env = _env(tmp_path, DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET=CLIENT_SECRET,
               DINGTALK_OPENAPI_ENDPOINT=standin.base_url, CODEBUDDY_API_KEY="ck-test", SHUTDOWN_GRACE="2",
               **overrides)
    return subprocess.Popen([sys.executable, BOT, "run"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def test_on_a_terminal_log_lines_also_show_there_and_the_file_stays_the_record(tmp_path, standin):
    log_file = tmp_path / "logs" / "bot.log"
    master, slave = pty.openpty()
    proc = _daemon(tmp_path, standin, slave, LOG_FILE=str(log_file))
    os.close(slave)
    terminal: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the bot closed the terminal
                return
            if not chunk:
                return
            terminal.append(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        standin.wait_connected(timeout=20)
        sent = standin.send_bot_message("你好", sender_staff_id="tty1")
        assert "回答: 你好" in replies(standin, sent, 2)[1]
        deadline = time.monotonic() + 10
        while "任务结果已回复" not in b"".join(terminal).decode("utf-8", "replace") and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
        reader.join(5)
        os.close(master)
    shown = b"".join(terminal).decode("utf-8").replace("\r\n", "\n")
    assert f"\n日志: {log_file} (also shown on this terminal)\n" in shown
    record = log_file.read_text(encoding="utf-8")
    for phrase in ("钉钉 Stream 已连接", "创建任务", "任务结果已回复", "机器人已停止"):
        assert phrase in shown and phrase in record


def test_a_trial_run_without_log_file_logs_to_stderr_and_writes_no_log_file(tmp_path, standin):
    production_log = Path("/var/log/dingtalk-bot.log")
    before = production_log.stat().st_mtime_ns if production_log.exists() else None
    proc = _daemon(tmp_path, standin, subprocess.PIPE)
    try:
        standin.wait_connected(timeout=20)
        sent = standin.send_bot_message("你好", sender_staff_id="trial1")
        assert "回答: 你好" in replies(standin, sent, 2)[1]
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = stderr.decode("utf-8").splitlines()
    said = lines.index("日志: stderr (LOG_FILE is unset or cannot be opened)")
    assert said < next(i for i, line in enumerate(lines) if "钉钉 Stream 已连接" in line)
    assert any("创建任务" in line for line in lines) and any("机器人已停止" in line for line in lines)
    assert (production_log.stat().st_mtime_ns if production_log.exists() else None) == before
    assert not list(tmp_path.rglob("*.log"))


# ---------------------------------------------------------------- 3. connection failures: the host and the cause


@contextmanager
def _refusing_port() -> Iterator[int]:
    """A loopback port that refuses connections while held: bound and never listening, so no other process (a
    parallel test's server, say) can take it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _failure(http: JsonHttp, url: str) -> str:
    with pytest.raises(HttpError) as raised:
        http.post_json(url, {})
    return str(raised.value)


def test_connection_failures_name_the_host_and_the_cause(standin):
    http = JsonHttp(pool_size=1, transport_retries=0, timeout=(0.5, 0.5))
    with _refusing_port() as closed:
        assert _failure(http, f"http://127.0.0.1:{closed}/x").startswith(
            f"127.0.0.1:{closed} connection refused (NewConnectionError: Failed to establish a new connection: "
            "[Errno 111] Connection refused)")
    tls = _failure(http, standin.base_url.replace("http://", "https://") + "/v1.0/oauth2/accessToken")
    assert tls.startswith(f"127.0.0.1:{standin.base_url.rsplit(':', 1)[1]} TLS handshake failed (SSLError: ")
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        assert _failure(http, f"http://127.0.0.1:{port}/x").startswith(
            f"127.0.0.1:{port} no answer in time (read timeout) (ReadTimeoutError: ")
    with socket.socket() as full:  # a full accept queue: the kernel drops the next SYN, so connect() waits
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        port = full.getsockname()[1]
        waiting = []
        while True:  # fill the queue until a connect() waits
            try:
                waiting.append(socket.create_connection(("127.0.0.1", port), timeout=0.3))
            except TimeoutError:
                break
        try:
            assert _failure(http, f"http://127.0.0.1:{port}/x").startswith(
                f"127.0.0.1:{port} connect timed out (ConnectTimeoutError: ")
        finally:
            for sock in waiting:
                sock.close()
    connection, error = open_stream_connection(http, standin.base_url, CLIENT_ID, "wrong-secret")
    assert connection is None and error == f"HTTP 401 InvalidAuthentication from {standin.base_url[7:]}"
    http.close()


def test_check_names_a_dns_failure_with_its_host(tmp_path):
    """In a network namespace of its own (no network at all) the name cannot resolve, and nothing leaves."""
    env = _env(tmp_path, DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET=CLIENT_SECRET,
               DINGTALK_OPENAPI_ENDPOINT="https://dingtalk-standin.invalid", CODEBUDDY_API_KEY="ck-test")
    result = subprocess.run(["unshare", "--user", "--map-root-user", "--net", sys.executable, BOT, "check"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = {line.split(":")[0]: line for line in result.stdout.splitlines() if line.startswith(("✓", "✗"))}
    dns = "dingtalk-standin.invalid:443 DNS lookup failed (NameResolutionError: Failed to resolve "
    assert lines["✗ DingTalk access token"].startswith(f"✗ DingTalk access token: access token request failed: {dns}")
    assert lines["✗ DingTalk Stream"].startswith(f"✗ DingTalk Stream: unreachable: {dns}")


def test_the_daemon_logs_the_host_and_cause_of_each_failed_connection(standin, make_bot):
    with _refusing_port() as closed:
        bot = make_bot(connect=False, DINGTALK_OPENAPI_ENDPOINT=f"http://127.0.0.1:{closed}")
        line = bot.wait_log("连接钉钉 Stream 失败")[0]
        assert f"连接钉钉 Stream 失败: unreachable: 127.0.0.1:{closed} connection refused" in line
        bot.terminate()
    standin.fail_next("/connect", status=403, body={"code": "Forbidden"})
    bot = make_bot()  # the first websocket is refused, the reconnect succeeds
    line = bot.wait_log("钉钉 Stream 连接中断")[0]
    port = standin.base_url.rsplit(":", 1)[1]
    assert f"钉钉 Stream 连接中断: 127.0.0.1:{port} refused the connection: HTTP 403 (InvalidStatus: " in line


# ---------------------------------------------------------------- 4. the CLI from the wheel, and whether it can sign in


def test_the_cli_is_codebuddy_bin_then_codebuddy_on_path_then_the_wheels(tmp_path):
    wheel = real_cli_path()
    assert choose_cli("codebuddy", path=str(tmp_path)) == CliChoice(
        str(wheel), "the codebuddy-agent-sdk wheel (CODEBUDDY_BIN unset, no `codebuddy` on PATH)")
    on_path = tmp_path / "codebuddy"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert choose_cli("codebuddy", path=str(tmp_path)).origin == f"`codebuddy` on PATH: {on_path}"
    assert choose_cli("/opt/cb/codebuddy", path=str(tmp_path)) == CliChoice("/opt/cb/codebuddy", "CODEBUDDY_BIN",
                                                                          found=False)


def _wheel_copy(tmp_path: Path) -> Path:
    """A codebuddy-agent-sdk package inside the bot's working directory (like a .venv in the checkout), its CLI
    copied without the run bit, as an unzip by hand leaves it."""
    package = tmp_path / "site" / "codebuddy_agent_sdk"
    (package / "bin").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    binary = package / "bin" / "codebuddy-headless"
    shutil.copyfile(real_cli_path(), binary)
    binary.chmod(0o644)
    return binary


@pytest.mark.real_cli
def test_without_codebuddy_bin_the_wheels_cli_runs_in_its_jail_and_check_says_so(tmp_path, standin, make_bot,
                                                                                 model_server):
    binary = _wheel_copy(tmp_path)
    path = "/usr/local/bin:/usr/bin:/bin"
    real = {"CODEBUDDY_BASE_URL": model_server.base_url, "CODEBUDDY_API_KEY": "fake-key-for-tests",
            "PYTHONPATH": str(tmp_path / "site"), "PATH": path, "CODEBUDDY_PERMISSION_MODE": "bypassPermissions",
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
            "CODEBUDDY_SKIP_BUILTIN_MARKETPLACE": "1"}
    checked = _run(tmp_path, "check", DINGTALK_CLIENT_ID=CLIENT_ID, DINGTALK_CLIENT_SECRET=CLIENT_SECRET,
                   DINGTALK_OPENAPI_ENDPOINT=standin.base_url, CODEBUDDY_BIN=None, CODEBUDDY_SANDBOX_PATHS=None,
                   **real)
    cli_line = next(line for line in checked.stdout.splitlines() if "CodeBuddy CLI:" in line)
    assert cli_line == (f"✓ CodeBuddy CLI: {binary} 2.163.0 (from the codebuddy-agent-sdk wheel (CODEBUDDY_BIN unset, "
                        "no `codebuddy` on PATH))"), checked.stdout
    assert os.access(binary, os.X_OK)  # the lost run bit was restored
    assert "✓ CodeBuddy login: CODEBUDDY_API_KEY is set" in checked.stdout
    bot = make_bot(**real, CODEBUDDY_BIN="codebuddy", CODEBUDDY_SANDBOX_PATHS="")
    bot.wait_log(rf"CodeBuddy CLI: {binary} \(the codebuddy-agent-sdk wheel")
    sent = standin.send_bot_message("你好 wheel [bash:pwd; echo $HOME]", sender_staff_id="wheel1")
    answer = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= 2
                              and standin.webhook_posts(sent.session), timeout=CLI_START_TIMEOUT)[1]
    assert "回答: 你好 wheel" in answer.text
    assert "Stdout: /workspace\n/home/codebuddy" in answer.text, answer.text  # it ran in its jail


def test_check_says_whether_runs_can_sign_in_and_how_to_fix_it(tmp_path, standin):
    base = {"DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
            "DINGTALK_OPENAPI_ENDPOINT": standin.base_url}
    login = tmp_path / "home" / ".local/share/CodeBuddyExtension/Data/Public/auth/abc.info"
    login.parent.mkdir(parents=True)
    login.write_text("{}")  # a /login made in the operator's own home
    result = _run(tmp_path, "check", **base)
    line = next(line for line in result.stdout.splitlines() if "CodeBuddy login" in line)
    assert result.returncode == 1 and line.startswith("✗ CodeBuddy login: no CODEBUDDY_API_KEY or "
                                                      "CODEBUDDY_AUTH_TOKEN: every prompt would fail")
    assert f"the /login kept in {login.parent} is not seen by runs" in line and "Fix: put CODEBUDDY_API_KEY=" in line
    (tmp_path / ".env").write_text("CODEBUDDY_API_KEY=ck-from-dotenv\nCODEBUDDY_INTERNET_ENVIRONMENT=internal\n")
    result = _run(tmp_path, "check", **base)
    assert ("✓ CodeBuddy login: CODEBUDDY_API_KEY is set; runs sign in with it, at "
            "CODEBUDDY_INTERNET_ENVIRONMENT=internal") in result.stdout
    assert "ck-from-dotenv" not in result.stdout


@pytest.mark.real_cli
def test_the_real_cli_without_credentials_is_told_to_the_chat_as_the_administrators_job(standin, make_bot):
    quiet = {"DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
             "CODEBUDDY_SKIP_BUILTIN_MARKETPLACE": "1"}
    bot = make_bot(CODEBUDDY_BIN=str(real_cli_path()), **quiet)  # no CODEBUDDY_API_KEY anywhere
    bot.wait_log("CodeBuddy 账号未设置: no CODEBUDDY_API_KEY")  # said at start already
    for number in range(2):
        sent = standin.send_bot_message(f"你好 {number}", sender_staff_id="nologin")
        answer = standin.wait_for(lambda s=sent: len(standin.webhook_posts(s.session)) >= 2
                                  and standin.webhook_posts(s.session), timeout=CLI_START_TIMEOUT)[1].text
        assert answer.startswith("CodeBuddy 执行失败: 机器人的 CodeBuddy 账号尚未设置好，请联系管理员。")
        assert "/login" not in answer and "Authentication" not in answer
    told = [line for line in bot.log_text().splitlines() if "CodeBuddy CLI 无法登录" in line]
    assert len(told) == 1 and "Please use /login" in told[0] and "CODEBUDDY_API_KEY=" in told[0]


# ---------------------------------------------------------------- 7. what holds a task back


def test_a_second_message_in_the_same_chat_waits_for_the_first_and_says_so(tmp_path):
    result = _run(tmp_path, "console", input="写个脚本 [sleep=2]\n第二条\n/status\n", CODEBUDDY_API_KEY="ck-test")
    assert result.returncode == 0, result.stdout + result.stderr
    acks = [line for line in result.stdout.splitlines() if "收到任务" in line or line.startswith("  排队中")]
    assert acks[1].startswith("[bot · webhook] 收到任务，正在处理中…")
    assert acks[2] == "  排队中: 等待本会话上一条完成后自动开始 (同一会话的消息依次处理)。"
    assert "第 1 位" not in result.stdout  # the workers were idle: no worker queue position
    assert "  等待本会话上一条完成 (同一会话的消息依次处理)" in result.stdout  # /status of the second
    assert result.stdout.index("回答: 写个脚本") < result.stdout.index("回答: 第二条")


def test_the_waiting_reason_is_the_chat_the_users_limit_or_the_workers():
    limits = Limits(max_workers=2, max_tasks_per_user=1)

    def task(task_id: str, user: str, chat: str) -> Task:
        return Task(task_id, user, "", chat, Route("1", user, chat), "p")

    running = [task("r1", "alice", "chat-a")]
    occupancy = Occupancy(running, limits)
    assert occupancy.holdback(task("t1", "bob", "chat-a")) == HELD_BY_CONVERSATION
    assert occupancy.holdback(task("t2", "alice", "chat-b")) == HELD_BY_USER
    assert occupancy.holdback(task("t3", "bob", "chat-b")) == ""
    assert occupancy.holdback(task("t4", "carol", "chat-c"), ahead=[task("t3", "bob", "chat-b")]) == HELD_BY_WORKERS
    assert occupancy.holdback(task("t5", "bob", "chat-b"), ahead=[task("t3", "bob", "chat-b")]) == \
        HELD_BY_CONVERSATION  # an earlier message of the chat waits: this one comes after it
    # bob's message in another chat, while his first one waits to start (not running yet): his limit holds it.
    assert occupancy.holdback(task("t7", "bob", "chat-e"), ahead=[task("t3", "bob", "chat-b")]) == HELD_BY_USER
    assert Occupancy(running + [task("r2", "bob", "chat-d")], limits).holdback(task("t6", "carol", "x")) == \
        HELD_BY_WORKERS


# ---------------------------------------------------------------- 8. the task table


def test_tasks_shows_why_a_task_failed_durations_local_time_with_zone_and_how_many_more(tmp_path):
    db = tmp_path / "data" / "tasks.db"
    store = SQLiteTaskStore(str(db))
    created = 1_772_263_800.0  # 2026-02-28 07:30:00 UTC
    rows = [("t0000001", "succeeded", 45, ""), ("t0000002", "timed_out", 1800, "执行超时 (超过 1800 秒)"),
            ("t0000003", "failed", 7200, "机器人的 CodeBuddy 账号尚未设置好，请联系管理员。"),
            ("t0000004", "succeeded", 5430, "")]
    for number, (task_id, status, seconds, error) in enumerate(rows):
        store.save(Task(task_id, "u1", "", "u1", Route("1", "u1", ""), f"问题 {number}", status=status,
                        created_at=created + number, finished_at=created + number + seconds, error=error))
    store.close()
    result = _run(tmp_path, "tasks", "--limit", "3", TZ="Asia/Shanghai")
    assert result.returncode == 0, result.stderr
    header, *table, footer = result.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "USER", "CREATED", "ELAPSED", "MODE", "DELIVERED", "REASON", "PROMPT"]
    cells = {line.split()[0]: line for line in table}
    assert list(cells) == ["t0000004", "t0000003", "t0000002"]  # newest first, cut at 3
    assert "2026-02-28 15:30:03 +0800  1h30m " in cells["t0000004"]
    assert " 2h " in cells["t0000003"] and "机器人的 CodeBuddy 账号尚未设置好" in cells["t0000003"]
    assert " 30m " in cells["t0000002"] and "执行超时 (超过 1800 秒)" in cells["t0000002"]
    assert footer == f"3 task(s), newest first, from {db}; 1 more (--limit 4 shows them all)"
    everything = _run(tmp_path, "tasks", "--limit", "10", TZ="UTC").stdout
    assert "2026-02-28 07:30:00 +0000  45s " in everything and "more" not in everything.splitlines()[-1]


# ---------------------------------------------------------------- 8. check on a bad configuration


def test_check_on_a_bad_configuration_prints_the_settings_every_problem_and_every_check(tmp_path):
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    result = _run(tmp_path, "check", SYNC_TIMEOUT="soon", MAX_WORKERS="0")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("Settings (.env and the environment; the environment wins):\n")
    assert re.search(r"^  DINGTALK_CLIENT_ID +your-app-key  ✗  \[\.env\]$", out, re.M)
    assert re.search(r"^  SYNC_TIMEOUT +soon  ✗  \[environment\]$", out, re.M)
    assert re.search(r"^  TASK_TIMEOUT +1800.0  \[default\]$", out, re.M)
    problems = re.findall(r"^    - (\w+)", out, re.M)
    assert problems == ["DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET", "CODEBUDDY_API_KEY", "SYNC_TIMEOUT",
                        "MAX_WORKERS"]
    marks = [line.split(":")[0] for line in out.splitlines() if line.startswith(("✓", "✗"))]
    assert marks == ["✗ configuration", "✗ DingTalk access token", "✗ DingTalk Stream", "✓ CodeBuddy CLI",
                     "✗ CodeBuddy login", "✓ sandbox", "✓ workspace", "✓ task DB", "✓ log file"]
    assert "✗ configuration: 5 settings to fix" in out
    assert ("✗ DingTalk access token: not tried: DINGTALK_CLIENT_ID and DINGTALK_CLIENT_SECRET not filled in"
            in out)
    assert out.rstrip().endswith("4 of 9 checks failed.")


# ---------------------------------------------------------------- 8. outside the venv


def test_outside_the_venv_even_help_is_one_line_saying_to_install(tmp_path):
    bare = tmp_path / "bare"  # a Python without the bot's packages, as `python3 bot.py` outside the venv is
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(bare)],
                   check=True, timeout=60)
    result = subprocess.run([str(bare / "bin" / "python"), BOT, "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=30, env=_env(tmp_path), stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("bot.py: dingtalk-stream, requests, python-dotenv, urllib3, psycopg, "
                                    "psycopg-pool, cronsim not installed for ")
    assert "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" in result.stderr


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_the_console_warns_at_start_when_the_cli_is_missing_and_the_chat_is_told_to_ask_the_administrator(
        tmp_path, sandbox):
    result = _run(tmp_path, "console", input="你好\n再问一次\n", CODEBUDDY_BIN=str(tmp_path / "no-such-codebuddy"),
                  CODEBUDDY_API_KEY="ck-test", CODEBUDDY_SANDBOX=sandbox)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = result.stderr.splitlines()
    assert any("WARNING - CodeBuddy CLI 未找到: " in line and "CODEBUDDY_BIN" in line for line in warnings)
    assert result.stdout.count("机器人的 CodeBuddy 尚未安装好，请联系管理员。") == 2
    assert len([line for line in warnings if "CodeBuddy CLI 无法启动" in line]) == 1  # once, not per task


def test_a_second_process_of_one_installation_is_refused_naming_host_name(standin, make_bot):
    first = make_bot()
    second = make_bot(connect=False)
    assert second.proc.wait(timeout=60) == 2
    said = second.output.read_text(encoding="utf-8") + second.log_text()
    assert "another bot process already runs as host" in said and "HOST_NAME" in said, said
    assert first.proc.poll() is None  # the first one goes on
