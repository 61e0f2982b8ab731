"""Every setting and default of the bot, read from the environment (or a `.env` file) in one place.

`config.py` is the only module that reads the environment. `SETTINGS` is the single table of variables:
`.env.example` and the README's configuration table are checked against it by a test.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OPENAPI_ENDPOINT = "https://api.dingtalk.com"
CLI_ENV_PREFIX = "CODEBUDDY_"

# Built-in long-task keywords (case-insensitive substring match); LONG_TASK_KEYWORDS adds to these.
SEED_LONG_TASK_KEYWORDS = (
    "client analysis",
    "分析公司",
    "生成报告",
    "详细分析",
    "战略分析",
    "市场调研",
    "竞品分析",
)

# Limits of one DingTalk message (NOTES.md §2, §3).
# The webhook limit is documented as ~20,000 characters; counting UTF-8 bytes keeps Chinese text safe too.
WEBHOOK_MAX_BYTES = 20_000
PUSH_MAX_BYTES = 15_000

# Longest prompt accepted; longer ones get a clear reply instead of a CLI run.
MAX_PROMPT_CHARS = 50_000

# HTTP timeouts for every call the bot makes: (connect, read) seconds.
HTTP_TIMEOUT = (5.0, 30.0)
# Refresh the access token this many seconds before DingTalk says it expires.
TOKEN_REFRESH_MARGIN = 300.0
# Seconds between SIGTERM and SIGKILL when a CodeBuddy run is stopped.
KILL_GRACE = 3.0
# How long finished tasks stay in memory before cleanup (the store keeps them longer).
MEMORY_RETENTION_SECONDS = 3600.0
# How long a seen DingTalk msgId is remembered for redelivery dedup.
DEDUP_TTL_SECONDS = 24 * 3600.0
# Fixed duration text for background notices when no history exists.
DEFAULT_EXPECTED_DURATION = "2-5 分钟"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


def _positive_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    return value


def _non_negative_float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ConfigError(f"{name} must be 0 or more, got {raw!r}")
    return value


def parse_positive_int(name: str, raw: str) -> int:
    """`raw` as a whole number greater than 0; ConfigError naming `name` otherwise."""
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value <= 0:
        raise ConfigError(f"{name} must be greater than 0, got {raw!r}")
    return value


def _optional_port(name: str, raw: str) -> int | None:
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port number, got {raw!r}")
    return value


def _csv(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _shell_words(name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be split like a shell command line: {exc}") from None


def _log_level(name: str, raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {raw!r}")
    return level


_PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")


def _permission_mode(name: str, raw: str) -> str:
    if raw not in _PERMISSION_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(_PERMISSION_MODES)}, got {raw!r}")
    return raw


def _text(name: str, raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Setting:
    """One environment variable: its default ('' = unset), parser and one-line meaning."""

    env: str
    attr: str
    default: str
    parse: Callable[[str, str], object]
    help: str
    required: bool = False
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("DINGTALK_CLIENT_ID", "client_id", "", _text, "App key (client id) of the DingTalk app", required=True),
    Setting("DINGTALK_CLIENT_SECRET", "client_secret", "", _text, "App secret of the DingTalk app",
            required=True, secret=True),
    Setting("DINGTALK_ROBOT_CODE", "robot_code", "", _text, "robotCode for pushes (default: the client id)"),
    Setting("DINGTALK_OPENAPI_ENDPOINT", "openapi_endpoint", DEFAULT_OPENAPI_ENDPOINT, _text,
            "Base URL of every DingTalk OpenAPI call (the SDK reads it too)"),
    Setting("CODEBUDDY_BIN", "codebuddy_bin", "codebuddy", _text, "The CodeBuddy CLI to run"),
    Setting("CODEBUDDY_WORKDIR", "codebuddy_workdir", "./workspace", _text,
            "Working directory of every CLI run (created if missing)"),
    Setting("CODEBUDDY_MODEL", "codebuddy_model", "", _text, "Passed as --model when set"),
    Setting("CODEBUDDY_EXTRA_ARGS", "codebuddy_extra_args", "", _shell_words,
            "Extra CLI arguments, split like a shell would (e.g. --allowedTools Read)"),
    Setting("CODEBUDDY_PERMISSION_MODE", "codebuddy_permission_mode", "acceptEdits", _permission_mode,
            "Passed as --permission-mode (acceptEdits denies Bash in -p mode)"),
    Setting("SYNC_TIMEOUT", "sync_timeout", "60", _positive_float,
            "Seconds a short task may run before it moves to the background"),
    Setting("TASK_TIMEOUT", "task_timeout", "1800", _positive_float,
            "Hard cap in seconds on one CLI run; the process group is killed"),
    Setting("LONG_TASK_KEYWORDS", "long_task_keywords", "", _csv,
            "Comma-separated keywords added to the built-in long-task list"),
    Setting("LOG_FILE", "log_file", "/var/log/dingtalk-bot.log", _text,
            "Log file; if it cannot be opened the bot logs to stderr"),
    Setting("LOG_LEVEL", "log_level", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("MAX_WORKERS", "max_workers", "4", parse_positive_int,
            "CodeBuddy runs at once; more tasks wait in a queue"),
    Setting("MAX_TASKS_PER_USER", "max_tasks_per_user", "2", parse_positive_int, "CodeBuddy runs at once for one user"),
    Setting("TASK_DB", "task_db", "./data/tasks.db", _text, "SQLite file holding tasks (directory created)"),
    Setting("TASK_RETENTION_DAYS", "task_retention_days", "30", _positive_float,
            "Finished tasks older than this are purged from the task DB"),
    Setting("ADMIN_USERS", "admin_users", "", _csv, "Staff ids that may see and cancel every task"),
    Setting("ALLOWED_USERS", "allowed_users", "", _csv, "Staff ids allowed to use the bot (empty = everyone)"),
    Setting("PROGRESS_INTERVAL", "progress_interval", "300", _non_negative_float,
            "Seconds between progress notes of a background task (0 = off)"),
    Setting("DELIVERY_RETRY_WINDOW", "delivery_retry_window", "600", _positive_float,
            "Seconds a failing delivery is retried before it is left for the next start"),
    Setting("STREAM_IDLE_TIMEOUT", "stream_idle_timeout", "180", _positive_float,
            "Reconnect the stream after this many seconds without any frame"),
    Setting("SHUTDOWN_GRACE", "shutdown_grace", "20", _non_negative_float,
            "Seconds running tasks get to finish on SIGTERM before they are stopped"),
    Setting("USER_RATE_LIMIT", "user_rate_limit", "20", parse_positive_int, "Prompts one user may send per minute"),
    Setting("STATUS_PORT", "status_port", "", _optional_port,
            "Port of the 127.0.0.1 /healthz and /metrics server (unset = off)"),
)


@dataclass(frozen=True)
class Config:
    """The bot's validated settings. Build it with `load_config`."""

    client_id: str
    client_secret: str = field(repr=False)
    robot_code: str
    openapi_endpoint: str
    codebuddy_bin: str
    codebuddy_workdir: str
    codebuddy_model: str
    codebuddy_extra_args: tuple[str, ...]
    codebuddy_permission_mode: str
    sync_timeout: float
    task_timeout: float
    long_task_keywords: tuple[str, ...]
    log_file: str
    log_level: str
    max_workers: int
    max_tasks_per_user: int
    task_db: str
    task_retention_days: float
    admin_users: tuple[str, ...]
    allowed_users: tuple[str, ...]
    progress_interval: float
    delivery_retry_window: float
    stream_idle_timeout: float
    shutdown_grace: float
    user_rate_limit: int
    status_port: int | None
    # CodeBuddy CLI variables (CODEBUDDY_API_KEY, CODEBUDDY_BASE_URL, …) found in .env, passed to every run.
    cli_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @property
    def all_long_task_keywords(self) -> tuple[str, ...]:
        """The seed keywords plus LONG_TASK_KEYWORDS, without duplicates."""
        seen: dict[str, None] = {}
        for keyword in (*SEED_LONG_TASK_KEYWORDS, *self.long_task_keywords):
            seen.setdefault(keyword, None)
        return tuple(seen)

    def describe(self) -> list[tuple[str, str]]:
        """(variable, value) pairs for display, secrets masked."""
        rows = []
        for setting in SETTINGS:
            value = getattr(self, setting.attr)
            if setting.secret:
                shown = mask_secret(str(value))
            elif isinstance(value, tuple):
                shown = ",".join(value) if setting.parse is _csv else " ".join(value)
            else:
                shown = "" if value is None else str(value)
            rows.append((setting.env, shown))
        return rows


def mask_secret(value: str) -> str:
    """Show a secret as its first two characters and its length, never the rest."""
    if not value:
        return "(unset)"
    return f"{value[:2]}…({len(value)} chars)"


def load_config(environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env") -> Config:
    """Read settings from `environ` (default: os.environ) over a `.env` file; raise ConfigError if invalid."""
    values: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        from dotenv import dotenv_values

        values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    from_file = dict(values)
    values.update(os.environ if environ is None else environ)  # the real environment wins over .env
    own = {setting.env for setting in SETTINGS}
    # The CLI inherits the process environment; its own variables set only in .env must be handed on.
    cli_env = tuple(sorted((name, values[name]) for name in from_file
                           if name.startswith(CLI_ENV_PREFIX) and name not in own))

    parsed: dict[str, object] = {}
    for setting in SETTINGS:
        raw = values.get(setting.env, "").strip()
        if not raw:
            if setting.required:
                raise ConfigError(
                    f"{setting.env} is not set: copy .env.example to .env and fill it in, or export it"
                )
            raw = setting.default
        parsed[setting.attr] = setting.parse(setting.env, raw)
    if not parsed["robot_code"]:
        parsed["robot_code"] = parsed["client_id"]
    parsed["openapi_endpoint"] = str(parsed["openapi_endpoint"]).rstrip("/")
    return Config(**parsed, cli_env=cli_env)  # type: ignore[arg-type]
