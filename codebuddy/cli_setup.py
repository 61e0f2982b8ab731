"""Which CodeBuddy CLI the bot runs and whether it can sign in, and how an operator-side failure reads.

The CLI: CODEBUDDY_BIN; left at `codebuddy` and not on PATH, the CLI shipped in the `codebuddy-agent-sdk` wheel
(requirements.txt installs it where PyPI has a wheel). Signing in: only the environment counts, because every run
has a home of its own (docs/wire-facts.md §4), so a `/login` made in any other home is never seen.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
import shutil
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from config import EXAMPLE_VALUES, setting_default

log = logging.getLogger("codebuddy_client")
R = TypeVar("R", bound=Any)

WHEEL_PACKAGE = "codebuddy_agent_sdk"
WHEEL_BINARY = os.path.join("bin", "codebuddy-headless")
# Where the CLI (2.163.0, read from the binary) keeps a /login: <home>/.local/share/CodeBuddyExtension/Data/Public/
# auth/<id>.info. Only used to tell the operator that such a login exists but no run will see it.
LOGIN_FILES = os.path.join(".local", "share", "CodeBuddyExtension", "Data", "Public", "auth", "*.info")
CREDENTIAL_VARIABLES = ("CODEBUDDY_AUTH_TOKEN", "CODEBUDDY_API_KEY")  # the CLI's own order of precedence
LOGIN_FIX = ("put CODEBUDDY_API_KEY=<a key of the bot's CodeBuddy account> in .env (and "
             "CODEBUDDY_INTERNET_ENVIRONMENT=internal for codebuddy.cn), restart the bot, then run `bot.py check`")
INSTALL_FIX = ("install it: `.venv/bin/pip install -r requirements.txt` ships it (Linux x86_64/aarch64, macOS), or "
               "`npm install -g @tencent-ai/codebuddy-code`; or set CODEBUDDY_BIN to its absolute path")
# What the CLI says when it cannot sign in: no credentials ("Authentication required. Please use /login …"),
# or a key the model service refuses ("401 Incorrect API key provided").
_AUTH_FAILURE = re.compile(r"authentication required|/login\b|^\s*401\b|\b(?:invalid|incorrect) api key|"
                           r"unauthori[sz]ed", re.I)
# In its jail a CLI that is missing or not executable is bwrap's failure to start it.
_CANNOT_START = re.compile(r"bwrap: execvp \S+: (?:No such file or directory|Permission denied)")


@dataclass(frozen=True)
class CliChoice:
    """The CLI to run (a name looked up on PATH, or a path) and how it was chosen."""

    path: str
    origin: str
    found: bool = True


def wheel_cli() -> str | None:
    """The CLI inside the installed codebuddy-agent-sdk wheel (its run bit restored if an unzip lost it), or None."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        binary = os.path.join(location, WHEEL_BINARY)
        if os.path.isfile(binary):
            if not os.access(binary, os.X_OK):
                try:
                    os.chmod(binary, os.stat(binary).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
                except OSError:
                    pass  # `check` says it is not executable, with the chmod to run
            return binary
    return None


def choose_cli(configured: str, path: str | None = None) -> CliChoice:
    """CODEBUDDY_BIN when set to anything but `codebuddy`; else `codebuddy` on PATH (`path`: default $PATH);
    else the wheel's CLI; else `codebuddy` marked as not found."""
    default = setting_default("CODEBUDDY_BIN")
    if configured != default:
        return CliChoice(configured, "CODEBUDDY_BIN", found=shutil.which(configured, path=path) is not None)
    on_path = shutil.which(default, path=path)
    if on_path:
        return CliChoice(default, f"`{default}` on PATH: {on_path}")
    wheel = wheel_cli()
    if wheel:
        return CliChoice(wheel, f"the codebuddy-agent-sdk wheel (CODEBUDDY_BIN unset, no `{default}` on PATH)")
    return CliChoice(default, f"no `{default}` on PATH and no codebuddy-agent-sdk wheel", found=False)


@dataclass(frozen=True)
class LoginState:
    """Whether CLI runs can authenticate (known without a model call), and what to do when they cannot."""

    ok: bool
    detail: str


def login_state(run_env: Mapping[str, str], operator_home: str) -> LoginState:
    """From the credentials a run's environment carries (`run_env`: the bot's environment plus the CLI variables
    of .env); `operator_home` is only searched for a /login that the runs would not see."""
    for name in CREDENTIAL_VARIABLES:
        if run_env.get(name, "").strip() not in ("", EXAMPLE_VALUES.get(name, ("",))[0]):
            site = run_env.get("CODEBUDDY_INTERNET_ENVIRONMENT", "").strip()
            where = f"CODEBUDDY_INTERNET_ENVIRONMENT={site}" if site else "the international site (codebuddy.ai)"
            return LoginState(True, f"{name} is set; runs sign in with it, at {where}")
    logins = sorted(glob.glob(os.path.join(operator_home, LOGIN_FILES)))
    unseen = (f"; the /login kept in {os.path.dirname(logins[0])} is not seen by runs (each conversation has a "
              "home of its own)") if logins else ""
    return LoginState(False, "no CODEBUDDY_API_KEY or CODEBUDDY_AUTH_TOKEN: every prompt would fail with "
                             f"'Authentication required'{unseen}. Fix: {LOGIN_FIX}")


@dataclass(frozen=True)
class OperatorProblem:
    """A failure only the operator can fix: what the chat user reads, and what the log tells the operator."""

    kind: str  # "login" or "install"
    user_text: str
    operator_text: str


LOGIN_PROBLEM = OperatorProblem(
    "login", "机器人的 CodeBuddy 账号尚未设置好，请联系管理员。",
    f"CodeBuddy CLI 无法登录 (the bot's CodeBuddy account is not set up): {LOGIN_FIX}")
INSTALL_PROBLEM = OperatorProblem(
    "install", "机器人的 CodeBuddy 尚未安装好，请联系管理员。",
    f"CodeBuddy CLI 无法启动 (not installed, or not executable): {INSTALL_FIX}")


def operator_problem(error: str, cannot_start: bool = False) -> OperatorProblem | None:
    """The operator-side problem a failed run's error shows (None for the run's own failures)."""
    if cannot_start or _CANNOT_START.search(error):
        return INSTALL_PROBLEM
    return LOGIN_PROBLEM if _AUTH_FAILURE.search(error) else None


class OperatorNotices:
    """Failures only the operator can fix, each logged once until a run succeeds again (`result`: a RunResult,
    any dataclass with `ok` and `error`). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._told: set[str] = set()

    def for_the_chat(self, result: R, cannot_start: bool = False) -> R:
        """A failure only the operator can fix (the CLI cannot sign in, or start) reads "ask the administrator"
        in the chat; the CLI's own words and the operator's fix are logged once, not for every task."""
        if result.ok:
            with self._lock:
                self._told.clear()
            return result
        problem = operator_problem(result.error, cannot_start)
        if problem is None:
            return result
        with self._lock:
            first = problem.kind not in self._told
            self._told.add(problem.kind)
        if first:
            log.error("%s (CLI: %s; 同类失败不再重复记录)", problem.operator_text, result.error)
        return replace(result, error=problem.user_text)
