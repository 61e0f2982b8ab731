"""What the bot checks and says as it starts: the settings (every problem at once), the sandbox, the CLI."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Mapping

from cluster.hosts import this_host
from codebuddy.cli_setup import INSTALL_FIX, choose_cli, login_state
from codebuddy_client import sandbox_from_config
from config import SETTINGS, Config, ConfigError, read_config

log = logging.getLogger("bot")


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
