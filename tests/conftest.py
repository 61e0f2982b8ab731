"""Shared fixtures: the local DingTalk stand-in and the bot run as a real subprocess (`python bot.py`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.standin import DingTalkStandin

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLI = ROOT / "tests" / "fake_codebuddy.py"
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-DO-NOT-LOG-42"

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def process_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cli_runs(tmp_path: Path) -> list[dict]:
    """The fake CLI's runs so far (one JSON line each: argv, prompt, pid, session, start)."""
    path = tmp_path / "cli-runs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def replies(standin: DingTalkStandin, sent, count: int, timeout: float = 15.0) -> list[str]:
    """The first `count` texts posted to one message's session webhook (waits for them)."""
    posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                             and standin.webhook_posts(sent.session), timeout=timeout)
    return [p.text or "" for p in posts]


class BotProcess:
    """`python bot.py` in its own directory, pointed at the stand-in; its log file is read by the tests."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.log_file = Path(env["LOG_FILE"])
        self.proc: subprocess.Popen | None = None
        self.output = workdir / "bot.out"

    def start(self) -> BotProcess:
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "bot.py"), *self.env.get("_ARGS", "").split()],
                                         cwd=self.workdir, env={k: v for k, v in self.env.items() if k != "_ARGS"},
                                         stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def log_text(self) -> str:
        return self.log_file.read_text(encoding="utf-8") if self.log_file.exists() else ""

    def wait_log(self, pattern: str, timeout: float = 15.0, count: int = 1) -> list[str]:
        """Wait until the log has `count` lines matching the regex `pattern`; return them."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log_text().splitlines() if re.search(pattern, line)]
            if len(lines) >= count:
                return lines
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"bot exited with {self.proc.returncode} before logging {pattern!r}:\n"
                                     f"{self.log_text()[-3000:]}\n{self.output.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r} (x{count}) in {timeout}s:\n"
                                     f"{self.log_text()[-4000:]}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def standin():
    server = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def make_bot(tmp_path, standin):
    """Factory: make_bot(SYNC_TIMEOUT="2", ...) returns a started BotProcess connected to the stand-in."""
    bots: list[BotProcess] = []
    home = tmp_path / "home"
    home.mkdir()

    def factory(connect: bool = True, **overrides: str) -> BotProcess:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("DINGTALK_", "CODEBUDDY_", "FAKE_CODEBUDDY_"))}
        env.update({
            "NO_PROXY": "127.0.0.1,localhost", "HOME": str(home), "PYTHONUNBUFFERED": "1",
            "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
            "DINGTALK_OPENAPI_ENDPOINT": standin.base_url,
            "CODEBUDDY_BIN": str(FAKE_CLI), "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
            "LOG_FILE": str(tmp_path / "logs" / "bot.log"), "TASK_DB": str(tmp_path / "data" / "tasks.db"),
            "FAKE_CODEBUDDY_LOG": str(tmp_path / "cli-runs.jsonl"),
            "FAKE_CODEBUDDY_PIDS": str(tmp_path / "cli-children.txt"),
            "SHUTDOWN_GRACE": "3",
        })
        env.update(overrides)
        connects_before = standin.stream_connects
        bot = BotProcess(tmp_path, env).start()
        bots.append(bot)
        if connect:
            standin.wait_connected(timeout=20, connects_at_least=connects_before + 1)
        return bot

    yield factory
    for bot in bots:
        if bot.proc is not None and bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait(timeout=10)
