"""Run one prompt through the `codebuddy` CLI, inside its conversation's sandbox, and return a `RunResult`.

The CLI runs with `-p --output-format stream-json`, the prompt on stdin (so a prompt starting with `-` is
never a flag and nothing goes through a shell), in its conversation's workspace with an allowlisted environment,
inside the sandbox (codebuddy/sandbox.py), in its own process group so a timeout or a cancel can stop it and every child
it started. Success is only a `result` line with `is_error: false` (docs/wire-facts.md §4).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

from codebuddy import process_tree
from codebuddy.cli_setup import OperatorNotices, choose_cli
from codebuddy.egress import EgressPolicy
from codebuddy.jail_limits import JailLimits
from codebuddy.jail_network import JailNetwork
from codebuddy.run_limits import RunLimits
from codebuddy.run_usage import Usage, process_cpu, turn_usage
from codebuddy.sandbox import (
    Bubblewrap,
    ConversationDirs,
    NoSandbox,
    RunPlace,
    Sandbox,
    Workspaces,
    run_environment,
    start_dir,
)
from codebuddy.spares import SpareKeeper, cli_session
from codebuddy.stream_events import StreamState, follow_event
from codebuddy.warm_pool import WarmPool
from codebuddy.warm_sessions import CLI_MARKER, PROTOCOL_FLAGS, Ask, TurnOutcome, WarmProcess, deny_all
from config import KILL_GRACE, SETTINGS, Config, bot_files

log = logging.getLogger("codebuddy_client")

_BOT_SETTINGS = frozenset(setting.env for setting in SETTINGS)

# Every CLI run carries this variable (value: the task id); it survives into the CLI's children, so the
# processes of a run interrupted by a crash can be found and stopped on the next start.
RUN_TAG_VARIABLE = "CODEBUDDY_BOT_RUN"

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
    usage: Usage | None = None  # tokens, cost, model and CPU time of the turn (None: no turn ran)


def result_from_stream(state: StreamState, returncode: int | None, stderr_tail: str, duration: float,
                       *, timed_out: bool = False, cancelled: bool = False, limit: float = 0.0) -> RunResult:
    """Decide success or failure from what the stream said, the exit code and stderr."""
    common = {"duration": duration, "session_id": state.session_id, "last_step": state.last_step,
              "usage": state.usage}
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
                      hidden=bot_files(config.task_db, config.log_file, config.codebuddy_workdir),
                      network=jail_network_from_config(config), limits=JailLimits(run_limits_from_config(config)))


def run_limits_from_config(config: Config) -> RunLimits:
    """RUN_MAX_PROCS, RUN_MEMORY_MB, RUN_TMP_MB and WORKSPACE_MAX_MB; runs at nice 10."""
    return RunLimits(max_procs=config.run_max_procs, memory_mb=config.run_memory_mb, tmp_mb=config.run_tmp_mb,
                     workspace_max_mb=config.workspace_max_mb)


def jail_network_from_config(config: Config) -> JailNetwork | None:
    """Each run's own network namespace with the egress proxy as its way out (CODEBUDDY_EGRESS=off: the host's
    network, as before); raises ValueError naming the setting of a bad policy."""
    if config.codebuddy_egress == "off":
        return None
    base_url = {**os.environ, **dict(config.cli_env)}.get("CODEBUDDY_BASE_URL", "")
    policy = EgressPolicy.from_settings(config.codebuddy_egress, config.codebuddy_egress_allow,
                                        config.codebuddy_egress_deny, base_url)
    return JailNetwork(policy, base_url=base_url)


class CodeBuddyClient:
    """Runs prompts through the CLI, each conversation in its own warm process (codebuddy/warm_pool.py). Thread-safe."""

    def __init__(self, binary: str, workdir: str, *, model: str = "", extra_args: Iterable[str] = (),
                 permission_mode: str = "acceptEdits", timeout: float = 1800.0, kill_grace: float = 3.0,
                 env: Mapping[str, str] | None = None, poll_interval: float = 0.1,
                 sandbox: Sandbox | None = None, warm_sessions: int = 0, warm_idle_seconds: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, append_system_prompt: str = "",
                 spare_sessions: int = 0, spare_memory_floor: int = 0) -> None:
        # A relative path with a slash would be looked up from the run's cwd (the workspace): pin it now.
        self.binary = os.path.abspath(binary) if os.sep in binary and not os.path.isabs(binary) else binary
        self.workspaces = Workspaces(workdir)
        self.model = model
        self.extra_args = tuple(extra_args)
        self.permission_mode = permission_mode
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.poll_interval = poll_interval
        self.clock = clock
        self.sandbox: Sandbox = sandbox if sandbox is not None else NoSandbox()
        self.append_system_prompt = append_system_prompt  # e.g. where to leave files for the chat (outbox_files)
        self.place_for: Callable[[str], RunPlace] | None = None  # where a conversation starts (a project's checkout)
        # Where each run's allowlisted environment is taken from (sandbox.run_environment picks).
        self._env_source = dict(os.environ if env is None else env)
        self.pool = WarmPool(warm_sessions, warm_idle_seconds, clock=clock,
                             stop=lambda process: self._end_process(process))
        self.spares = SpareKeeper(spare_sessions if self.sandbox.name != "none" else 0, self.pool, self.workspaces,
                                  lambda dirs, cli: self._spawn("", cli, cli, dirs), self._end_process,
                                  memory_floor=spare_memory_floor, max_age=warm_idle_seconds,
                                  interval=min(30.0, warm_idle_seconds / 4), clock=clock)
        # Every process of this bot's workspaces carries a tag starting with this (found again after a crash).
        self.tag_prefix = "w" + hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:10] + "-"
        self._running: dict[str, WarmProcess] = {}  # by run tag (the task id)
        self._running_lock = threading.Lock()
        self._operator = OperatorNotices()  # operator-side problems logged since the last good run
        if getattr(self.sandbox, "network", None) is not None:  # its refusals are logged with their task
            self.sandbox.network.on_refusal = self.egress_refused

    @classmethod
    def from_config(cls, config: Config) -> CodeBuddyClient:
        """The client the bot's settings describe (with the CLI variables from .env), in its sandbox."""
        return cls(choose_cli(config.codebuddy_bin).path, config.codebuddy_workdir, model=config.codebuddy_model,
                   extra_args=config.codebuddy_extra_args, permission_mode=config.codebuddy_permission_mode,
                   timeout=config.task_timeout, kill_grace=KILL_GRACE, env={**os.environ, **dict(config.cli_env)},
                   sandbox=sandbox_from_config(config), warm_sessions=config.warm_sessions,
                   warm_idle_seconds=config.warm_idle_seconds, spare_sessions=config.spare_sessions,
                   spare_memory_floor=config.run_memory_mb << 20)

    def run_env(self, home: str, run_tag: str = "") -> dict[str, str]:
        """The environment of one run: allowlisted (never a bot setting or secret), HOME = the conversation's."""
        env = run_environment(self._env_source, home, _BOT_SETTINGS)
        if run_tag:
            env[RUN_TAG_VARIABLE] = run_tag
        return env

    def place(self, conversation: str) -> RunPlace:
        """Where the conversation's CLI process starts (a project's checkout, with a note), by `place_for`."""
        return self.place_for(conversation) if self.place_for is not None and conversation else RunPlace()

    def command(self, session_id: str, note: str = "") -> list[str]:
        """The argv of one CLI process (prompts go on stdin as stream-json messages, never on the command line);
        `note` is added to the system prompt."""
        argv = [self.binary, "-p", *PROTOCOL_FLAGS]
        if self.permission_mode:
            argv += ["--permission-mode", self.permission_mode]
        if self.model:
            argv += ["--model", self.model]
        # --session-id continues the session if it exists; --resume-create-missing with `initialize` loses the
        # first message (docs/warm-sessions.md).
        argv += ["--session-id", session_id]
        system_prompt = "\n\n".join(part for part in (self.append_system_prompt, note) if part)
        if system_prompt:
            argv += ["--append-system-prompt", system_prompt]
        argv += list(self.extra_args)
        return argv

    @property
    def running_processes(self) -> int:  # CLI processes alive now (warm ones included)
        return len(self.pool.processes())

    def warm_stats(self) -> dict[str, int]:
        """Warm processes (live, idle, busy, capacity, memory) and hits/misses/ended since start (`WarmPool.stats`)."""
        return self.pool.stats()

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
            on_text: Callable[[str], None] | None = None, ask: Ask | None = None,
            clock: Callable[[], float] | None = None) -> RunResult:
        """Run `prompt` in `conversation`'s warm process (started in its sandbox if there is none) to its answer,
        `timeout` (time waiting for `ask` included) or a cancel.

        `on_step` gets each step the agent takes ("工具 Bash"), `on_text` the answer as written so far (the whole
        text each time); `ask` answers the CLI's requests to use a tool the permission mode does not allow
        (none: they are denied). Never raises for CLI failures.
        """
        limit = self.timeout if timeout is None else timeout
        clock = clock or self.clock
        started = clock()
        session_id = session_id or new_session_id()
        refusal = self.sandbox.refusal(self.workspaces.dirs_for(conversation))
        if refusal:  # the conversation's workspace is full: no turn until files are deleted (or /new)
            return RunResult(ok=False, error=refusal, session_id=session_id)
        state = StreamState()
        # The conversation's warm process, else a spare for its session's first prompt (codebuddy/spares.py).
        process = self.pool.take(conversation, session_id) or (  # a project's chat starts in its checkout: no spare
            None if self.place(conversation).subdir else self.spares.adopt(conversation, session_id))
        reused = process is not None
        while True:
            if process is None:
                process, failure = self._start(conversation, session_id)
                if failure is not None or process is None:
                    failure = failure or RunResult(ok=False, error="CLI did not start")
                    return self._operator.for_the_chat(replace(failure, duration=clock() - started), cannot_start=True)
            outcome, cancelled, timed_out, keep = self._turn(process, prompt, run_tag, limit, cancel_event, ask,
                                                             state, on_step, on_text)
            if reused and outcome.process_died and not outcome.echoed and not (cancelled or timed_out):
                # The warm process had died (or was dying) before it took the prompt: a fresh one resumes the
                # session from disk, so the message is answered rather than lost.
                log.info("CodeBuddy 进程 %d 已不可用，改用新进程", process.pid)
                process, reused = None, False
                continue
            break
        returncode = None
        if outcome.process_died:
            try:
                returncode = process.proc.wait(timeout=self.kill_grace)
            except subprocess.TimeoutExpired:
                returncode = None
        result = result_from_stream(state, returncode, "\n".join(process.stderr_tail),
                                    clock() - started - outcome.waited, timed_out=timed_out,
                                    cancelled=cancelled, limit=limit)
        reason = self.sandbox.limit_reason(process.tag)
        if reason:  # the run met a limit (memory, processes): say which, in one line
            result = replace(result, **({"text": f"{result.text}\n\n{reason}"} if result.ok else {"error": reason}))
        return self._operator.for_the_chat(result)

    def _turn(self, process: WarmProcess, prompt: str, run_tag: str, limit: float,
              cancel_event: threading.Event | None, ask: Ask | None, state: StreamState,
              on_step: Callable[[str], None] | None, on_text: Callable[[str], None] | None
              ) -> tuple[TurnOutcome, bool, bool, bool]:
        """One turn in `process`, which is given back to the pool after it (kept warm if it ended cleanly)."""
        if run_tag:
            with self._running_lock:
                self._running[run_tag] = process
        keep = False
        try:
            outcome, cancelled, timed_out = process.turn(
                prompt, limit=limit, cancel_event=cancel_event, ask=ask or deny_all, poll=self.poll_interval,
                on_event=lambda event: follow_event(event, state, on_step, on_text))
            keep = outcome.ended and not outcome.process_died and not any(
                e.get("type") == "error" for e in outcome.events)
            if cancelled or timed_out:
                keep = outcome.interrupted and process.stop_tools()
            cli = process_tree.cli_pid(process.proc.pid, CLI_MARKER)
            keep = self.sandbox.end_turn(process.tag, cli) and keep  # nothing of the turn outlives it
            state.usage = turn_usage(state.result, self.workspaces.base_for(process.conversation), process.cli_session,
                                     process_cpu(self.sandbox, process), self.model)
            return outcome, cancelled, timed_out, keep
        finally:
            with self._running_lock:
                self._running.pop(run_tag, None)
            self.pool.give_back(process, keep=keep, reason="" if keep else "本轮未正常结束")

    def _start(self, conversation: str, session_id: str) -> tuple[WarmProcess | None, RunResult | None]:
        """Start the conversation's CLI process in its sandbox and wait for it to answer `initialize`."""
        reserved = self.pool.reserve()  # below: the CLI session is an adopted spare's, if any (codebuddy/spares.py)
        process, error = self._spawn(conversation, session_id, cli_session(self.workspaces, conversation, session_id))
        if process is None:
            if reserved:
                self.pool.unreserve()
            return None, RunResult(ok=False, error=error)
        self.pool.started(process, reserved)
        problem = process.wait_ready()
        if problem and not process.alive() and process.stderr_tail:
            problem = f"{problem}: {process.stderr_tail[-1]}"
        if problem and "exited" in problem:
            # It ended before its first turn (a bad flag, a missing library): its stderr says why.
            self.pool.give_back(process, keep=False, reason="启动失败")
            detail = "\n".join(process.stderr_tail).strip() or problem
            return process, RunResult(ok=False, error=f"CLI exited with code {process.proc.poll()}: {detail}")
        return process, None

    def _spawn(self, conversation: str, session_id: str, cli: str,
               dirs: ConversationDirs | None = None) -> tuple[WarmProcess | None, str]:
        """A CLI process on the CLI session `cli` in `dirs`' jail (default: the conversation's), or None and why."""
        tag = self.tag_prefix + uuid.uuid4().hex[:12]
        try:
            dirs = dirs or self.workspaces.dirs_for(conversation)
            place = self.place(conversation)
            subdir = start_dir(dirs.workspace, place.subdir)  # gone or replaced by a link: the workspace
            argv, cwd = self.sandbox.command(self.command(cli, place.note if subdir else ""), dirs, run_id=tag,
                                             subdir=subdir)
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=cwd, env={**self.run_env(self.sandbox.home(dirs), tag), **self.sandbox.environment()},
                start_new_session=True, preexec_fn=self.sandbox.preexec(tag, dirs),
            )
        except (OSError, subprocess.SubprocessError) as exc:  # a limit the preexec could not set: no unbounded run
            self.sandbox.release(tag)
            return None, f"无法启动 CodeBuddy CLI ({self.binary}): {exc.strerror or exc}"
        return WarmProcess(proc, conversation=conversation, session_id=session_id, tag=tag, clock=self.clock,
                           cli_session=cli), ""

    def _end_process(self, process: WarmProcess) -> None:
        """Stop a process and all its tools started (in a jail its pid namespace takes them; outside, its run tag)."""
        process.stop(self.kill_grace)
        self.sandbox.release(process.tag)
        self.spares.ended(process)  # a spare nobody adopted: its directories go
        if self.sandbox.name == "none":  # every process tagged with it
            process_tree.kill_tagged(RUN_TAG_VARIABLE, process.tag)

    def egress_refused(self, process_tag: str, host: str, reason: str) -> None:
        """The egress proxy refused `host` to a run (once per process and host): logged with the task it serves."""
        with self._running_lock:  # the task the process serves now
            task_id = next((tag for tag, process in self._running.items() if process.tag == process_tag), "-")
        log.warning("网络请求被拒绝: %s: %s task=%s", host, reason, task_id)

    def cancel(self, run_tag: str) -> bool:
        """Whether the run `run_tag` is in progress; it interrupts its turn once its `cancel_event` is set."""
        with self._running_lock:
            return run_tag in self._running

    def start(self) -> None:
        """At start: kill what a crash of this bot left, end idle processes in time, keep spares ready."""
        orphans = self.kill_orphans()
        if orphans:
            log.warning("已结束上次运行遗留的 %d 个 CLI 进程", orphans)
        self.pool.start_reaper(min(30.0, self.pool.idle_seconds / 4))
        self.spares.start()

    def close(self) -> None:
        """Stop starting spares, end every idle warm process and spare (shutdown), then the egress proxy."""
        self.spares.stop()
        self.pool.stop_all()
        if getattr(self.sandbox, "network", None) is not None:
            self.sandbox.network.close()

    def kill_orphans(self) -> int:
        """SIGKILL every process a previous run of this bot (same workspaces) left behind, e.g. after a crash."""
        live = {process.tag for process in self.pool.processes()}  # tags starting with this bot's prefix, but these
        return process_tree.kill_tagged(RUN_TAG_VARIABLE, self.tag_prefix, prefix=True, keep=live)
