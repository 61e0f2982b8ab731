"""The doctor (`python bot.py check`): every setting and where it came from, then one ✓/✗ line per check."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

from dotenv import dotenv_values

from codebuddy.cli_setup import INSTALL_FIX, choose_cli, login_state
from codebuddy.run_limits import detect as detect_limits
from codebuddy_client import CodeBuddyClient, run_limits_from_config, sandbox_from_config
from common.redaction import RedactedStream, mask_secret
from config import EXAMPLE_VALUES, SETTINGS, Config, ConfigError, read_config
from dingtalk.api_budget import describe_month
from dingtalk_sender import (
    OPEN_CONNECTION_PATH,
    TOKEN_PATH,
    AccessTokenProvider,
    DeliveryError,
    JsonHttp,
    open_stream_connection,
)
from ops.schedule_table import schedules_line
from ops.store_admin import check_postgres
from projects.git import Git, check_remote
from store.postgres import DB_ERRORS, PostgresTaskStore, is_postgres_url, safe_url
from store.schema import StoreError
from store.sqlite import SQLiteTaskStore, store_writable

OK_MARK, FAIL_MARK = "✓", "✗"
DINGTALK_CREDENTIALS = ("DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET")


@dataclass(frozen=True)
class CheckResult:
    """One line of `python bot.py check`."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{OK_MARK if self.ok else FAIL_MARK} {self.name}: {self.detail}"


def _nearest_existing(path: str) -> str:
    current = os.path.abspath(path)
    while not os.path.exists(current):
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    return current


def _creatable(path: str, what: str) -> tuple[bool, str]:
    """Whether `path` (missing) could be created by this user; never creates anything."""
    parent = _nearest_existing(os.path.dirname(os.path.abspath(path)))
    if os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK):
        return True, f"{os.path.abspath(path)} does not exist yet; {what} will create it"
    return False, f"{os.path.abspath(path)} does not exist and {parent} is not writable"


def check_workspace(path: str) -> CheckResult:
    """The CLI's working directory exists (or can be created) and takes a new file."""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the first run")
        return CheckResult("workspace", ok, detail)
    if not os.path.isdir(absolute):
        return CheckResult("workspace", False, f"{absolute} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=absolute, prefix=".bot-check-"):
            pass
    except OSError as exc:
        return CheckResult("workspace", False, f"{absolute} is not writable ({exc.strerror or exc})")
    return CheckResult("workspace", True, f"{absolute} is writable")


def check_task_db(path: str) -> CheckResult:
    """The task DB takes a write lock (or its directory lets the daemon create it); PostgreSQL: it answers, its
    schema version and the clock skew between this host and the server."""
    if is_postgres_url(path):
        return CheckResult("task DB", *check_postgres(path))
    absolute = os.path.abspath(path)
    if path == ":memory:":
        return CheckResult("task DB", True, "in memory (tasks are lost on restart)")
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the daemon")
        return CheckResult("task DB", ok, detail)
    ok, reason = store_writable(absolute)
    return CheckResult("task DB", ok, f"{absolute} is writable" if ok else f"not writable: {reason}")


def api_budget_line(path: str, monthly_budget: int, now: float | None = None) -> str:
    """This month's metered DingTalk calls (from the task DB: a SQLite file or PostgreSQL), by kind, against
    DINGTALK_MONTHLY_CALL_BUDGET: information, not a check (a spent budget is not a broken setup)."""
    now = time.time() if now is None else now
    try:
        if is_postgres_url(path):
            store: SQLiteTaskStore | PostgresTaskStore = PostgresTaskStore(path, read_only=True, pool_size=1,
                                                                            connect_timeout=5.0)
        else:
            absolute = os.path.abspath(path)
            if path == ":memory:" or not os.path.exists(absolute):
                return f"· API budget: 0 of {monthly_budget} metered calls this month (no task DB yet)"
            store = SQLiteTaskStore(absolute, read_only=True)
        try:
            line = describe_month(store, monthly_budget, now)
        finally:
            store.close()
    except (StoreError, sqlite3.Error, *DB_ERRORS) as exc:
        return f"· API budget: not counted yet ({type(exc).__name__}: {' '.join(str(exc).split())})"
    return f"· API budget: {line}"


def check_running_bot(port: int, timeout: float = 3.0) -> CheckResult | None:
    """What a bot running here says about itself on /healthz (intake, workers, store, stream); None if none answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read())
        except ValueError:
            return CheckResult("running bot", False, f"/healthz answered HTTP {exc.code}")
    except (OSError, ValueError):
        return None
    status = str(body.get("status", "?"))
    reasons = "; ".join(str(r) for r in body.get("reasons") or [])
    warm = body.get("warm_processes") or {}
    warm_text = (f"; warm CLI processes {warm.get('live', 0)}/{warm.get('capacity', 0)} "
                 f"({int(warm.get('rss_bytes', 0)) // 2**20} MiB), reused {warm.get('hits', 0)}, "
                 f"started {warm.get('misses', 0)}, ended {warm.get('ended', 0)}") if warm else ""
    streams = body.get("stream_connections") or {}
    stream_text = f"; Stream connections {streams.get('live', 0)}/{streams.get('wanted', 0)} live" if streams else ""
    return CheckResult("running bot", status == "ok", f"{status} (127.0.0.1:{port}/healthz)"
                       + (f": {reasons}" if reasons else "") + stream_text + warm_text)


def check_log_file(path: str) -> CheckResult:
    """The log file can be appended to (or created); otherwise the daemon logs to stderr."""
    if not path:
        return CheckResult("log file", True, "LOG_FILE unset: the bot logs to stderr (this terminal, or the journal "
                                             "under systemd; the unit sets LOG_FILE=/var/log/dingtalk-bot.log)")
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        ok, detail = _creatable(absolute, "the daemon")
        if not ok:
            detail += " (the bot would log to stderr, i.e. the journal)"
        return CheckResult("log file", ok, detail)
    try:
        with open(absolute, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        return CheckResult("log file", False, f"{absolute} is not writable ({exc.strerror or exc}); "
                                              "the bot would log to stderr")
    return CheckResult("log file", True, f"{absolute} is writable")


def check_access_token(config: Config, http: JsonHttp | None = None) -> CheckResult:
    """Fetch an access token: proves DINGTALK_CLIENT_ID/SECRET and that the OpenAPI endpoint answers."""
    provider = AccessTokenProvider(http or JsonHttp(pool_size=1, transport_retries=0),
                                   config.openapi_endpoint, config.client_id, config.client_secret)
    url = config.openapi_endpoint + TOKEN_PATH
    try:
        provider.get()
    except DeliveryError as exc:  # the message names the host and the cause
        hint = "" if exc.retryable else " (check DINGTALK_CLIENT_ID and DINGTALK_CLIENT_SECRET)"
        return CheckResult("DingTalk access token", False, f"{exc}{hint}")
    return CheckResult("DingTalk access token", True, f"fetched from {url}")


def check_stream_gateway(config: Config, http: JsonHttp | None = None) -> CheckResult:
    """Ask the Stream gateway for a connection ticket: proves the app may use Stream mode."""
    url = config.openapi_endpoint + OPEN_CONNECTION_PATH
    connection, error = open_stream_connection(http or JsonHttp(pool_size=1, transport_retries=0),
                                               config.openapi_endpoint, config.client_id, config.client_secret,
                                               ua="dingtalk-codebuddy-bot/check")
    if connection is not None:
        return CheckResult("DingTalk Stream", True, "the gateway accepted the app (Stream mode)")
    if error.startswith("unreachable"):
        return CheckResult("DingTalk Stream", False, error)
    return CheckResult("DingTalk Stream", False, f"{url} refused: {error}")


def check_cli(config: Config, timeout: float = 20.0) -> CheckResult:
    """Which CLI runs (CODEBUDDY_BIN, `codebuddy` on PATH or the wheel's), and that `--version` answers."""
    choice = choose_cli(config.codebuddy_bin)
    client = CodeBuddyClient.from_config(config)
    shown = shutil.which(client.binary) or client.binary
    try:
        version = client.version(timeout=timeout)
    except FileNotFoundError:
        return CheckResult("CodeBuddy CLI", False, f"{config.codebuddy_bin} not found ({choice.origin}): {INSTALL_FIX}")
    except PermissionError:
        return CheckResult("CodeBuddy CLI", False, f"{shown} is not executable: chmod +x {shown}")
    except subprocess.TimeoutExpired:
        return CheckResult("CodeBuddy CLI", False, f"{shown} --version did not answer in {timeout:.0f} s")
    except (OSError, RuntimeError) as exc:
        return CheckResult("CodeBuddy CLI", False, f"{shown} --version failed: {exc}")
    version = version.splitlines()[0] if version else "(no version)"
    return CheckResult("CodeBuddy CLI", True, f"{shown} {version} (from {choice.origin})")


def check_cli_login(config: Config, environ: Mapping[str, str]) -> CheckResult:
    """Whether CLI runs can sign in: the credentials their environment carries (no model call)."""
    state = login_state({**environ, **dict(config.cli_env)}, os.path.expanduser("~"))
    return CheckResult("CodeBuddy login", state.ok, state.detail)


def check_sandbox(config: Config) -> CheckResult:
    """Every run can start in its sandbox (CODEBUDDY_SANDBOX=none fails: runs are not isolated)."""
    sandbox = sandbox_from_config(config)
    if sandbox.name == "none":
        return CheckResult("sandbox", False, "CODEBUDDY_SANDBOX=none: runs are not isolated (every chat user can make "
                                             "the agent read .env and write the bot's files); set it to bwrap")
    problem = sandbox.probe()
    chosen = f"{sandbox.bwrap} ({sandbox.bwrap_reason})"  # which bwrap runs, and why that one
    if problem:
        return CheckResult("sandbox", False, f"{problem} [bwrap: {chosen}]")
    return CheckResult("sandbox", True, f"{sandbox.version() or sandbox.name}, {chosen}: each conversation in its own "
                                        "jail")


def check_projects(config: Config) -> list[CheckResult]:
    """One line per project of PROJECTS_FILE: whether its remote answers the bot's git (with its token)."""
    results = []
    for project in config.projects:
        with tempfile.TemporaryDirectory(prefix="bot-project-check-") as scratch:
            ok, detail = check_remote(Git(), project, os.path.join(scratch, "probe.git"))
        results.append(CheckResult(f"project {project.name}", ok, detail))
    return results


def run_wall_lines(config: Config) -> list[str]:
    """Under the sandbox line: the run's network and each resource limit, ✓ enforced or ✗ not (and why)."""
    if config.codebuddy_egress == "off":
        network = "  ✗ network: CODEBUDDY_EGRESS=off: runs share the host's network (its loopback, the intranet)"
    else:
        allow = f", also {config.codebuddy_egress_allow}" if config.codebuddy_egress_allow else ""
        network = (f"  ✓ network: a namespace per run, out only through the bot's egress proxy "
                   f"(CODEBUDDY_EGRESS={config.codebuddy_egress}{allow})")
    return [network, *("  " + line for line in detect_limits().check_lines(run_limits_from_config(config)))]


def describe_settings(config: Config, environ: Mapping[str, str], dotenv_path: str | None,
                      problems: tuple[str, ...] = ()) -> list[str]:
    """One line per setting: name, value (secrets masked) and where it came from; a setting with a problem shows
    the value given (✗), not the default the other checks use instead."""
    try:
        in_file = dotenv_values(dotenv_path) if dotenv_path and os.path.isfile(dotenv_path) else {}
    except (OSError, UnicodeDecodeError):  # the configuration line says why
        in_file = {}
    wrong = {problem.split()[0] for problem in problems}
    secret = {setting.env for setting in SETTINGS if setting.secret}
    # TASK_DB may be a postgresql:// URL holding a password: shown without it.
    rows = [(name, safe_url(shown) if name == "TASK_DB" else shown) for name, shown in config.describe()]
    width = max(len(name) for name, _ in rows)
    lines = []
    for name, shown in rows:
        if (environ.get(name) or "").strip():
            source, given = "environment", environ[name].strip()
        elif (in_file.get(name) or "").strip():
            source, given = dotenv_path or ".env", str(in_file[name]).strip()
        else:
            source, given = "default", ""
        if name in wrong:
            shown = ((mask_secret(given) if name in secret and given not in EXAMPLE_VALUES.get(name, ("",))
                      else given) or "(unset)") + "  ✗"
        lines.append(f"  {name.ljust(width)}  {shown or '(unset)'}  [{source}]")
    return lines


def check_configuration(error: ConfigError | None) -> tuple[CheckResult, list[str]]:
    """The configuration line and, below it, every problem (all at once, not the first)."""
    if error is None:
        return CheckResult("configuration", True, f"{len(SETTINGS)} settings valid"), []
    count = len(error.problems)
    return (CheckResult("configuration", False, f"{count} setting{'s' if count > 1 else ''} to fix; the checks "
                        "below use the defaults instead"), [f"    - {problem}" for problem in error.problems])


def check_dingtalk(config: Config, error: ConfigError | None) -> list[CheckResult]:
    """The access token and the Stream gateway, unless the app's credentials are missing or examples."""
    unfilled = [p.split()[0] for p in (error.problems if error else ()) if p.split()[0] in DINGTALK_CREDENTIALS]
    if unfilled:
        why = f"not tried: {' and '.join(dict.fromkeys(unfilled))} not filled in (see configuration)"
        return [CheckResult("DingTalk access token", False, why), CheckResult("DingTalk Stream", False, why)]
    return [check_access_token(config), check_stream_gateway(config)]


def admin_page_line(port: int | None, token: str) -> str:
    """`bot.py check`'s line about the admin page (information): on (STATUS_TOKEN set) or off, and why."""
    if port is None:
        return "· admin page: off (STATUS_PORT unset)"
    if not token:
        return (f"· admin page: off (STATUS_TOKEN unset: 127.0.0.1:{port}/ answers 403; /healthz and /metrics "
                "stay open)")
    return (f"· admin page: on at http://127.0.0.1:{port}/ (read-only; STATUS_TOKEN asked on every path but "
            "/healthz; reach it through an SSH tunnel)")


def run_check(environ: Mapping[str, str], *, dotenv_path: str | None = ".env", out: TextIO | None = None,
              cli_timeout: float = 20.0) -> int:
    """`python bot.py check`: print the settings and every ✓/✗ check, whatever fails; 0 only if all passed."""
    config, error = read_config(environ, dotenv_path)
    # Settings, paths and errors may quote a secret (a DSN's password in TASK_DB, a key pasted into the wrong setting).
    out = RedactedStream(out or sys.stdout, config.secrets)
    print("Settings (.env and the environment; the environment wins):", file=out)
    for line in describe_settings(config, environ, dotenv_path, error.problems if error else ()):
        print(line, file=out)
    print(file=out, flush=True)
    configuration, problems = check_configuration(error)
    results = [configuration]
    print("\n".join([configuration.line(), *problems]), file=out, flush=True)
    for check in (lambda: check_dingtalk(config, error), lambda: [check_cli(config, cli_timeout)],
                  lambda: [check_cli_login(config, environ)], lambda: [check_sandbox(config)],
                  lambda: [check_workspace(config.codebuddy_workdir)], lambda: [check_task_db(config.task_db)],
                  lambda: [check_log_file(config.log_file)], lambda: check_projects(config)):
        for result in check():
            results.append(result)
            print(result.line(), file=out, flush=True)
            if result.name == "sandbox" and config.codebuddy_sandbox != "none":
                print("\n".join(run_wall_lines(config)), file=out, flush=True)
    approvals = "APPROVALS=off: tools the mode does not allow are denied"
    if config.approvals:
        approvals = f"tools the mode does not allow are asked of the sender ({config.approval_timeout:.0f} s to answer)"
    print(f"· warm sessions: up to {config.warm_sessions} CLI processes kept, ended after "
          f"{config.warm_idle_seconds:.0f} s idle; {approvals}"
          + ("" if config.status_port is not None else " (STATUS_PORT shows the live processes here)"), file=out)
    print(api_budget_line(config.task_db, config.monthly_call_budget), file=out)
    print(schedules_line(config.task_db, config.schedule_tz), file=out)
    print(admin_page_line(config.status_port, config.status_token), file=out)
    if config.status_port is not None:
        running = check_running_bot(config.status_port)
        if running is None:
            print(f"· running bot: none answers on 127.0.0.1:{config.status_port} (not started; not counted)",
                  file=out)
        else:
            results.append(running)
            print(running.line(), file=out, flush=True)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        print("  note: running as root, so file checks pass for root; run it as the service user "
              "(sudo -u dingtalk-bot …) to check what the daemon may write", file=out)
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"{len(failed)} of {len(results)} checks failed.", file=out)
        return 1
    print(f"All {len(results)} checks passed.", file=out)
    return 0
