"""Run one prompt through the `codebuddy` CLI, inside its conversation's sandbox, and return a `RunResult`.

The CLI runs with `-p --output-format stream-json`, the prompt on stdin (so a prompt starting with `-` is
never a flag and nothing goes through a shell), in its conversation's workspace with an allowlisted environment,
inside the sandbox (sandbox.py), in its own process group so a timeout or a cancel can stop it and every child
it started. Success is only a `result` line with `is_error: false` (docs/wire-facts.md §4).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

from cli_setup import choose_cli, operator_problem
from config import KILL_GRACE, SETTINGS, Config, bot_files, replace_secrets
from sandbox import Bubblewrap, NoSandbox, Sandbox, Workspaces, run_environment

log = logging.getLogger("codebuddy_client")

_BOT_SETTINGS = frozenset(setting.env for setting in SETTINGS)

_STDERR_TAIL_LINES = 20
# Every CLI run carries this variable (value: the task id); it survives into the CLI's children, so the
# processes of a run interrupted by a crash can be found and stopped on the next start.
RUN_TAG_VARIABLE = "CODEBUDDY_BOT_RUN"

# Things that look like credentials in CLI error text: (pattern, replacement keeping any label).
_TOKEN_PATTERNS = (
    (re.compile(r"\b(?:sk|ak|pk)-[A-Za-z0-9_\-]{8,}"), "***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._\-]{8,}"), r"\1***"),
    (re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"',;]{4,}"), r"\1***"),
    (re.compile(r"\b(?=[A-Za-z_\-]*\d)(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}\b"), "***"),
)


def redact_secrets(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Replace anything that looks like a token, and each of `extra_secrets`, with `***`."""
    text = replace_secrets(text, (secret for secret in extra_secrets if len(secret) >= 4))
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def new_session_id() -> str:
    """A fresh, unguessable CLI session id (a uuid4 matches the CLI's `^[a-zA-Z0-9][a-zA-Z0-9\\-_:]*$`)."""
    return str(uuid.uuid4())


@dataclass(frozen=True)
class RunResult:
    """What one CLI run produced. `ok` only when the CLI reported success."""

    ok: bool
    text: str = ""
    error: str = ""
    duration: float = 0.0
    session_id: str | None = None
    timed_out: bool = False
    cancelled: bool = False
    last_step: str = ""


@dataclass
class StreamState:
    """What the stream-json lines said so far."""

    result: dict | None = None
    error: str = ""
    session_id: str | None = None
    last_step: str = ""
    texts: list[str] = field(default_factory=list)  # the text blocks of the assistant's messages so far
    partial: str = ""  # text of the block being written (partial messages), until its whole message arrives

    @property
    def answer_text(self) -> str:
        """The answer as written so far: every text block of the turn, the one in progress last."""
        return "\n\n".join(self.texts + ([self.partial] if self.partial else []))


def parse_stream_line(line: str, state: StreamState) -> str | None:
    """Fold one stream-json line into `state`; return a human progress step if the line names one."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    kind = event.get("type")
    if event.get("session_id"):
        state.session_id = str(event["session_id"])
    if kind == "result":
        state.result = event
        return None
    if kind == "error":
        state.error = str(event.get("error") or event.get("message") or "unknown error")
        return None
    if kind == "stream_event":
        delta = (event.get("event") or {}).get("delta") or {}
        if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            state.partial += delta["text"]
        return None
    if kind == "assistant":
        step = None
        content = (event.get("message") or {}).get("content") or []
        state.partial = ""
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                step = f"工具 {block.get('name', '?')}"
            elif block.get("type") == "text" and block.get("text"):
                state.texts.append(str(block["text"]))
                step = step or "生成回答"
        if step:
            state.last_step = step
        return step
    return None


def result_from_stream(state: StreamState, returncode: int | None, stderr_tail: str, duration: float,
                       *, timed_out: bool = False, cancelled: bool = False, limit: float = 0.0) -> RunResult:
    """Decide success or failure from what the stream said, the exit code and stderr."""
    common = {"duration": duration, "session_id": state.session_id, "last_step": state.last_step}
    if cancelled:
        return RunResult(ok=False, error="任务已取消", cancelled=True, **common)
    if timed_out:
        return RunResult(ok=False, error=f"执行超时 (超过 {limit or duration:.0f} 秒)", timed_out=True, **common)
    result = state.result
    if result is not None and not result.get("is_error") and returncode in (0, None):
        return RunResult(ok=True, text=str(result.get("result") or ""), **common)
    if result is not None and (result.get("is_error") or result.get("subtype") != "success"):
        errors = result.get("errors") or []
        detail = "; ".join(str(e) for e in errors) if isinstance(errors, list) else str(errors)
        detail = detail or str(result.get("result") or "") or str(result.get("subtype") or "unknown error")
        return RunResult(ok=False, error=detail, **common)
    if state.error:
        return RunResult(ok=False, error=state.error, **common)
    if returncode not in (0, None):
        detail = stderr_tail.strip() or "no output"
        return RunResult(ok=False, error=f"CLI exited with code {returncode}: {detail}", **common)
    if result is not None:
        return RunResult(ok=True, text=str(result.get("result") or ""), **common)
    detail = stderr_tail.strip()
    return RunResult(ok=False, error="CLI ended without a result" + (f": {detail}" if detail else ""), **common)


def sandbox_from_config(config: Config) -> Sandbox:
    """The sandbox CODEBUDDY_SANDBOX names, hiding the bot's own files from every run."""
    if config.codebuddy_sandbox == "none":
        return NoSandbox()
    return Bubblewrap(choose_cli(config.codebuddy_bin).path, read_only=config.codebuddy_sandbox_paths,
                      hidden=bot_files(config.task_db, config.log_file, config.codebuddy_workdir))


class CodeBuddyClient:
    """Runs prompts through the CLI. Thread-safe: each `run` owns its own process."""

    def __init__(self, binary: str, workdir: str, *, model: str = "", extra_args: Iterable[str] = (),
                 permission_mode: str = "acceptEdits", timeout: float = 1800.0, kill_grace: float = 3.0,
                 env: Mapping[str, str] | None = None, poll_interval: float = 0.1,
                 sandbox: Sandbox | None = None, append_system_prompt: str = "") -> None:
        # A relative path with a slash would be looked up from the run's cwd (the workspace): pin it now.
        self.binary = os.path.abspath(binary) if os.sep in binary and not os.path.isabs(binary) else binary
        self.workspaces = Workspaces(workdir)
        self.model = model
        self.extra_args = tuple(extra_args)
        self.permission_mode = permission_mode
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.poll_interval = poll_interval
        self.sandbox: Sandbox = sandbox if sandbox is not None else NoSandbox()
        self.append_system_prompt = append_system_prompt  # e.g. where to leave files for the chat (outbox_files)
        # Where each run's allowlisted environment is taken from (sandbox.run_environment picks).
        self._env_source = dict(os.environ if env is None else env)
        self._running: dict[str, subprocess.Popen] = {}  # by run tag
        self._running_lock = threading.Lock()
        self._operator_told: set[str] = set()  # operator-side problems logged since the last good run

    @classmethod
    def from_config(cls, config: Config) -> CodeBuddyClient:
        """The client the bot's settings describe (with the CLI variables from .env), in its sandbox."""
        return cls(choose_cli(config.codebuddy_bin).path, config.codebuddy_workdir, model=config.codebuddy_model,
                   extra_args=config.codebuddy_extra_args, permission_mode=config.codebuddy_permission_mode,
                   timeout=config.task_timeout, kill_grace=KILL_GRACE, env={**os.environ, **dict(config.cli_env)},
                   sandbox=sandbox_from_config(config))

    def run_env(self, home: str, run_tag: str = "") -> dict[str, str]:
        """The environment of one run: allowlisted (never a bot setting or secret), HOME = the conversation's."""
        env = run_environment(self._env_source, home, _BOT_SETTINGS)
        if run_tag:
            env[RUN_TAG_VARIABLE] = run_tag
        return env

    def command(self, session_id: str | None = None) -> list[str]:
        """The argv of one run (the prompt goes on stdin, never on the command line)."""
        argv = [self.binary, "-p", "--output-format", "stream-json"]
        if self.permission_mode:
            argv += ["--permission-mode", self.permission_mode]
        if self.model:
            argv += ["--model", self.model]
        if session_id:
            argv += ["--resume", session_id, "--resume-create-missing"]
        if self.append_system_prompt:
            argv += ["--append-system-prompt", self.append_system_prompt]
        argv += list(self.extra_args)
        return argv

    @property
    def running_processes(self) -> int:
        """How many CLI processes are alive right now."""
        with self._running_lock:
            return len(self._running)

    def version(self, timeout: float = 20.0) -> str:
        """`CODEBUDDY_BIN --version` output; raises OSError/subprocess errors on failure."""
        proc = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=timeout,
                              env=self.run_env(os.environ.get("HOME", "/")), stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"exit code {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}")
        return proc.stdout.strip()

    def run(self, prompt: str, *, conversation: str = "", session_id: str | None = None,
            timeout: float | None = None, cancel_event: threading.Event | None = None,
            on_step: Callable[[str], None] | None = None, run_tag: str = "",
            on_text: Callable[[str], None] | None = None,
            clock: Callable[[], float] = time.monotonic) -> RunResult:
        """Run `prompt` in `conversation`'s workspace and sandbox to completion, timeout or cancellation.

        `on_step` gets each step the agent takes ("工具 Bash"), `on_text` the answer as written so far (the whole
        text each time). Never raises for CLI failures.
        """
        limit = self.timeout if timeout is None else timeout
        started = clock()
        try:
            dirs = self.workspaces.dirs_for(conversation)
            argv, cwd = self.sandbox.command(self.command(session_id), dirs)
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env=self.run_env(self.sandbox.home(dirs), run_tag), start_new_session=True,
            )
        except OSError as exc:
            return self._for_the_chat(RunResult(ok=False, error=f"无法启动 CodeBuddy CLI ({self.binary}): "
                                                                f"{exc.strerror or exc}"), cannot_start=True)
        key = run_tag or f"pid:{proc.pid}"
        with self._running_lock:
            self._running[key] = proc
        stopped = True
        try:
            result = self._supervise(proc, prompt, limit, started, cancel_event, on_step, on_text, clock)
            stopped = result.cancelled or result.timed_out
            return self._for_the_chat(result)
        finally:
            self._kill_group(proc, signal.SIGKILL)  # nothing the run started outlives it
            if stopped:
                # The CLI's Bash tool runs commands in sessions of their own, out of reach of killpg: a CLI
                # that had to be KILLed leaves them behind, so find them by the run's tag.
                self.kill_leftovers(run_tag)
            with self._running_lock:
                self._running.pop(key, None)

    def _for_the_chat(self, result: RunResult, cannot_start: bool = False) -> RunResult:
        """A failure only the operator can fix (the CLI cannot sign in, or start) reads "ask the administrator" in
        the chat; the CLI's own words and the operator's fix are logged once, not for every task, until a run
        succeeds again."""
        if result.ok:
            with self._running_lock:
                self._operator_told.clear()
            return result
        problem = operator_problem(result.error, cannot_start)
        if problem is None:
            return result
        with self._running_lock:
            first = problem.kind not in self._operator_told
            self._operator_told.add(problem.kind)
        if first:
            log.error("%s (CLI: %s; 同类失败不再重复记录)", problem.operator_text, result.error)
        return replace(result, error=problem.user_text)

    def cancel(self, run_tag: str) -> bool:
        """SIGTERM the process group of the run tagged `run_tag` now; `run` escalates to KILL after the grace.

        The caller also sets the run's `cancel_event`, which is how `run` reports it as cancelled.
        """
        with self._running_lock:
            proc = self._running.get(run_tag)
        if proc is None:
            return False
        self._kill_group(proc, signal.SIGTERM)
        return True

    def _supervise(self, proc: subprocess.Popen, prompt: str, limit: float, started: float,
                   cancel_event: threading.Event | None, on_step: Callable[[str], None] | None,
                   on_text: Callable[[str], None] | None, clock: Callable[[], float]) -> RunResult:
        state = StreamState()
        stderr_tail: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)

        def read_stdout() -> None:
            assert proc.stdout is not None
            for raw in proc.stdout:
                text_before = state.answer_text
                step = parse_stream_line(raw.decode("utf-8", "replace"), state)
                try:  # a progress callback must never break the run
                    if step and on_step is not None:
                        on_step(step)
                    if on_text is not None and state.answer_text != text_before:
                        on_text(state.answer_text)
                except Exception:
                    log.exception("progress callback failed")

        def read_stderr() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                stderr_tail.append(raw.decode("utf-8", "replace").rstrip())

        readers = [threading.Thread(target=read_stdout, daemon=True),
                   threading.Thread(target=read_stderr, daemon=True)]
        for reader in readers:
            reader.start()
        threading.Thread(target=self._write_prompt, args=(proc, prompt), daemon=True).start()

        timed_out = cancelled = False
        while True:
            try:
                proc.wait(timeout=self.poll_interval)
                break
            except subprocess.TimeoutExpired:
                pass
            if cancel_event is not None and cancel_event.is_set():
                cancelled = True
            elif clock() - started >= limit:
                timed_out = True
            if cancelled or timed_out:
                self._stop(proc)
                break
        # A cancel() from another thread may have ended the CLI before this loop saw the event; but a CLI that
        # had exited on its own with its answer was not cancelled, however soon after the event came.
        if not (cancelled or timed_out) and cancel_event is not None and cancel_event.is_set():
            cancelled = proc.returncode != 0 or state.result is None
        # Children may keep the pipes open after the CLI exits: the finally in run() kills them.
        self._kill_group(proc, signal.SIGKILL)
        for reader in readers:
            reader.join(timeout=5)
        return result_from_stream(state, proc.returncode if not (timed_out or cancelled) else None,
                                  "\n".join(stderr_tail), clock() - started,
                                  timed_out=timed_out, cancelled=cancelled, limit=limit)

    @staticmethod
    def _write_prompt(proc: subprocess.Popen, prompt: str) -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(prompt.encode("utf-8", "replace"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the CLI died before reading its prompt; its exit status tells the story

    def _stop(self, proc: subprocess.Popen) -> None:
        """TERM the process group, wait the grace period, then KILL it."""
        self._kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            self._kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=5)

    @staticmethod
    def kill_leftovers(run_tag: str, proc_root: str = "/proc") -> int:
        """SIGKILL every process of an earlier run tagged `run_tag` (left behind by a crash); return how many."""
        if not run_tag:
            return 0
        marker = f"{RUN_TAG_VARIABLE}={run_tag}".encode()
        killed = 0
        try:
            entries = [e for e in os.listdir(proc_root) if e.isdigit()]
        except OSError:
            return 0
        for entry in entries:
            try:
                with open(os.path.join(proc_root, entry, "environ"), "rb") as handle:
                    if marker not in handle.read().split(b"\0"):
                        continue
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except (OSError, ValueError):
                continue
        return killed

    @staticmethod
    def _kill_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
