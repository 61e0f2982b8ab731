"""Every setting and default of the bot, read from the environment (or a `.env` file) in one place.

`config.py` is the only module that reads the environment. `SETTINGS` is the single table of variables:
`.env.example` and the settings table in docs/configuration.md are checked against it by a test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from common.redaction import dsn_passwords, mask_secret
from common.setting_values import (  # noqa: F401 (ConfigError and parse_positive_int are used through config)
    ConfigError,
    absolute_paths,
    access_token,
    any_text,
    cli_args,
    comma_list,
    egress_mode,
    log_level_name,
    non_negative_float,
    non_negative_int,
    on_off,
    optional_port,
    parse_positive_int,
    permission_mode_name,
    positive_float,
    sandbox_name,
    shell_words,
    time_zone,
)
from projects.catalog import Project, load_projects, projects_path

DEFAULT_OPENAPI_ENDPOINT = "https://api.dingtalk.com"
CLI_ENV_PREFIX = "CODEBUDDY_"
# The CLI's credentials: handed to every run (the agent needs them) but never shown in a chat or a log.
CLI_SECRET_VARIABLES = ("CODEBUDDY_API_KEY", "CODEBUDDY_AUTH_TOKEN")
# The bot's checkout (code, .venv, usually .env): hidden from every run.
PROJECT_DIR = os.path.dirname(os.path.abspath(__file__))

# Built-in long-task keywords (case-insensitive substring match); LONG_TASK_KEYWORDS adds to these.
SEED_LONG_TASK_KEYWORDS = ("client analysis", "分析公司", "生成报告", "详细分析", "战略分析", "市场调研", "竞品分析")

# Limits of one DingTalk message (docs/wire-facts.md §2, §3).
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
# PostgreSQL time limits on every connection the bot opens (store/pg_connect.py); DB_STATEMENT_TIMEOUT is a setting.
DB_CONNECT_TIMEOUT = 5  # seconds (libpq counts whole ones): a LAN server answers in ms; 5 s rides out two lost SYNs
DB_LOCK_TIMEOUT = 2.0  # the cluster's row and advisory locks last one short transaction: longer means a stalled holder
DB_IDLE_IN_TRANSACTION_TIMEOUT = 10.0  # a host stalled mid-transaction (cut off, paused) lets its locks go after this
DB_KEEPALIVES = (10, 3, 3)  # idle s, interval s, probes: a dead peer of an idle connection (LISTEN) is found in ~19 s
DB_TCP_USER_TIMEOUT = 10.0  # data unacknowledged this long: the path to the server is gone (a black hole), not slow
DB_CLIENT_MARGIN = 2.0  # the client stops waiting this long after statement_timeout: the server's own limit acts first
# Fixed duration text for background notices when no history exists.
DEFAULT_EXPECTED_DURATION = "2-5 分钟"

# Every example value `.env.example` ships (a test keeps the two in step), and where to get the real one. A setting
# still holding its example value is unfilled: the bot will not start and `check` fails until it is replaced.
_CONSOLE = "from the DingTalk developer console (open-dev.dingtalk.com) → your app → 凭证与基础信息"
EXAMPLE_VALUES: dict[str, tuple[str, str]] = {
    "DINGTALK_CLIENT_ID": ("your-app-key", f"the app's Client ID (AppKey), {_CONSOLE}"),
    "DINGTALK_CLIENT_SECRET": ("your-app-secret", f"the app's Client Secret (AppSecret), {_CONSOLE}"),
    "CODEBUDDY_API_KEY": ("your-codebuddy-api-key",
                          "an API key of the bot's CodeBuddy account (codebuddy.ai, or codebuddy.cn with "
                          "CODEBUDDY_INTERNET_ENVIRONMENT=internal), or delete the line and set CODEBUDDY_AUTH_TOKEN"),
}


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
    Setting("DINGTALK_CLIENT_ID", "client_id", "", any_text, "App key (client id) of the DingTalk app", required=True),
    Setting("DINGTALK_CLIENT_SECRET", "client_secret", "", any_text, "App secret of the DingTalk app",
            required=True, secret=True),
    Setting("DINGTALK_ROBOT_CODE", "robot_code", "", any_text, "robotCode for pushes (default: the client id)"),
    Setting("DINGTALK_OPENAPI_ENDPOINT", "openapi_endpoint", DEFAULT_OPENAPI_ENDPOINT, any_text,
            "Base URL of every DingTalk OpenAPI call (the SDK reads it too)"),
    Setting("CODEBUDDY_BIN", "codebuddy_bin", "codebuddy", any_text, "The CodeBuddy CLI to run"),
    Setting("CODEBUDDY_WORKDIR", "codebuddy_workdir", "./workspace", any_text,
            "Holds a workspace and a CLI home per conversation (created, mode 0700)"),
    Setting("CODEBUDDY_MODEL", "codebuddy_model", "", any_text, "Passed as --model when set"),
    Setting("CODEBUDDY_EXTRA_ARGS", "codebuddy_extra_args", "", cli_args,
            "Extra CLI arguments, split like a shell would (e.g. --allowedTools Read)"),
    Setting("CODEBUDDY_PERMISSION_MODE", "codebuddy_permission_mode", "acceptEdits", permission_mode_name,
            "Passed as --permission-mode (what the agent may do inside the sandbox)"),
    Setting("CODEBUDDY_SANDBOX", "codebuddy_sandbox", "bwrap", sandbox_name,
            "bwrap: every run in a bubblewrap jail; none: no isolation (trusted users only)"),
    Setting("CODEBUDDY_SANDBOX_PATHS", "codebuddy_sandbox_paths", "", absolute_paths,
            "Comma-separated host paths runs may also read (e.g. a toolchain in /opt)"),
    Setting("CODEBUDDY_EGRESS", "codebuddy_egress", "public", egress_mode,
            "Where a jailed run may connect, through the bot's egress proxy: public (public addresses, ports 80 and "
            "443), model (the model endpoint only) or off (the host's network, no namespace: trusted users only)"),
    Setting("CODEBUDDY_EGRESS_ALLOW", "codebuddy_egress_allow", "", any_text,
            "Comma-separated destinations runs may also reach, even private ones: host, host:port, *.suffix, CIDR"),
    Setting("CODEBUDDY_EGRESS_DENY", "codebuddy_egress_deny", "", any_text,
            "Comma-separated destinations runs may never reach (same forms; the model endpoint stays allowed)"),
    Setting("RUN_MAX_PROCS", "run_max_procs", "256", parse_positive_int,
            "Processes one jailed CLI process and its tools may have at once (pids cgroup, or RLIMIT_NPROC)"),
    Setting("RUN_MEMORY_MB", "run_memory_mb", "2048", parse_positive_int,
            "Memory of one jailed run, CLI included (memory cgroup); over it the run's process is ended"),
    Setting("RUN_TMP_MB", "run_tmp_mb", "512", parse_positive_int, "Size of a jailed run's private /tmp"),
    Setting("WORKSPACE_MAX_MB", "workspace_max_mb", "1024", parse_positive_int,
            "Disk a conversation's workspace and CLI home may use; when full, its runs are refused until files "
            "are deleted or /new"),
    Setting("SYNC_TIMEOUT", "sync_timeout", "60", positive_float,
            "Seconds a short task may run before it moves to the background"),
    Setting("TASK_TIMEOUT", "task_timeout", "1800", positive_float,
            "Hard cap in seconds on one CLI run, waits for the sender's answers included; then the turn stops"),
    Setting("LONG_TASK_KEYWORDS", "long_task_keywords", "", comma_list,
            "Comma-separated keywords added to the built-in long-task list"),
    Setting("LOG_FILE", "log_file", "", any_text,
            "Log file (the systemd unit sets /var/log/dingtalk-bot.log); unset, or not writable: stderr"),
    Setting("LOG_LEVEL", "log_level", "INFO", log_level_name, "DEBUG, INFO, WARNING or ERROR"),
    Setting("MAX_WORKERS", "max_workers", "4", parse_positive_int,
            "CodeBuddy runs at once; more tasks wait in a queue"),
    Setting("MAX_TASKS_PER_USER", "max_tasks_per_user", "2", parse_positive_int, "CodeBuddy runs at once for one user"),
    Setting("MAX_QUEUED_PER_USER", "max_queued_per_user", "10", parse_positive_int,
            "Tasks one user may have waiting in the queue; more are refused with a reply"),
    Setting("TASK_DB", "task_db", "./data/tasks.db", any_text,
            "SQLite file holding tasks (directory created), or a postgresql:// URL shared by several bot processes"),
    Setting("TASK_RETENTION_DAYS", "task_retention_days", "30", positive_float,
            "Finished tasks older than this are purged from the task DB"),
    Setting("ADMIN_USERS", "admin_users", "", comma_list, "Staff ids that may see and cancel every task"),
    Setting("ALLOWED_USERS", "allowed_users", "", comma_list, "Staff ids allowed to use the bot (empty = everyone)"),
    Setting("PROGRESS_INTERVAL", "progress_interval", "300", non_negative_float,
            "Seconds between progress notes of a background task (0 = off)"),
    Setting("DELIVERY_RETRY_WINDOW", "delivery_retry_window", "600", positive_float,
            "Seconds one delivery of a result keeps retrying; then it is tried again later, with backoff"),
    Setting("DELIVERY_GIVE_UP_HOURS", "delivery_give_up_hours", "24", positive_float,
            "Hours after which an undeliverable result is given up (marked, logged, then purged)"),
    Setting("STREAM_CONNECTIONS", "stream_connections", "2", parse_positive_int,
            "DingTalk Stream connections this process holds (a message goes to one live connection of the app; "
            "with two, one is always live while the other is replaced)"),
    Setting("STREAM_IDLE_TIMEOUT", "stream_idle_timeout", "60", positive_float,
            "A Stream connection that delivered no frame (keepalive pings included) for this many seconds is "
            "replaced"),
    Setting("SHUTDOWN_GRACE", "shutdown_grace", "20", non_negative_float,
            "Seconds running tasks get to finish on SIGTERM before they are stopped"),
    Setting("USER_RATE_LIMIT", "user_rate_limit", "20", parse_positive_int, "Prompts one user may send per minute"),
    Setting("STATUS_PORT", "status_port", "", optional_port,
            "Port of the 127.0.0.1 /healthz and /metrics server (unset = off)"),
    Setting("STATUS_TOKEN", "status_token", "", access_token, "Token the status server asks for on every path but "
            "/healthz (Authorization: Bearer, or ?token=); set, it serves the read-only admin page at / (unset: / "
            "refused, /metrics open)", secret=True),
    Setting("WARM_SESSIONS", "warm_sessions", "4", non_negative_int,
            "CLI processes kept alive between a conversation's messages (least recently used ended first; 0 = none)"),
    Setting("WARM_IDLE_SECONDS", "warm_idle_seconds", "600", positive_float,
            "A warm CLI process idle this long is ended (the next message resumes the session from disk)"),
    Setting("SPARE_SESSIONS", "spare_sessions", "1", non_negative_int,
            "CLI processes started ahead in fresh, empty directories, each taken by the next new conversation (or the "
            "first message after /new); they hold free WARM_SESSIONS slots and go first when one is needed (0 = none)"),
    Setting("APPROVALS", "approvals", "on", on_off,
            "on: a tool the permission mode does not allow is asked of the sender in the chat; off: denied"),
    Setting("APPROVAL_TIMEOUT", "approval_timeout", "300", positive_float,
            "Seconds to wait for the sender's 同意/拒绝 (or an answer to CodeBuddy's question); no answer = denied"),
    Setting("APPROVAL_MAX_WAITS", "approval_max_waits", "3", parse_positive_int,
            "Questions one task may ask its sender (tool requests and CodeBuddy's own); a further request is denied "
            "and the task ends with the reason"),
    Setting("DINGTALK_OAPI_ENDPOINT", "oapi_endpoint", "https://oapi.dingtalk.com", any_text,
            "Host of the legacy media upload API (files and pictures sent to chats)"),
    Setting("MAX_ATTACHMENT_MB", "max_attachment_mb", "20", parse_positive_int,
            "Largest file taken from or sent to a chat, in MB (DingTalk's own limit is 20)"),
    Setting("MAX_FILES_OUT", "max_files_out", "5", parse_positive_int,
            "Files from a run's outbox/ sent with one answer; the rest are listed as not sent"),
    Setting("MAX_ATTACHMENTS_PER_MESSAGE", "max_attachments_per_message", "5", parse_positive_int,
            "Pictures and files fetched from one message; the rest are not downloaded and the sender is told which"),
    Setting("ATTACHMENT_RETENTION_DAYS", "attachment_retention_days", "7", positive_float,
            "Pictures and files people sent are removed from the conversation's attachments/ after this many days"),
    Setting("HOST_NAME", "host_name", "", any_text,
            "Names this process in /metrics and the task DB (unset: the hostname)"),
    Setting("LEASE_SECONDS", "lease_seconds", "30", positive_float,
            "PostgreSQL: seconds until a dead host's tasks move to another host"),
    Setting("DB_STATEMENT_TIMEOUT", "db_statement_timeout", "10", positive_float,
            "PostgreSQL: seconds one statement may run; the bot stops waiting for an answer 2 s later"),
    Setting("DINGTALK_MONTHLY_CALL_BUDGET", "monthly_call_budget", "5000", parse_positive_int, "Metered DingTalk "
            "calls (pushes, card calls, file downloads and uploads) the bot may spend per calendar month "
            "(docs/cards-and-budget.md)"),
    Setting("USER_DAILY_API_CALLS", "user_daily_api_calls", "100", non_negative_int, "Metered DingTalk calls "
            "made for one user per day (Beijing time, all hosts); over it only webhook replies (ADMIN_USERS exempt; "
            "0 = no limit)"),
    Setting("USER_DAILY_TOKENS", "user_daily_tokens", "0", non_negative_int, "Input and output tokens one user's "
            "runs may use per day (SCHEDULE_TZ days, all hosts); over it prompts are refused until the day ends "
            "(ADMIN_USERS exempt; 0 = no limit)"),
    Setting("USER_DAILY_RUNS", "user_daily_runs", "0", non_negative_int,
            "CLI runs one user may start per day (as USER_DAILY_TOKENS)"),
    Setting("USER_MONTHLY_COST_USD", "user_monthly_cost_usd", "0", non_negative_float, "Cost in USD the CLI "
            "reported for one user's runs per calendar month (as USER_DAILY_TOKENS; CLI 2.163.0 reports 0)"),
    Setting("DINGTALK_CARD_TEMPLATE_ID", "card_template_id", "", any_text, "AI card template id (unset = no cards)"),
    Setting("DINGTALK_CARD_VARIABLES", "card_variables", "msgContent,flowStatus,msgTitle,pendingApproval",
            comma_list, "The card template's variables: streamed text, status, title (the common AI card template's "
            "names), and the waiting tool request whose approve/deny buttons the card shows"),
    Setting("CARD_UPDATE_INTERVAL", "card_update_interval", "1.5", positive_float, "Seconds between two updates "
            "of a streaming card (stretched when the month's spend runs ahead)"),
    Setting("CARD_BACKOFF", "card_backoff", "1800", non_negative_float, "Seconds cards pause after 3 failures"),
    Setting("SCHEDULE_TZ", "schedule_tz", "Asia/Shanghai", time_zone,
            "Time zone of scheduled prompts' times (/every; docs/schedules.md)"),
    Setting("SCHEDULE_MIN_INTERVAL", "schedule_min_interval", "3600", positive_float,
            "Seconds a schedule must leave between two fires; a schedule firing more often is refused"),
    Setting("SCHEDULE_CATCH_UP", "schedule_catch_up", "3600", non_negative_float,
            "After downtime a missed fire runs once if it is less than this many seconds late, else it is skipped"),
    Setting("MAX_SCHEDULES_PER_USER", "max_schedules_per_user", "5", parse_positive_int,
            "Schedules one user may have (paused ones count)"),
    Setting("PROJECTS_FILE", "projects_file", "projects.toml", any_text, "TOML file of the git projects a chat may "
            "bind (/project); relative: beside .env; missing: no projects (docs/projects.md)"),
)


def setting_default(env: str) -> str:
    """The default value of the setting named `env`."""
    return next(setting.default for setting in SETTINGS if setting.env == env)


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
    codebuddy_sandbox: str
    codebuddy_sandbox_paths: tuple[str, ...]
    codebuddy_egress: str
    codebuddy_egress_allow: str
    codebuddy_egress_deny: str
    run_max_procs: int
    run_memory_mb: int
    run_tmp_mb: int
    workspace_max_mb: int
    sync_timeout: float
    task_timeout: float
    long_task_keywords: tuple[str, ...]
    log_file: str
    log_level: str
    max_workers: int
    max_tasks_per_user: int
    max_queued_per_user: int
    task_db: str
    task_retention_days: float
    admin_users: tuple[str, ...]
    allowed_users: tuple[str, ...]
    progress_interval: float
    delivery_retry_window: float
    delivery_give_up_hours: float
    stream_idle_timeout: float
    shutdown_grace: float
    user_rate_limit: int
    status_port: int | None
    oapi_endpoint: str
    max_attachment_mb: int
    max_files_out: int
    host_name: str
    lease_seconds: float
    db_statement_timeout: float
    monthly_call_budget: int
    card_template_id: str
    card_variables: tuple[str, ...]
    card_update_interval: float
    card_backoff: float
    projects_file: str = "projects.toml"
    stream_connections: int = 2
    warm_sessions: int = 4
    warm_idle_seconds: float = 600.0
    spare_sessions: int = 1
    approvals: bool = True
    approval_timeout: float = 300.0
    max_attachments_per_message: int = 5
    attachment_retention_days: float = 7.0
    user_daily_api_calls: int = 100
    user_daily_tokens: int = 0
    user_daily_runs: int = 0
    user_monthly_cost_usd: float = 0.0
    approval_max_waits: int = 3
    schedule_tz: str = "Asia/Shanghai"
    status_token: str = field(default="", repr=False)
    schedule_min_interval: float = 3600.0
    schedule_catch_up: float = 3600.0
    max_schedules_per_user: int = 5
    # CodeBuddy CLI variables (CODEBUDDY_API_KEY, CODEBUDDY_BASE_URL, …) found in .env, passed to every run.
    cli_env: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Values of CODEBUDDY_API_KEY / CODEBUDDY_AUTH_TOKEN (environment or .env): never shown to a chat.
    cli_secrets: tuple[str, ...] = field(default=(), repr=False)
    # The projects of PROJECTS_FILE, their tokens read from the environment or .env (never handed to a run).
    projects: tuple[Project, ...] = field(default=(), repr=False)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every secret value the bot holds: replaced by *** in anything it logs or sends."""
        return tuple(s for s in (self.client_secret, self.status_token, *self.cli_secrets, *dsn_passwords(self.task_db),
                                 *(project.token for project in self.projects)) if s)

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
                shown = " ".join(value) if setting.parse is cli_args else ",".join(value)
            else:
                shown = "" if value is None else str(value)
            rows.append((setting.env, shown))
        return rows


def load_config(environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env") -> Config:
    """Read settings from `environ` (default: os.environ) over a `.env` file; raise ConfigError naming every
    missing, invalid or unfilled setting."""
    config, error = read_config(environ, dotenv_path)
    if error is not None:
        raise error
    return config


def read_config(environ: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env"
                ) -> tuple[Config, ConfigError | None]:
    """The settings, each missing, invalid or unfilled one replaced by its default, and what was wrong (None
    when nothing was): `check` shows the whole picture at once."""
    problems: list[str] = []
    values: dict[str, str] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        try:
            values.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            problems.append(f"cannot read {os.path.abspath(dotenv_path)} ({reason}): make it readable by the bot's "
                            "user (and UTF-8)")
    from_file = dict(values)
    values.update(os.environ if environ is None else environ)  # the real environment wins over .env
    unfilled = [env for env, (example, _) in EXAMPLE_VALUES.items() if values.get(env, "").strip() == example]
    problems[:0] = [f"{env} still holds the example value {EXAMPLE_VALUES[env][0]!r}: replace it with "
                    f"{EXAMPLE_VALUES[env][1]}"
                    for env in unfilled]
    own = {setting.env for setting in SETTINGS}
    # The CLI inherits the process environment; its own variables set only in .env must be handed on.
    cli_env = tuple(sorted((name, values[name]) for name in from_file
                           if name.startswith(CLI_ENV_PREFIX) and name not in own and name not in unfilled))

    parsed: dict[str, object] = {}
    for setting in SETTINGS:
        raw = "" if setting.env in unfilled else values.get(setting.env, "").strip()
        if not raw and setting.required and setting.env not in unfilled:
            problems.append(f"{setting.env} is not set: copy .env.example to .env and fill it in, or export it")
        try:
            parsed[setting.attr] = setting.parse(setting.env, raw or setting.default)
        except ConfigError as exc:
            problems.extend(exc.problems)
            parsed[setting.attr] = setting.parse(setting.env, setting.default)
    parsed["robot_code"] = parsed["robot_code"] or parsed["client_id"]
    parsed["openapi_endpoint"] = str(parsed["openapi_endpoint"]).rstrip("/")
    sandbox_problems = _sandbox_path_problems(parsed, dotenv_path)
    if sandbox_problems:
        problems += sandbox_problems
        parsed["codebuddy_sandbox_paths"] = ()
    cli_secrets = tuple(values[name].strip() for name in CLI_SECRET_VARIABLES
                        if values.get(name, "").strip() and name not in unfilled)
    projects, project_problems = load_projects(projects_path(str(parsed["projects_file"]), dotenv_path), values,
                                               required=bool(values.get("PROJECTS_FILE", "").strip()),
                                               bot_settings=own)
    problems += project_problems
    config = Config(**parsed, cli_env=cli_env, cli_secrets=cli_secrets, projects=projects)  # type: ignore[arg-type]
    return config, (ConfigError(problems, unfilled) if problems else None)


def bot_files(task_db: str, log_file: str, workdir: str,
              dotenv_path: str | os.PathLike | None = ".env") -> tuple[str, ...]:
    """The bot's own files and directories, which no CodeBuddy run may see: its code, .env, task DB, log,
    the directory holding every conversation, and its working directory (absolute paths)."""
    paths = [PROJECT_DIR, os.getcwd(), *[os.path.abspath(p) for p in (task_db, workdir) if "://" not in p]]
    if log_file:
        paths.append(os.path.abspath(log_file))
    if dotenv_path is not None:
        paths.append(os.path.abspath(dotenv_path))
    return tuple(dict.fromkeys(paths))


def _sandbox_path_problems(parsed: dict[str, object], dotenv_path: str | os.PathLike | None) -> list[str]:
    """CODEBUDDY_SANDBOX_PATHS may not show a run the bot's own files (a path equal to or above one of them)."""
    protected = bot_files(str(parsed["task_db"]), str(parsed["log_file"]), str(parsed["codebuddy_workdir"]),
                          dotenv_path)
    problems = []
    for path in parsed["codebuddy_sandbox_paths"]:  # type: ignore[attr-defined]
        own = next((own for own in protected if own == path or own.startswith(path.rstrip("/") + "/")), None)
        if own is not None:
            problems.append(f"CODEBUDDY_SANDBOX_PATHS must not contain {path}: runs would see {own}")
    return problems
