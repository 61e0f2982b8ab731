"""The first hour: from `git clone` to a first answer without guessing (issue 12).

Each test runs `python bot.py …` as a subprocess, as a new operator would, against the local DingTalk
stand-in and the fake CLI (or the real one from the wheel where only it shows the behaviour).
"""

from __future__ import annotations

import os
import pty
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import CLIENT_ID, CLIENT_SECRET, ROOT, fake_cli_env, replies

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
    assert shown.splitlines()[0] == f"日志: {log_file} (also shown on this terminal)"
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
    assert lines[0] == "日志: stderr (LOG_FILE is unset or cannot be opened)"
    assert any("创建任务" in line for line in lines) and any("机器人已停止" in line for line in lines)
    assert (production_log.stat().st_mtime_ns if production_log.exists() else None) == before
    assert not list(tmp_path.rglob("*.log"))
