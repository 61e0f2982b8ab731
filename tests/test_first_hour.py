"""The first hour: from `git clone` to a first answer without guessing (issue 12).

Each test runs `python bot.py …` as a subprocess, as a new operator would, against the local DingTalk
stand-in and the fake CLI (or the real one from the wheel where only it shows the behaviour).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import ROOT, fake_cli_env

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
