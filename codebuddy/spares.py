"""Spare CLI processes: SPARE_SESSIONS started ahead in jails of their own with fresh, empty directories, each adopted
by the next conversation that has no CLI session yet (docs/warm-sessions.md, "Spare processes").

A spare starts like any conversation's process — the same sandbox, limits, network namespace and environment — but
in directories of its own under CODEBUDDY_WORKDIR/spares/ and on a CLI session id of its own, and is never sent a
prompt. When a conversation's first prompt (a new chat, or the first after /new) finds no warm process, it takes the
oldest spare: the spare's directories become the conversation's (`Workspaces.adopt`: the jail's bind mounts follow
the rename), the conversation's session is recorded as the spare's CLI session (a process started later for it
resumes that one), and a new spare starts once its first turn is over. A spare only takes a free WARM_SESSIONS slot,
is the first evicted, is replaced after WARM_IDLE_SECONDS, and is not started while the host is short of memory.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable

from codebuddy.sandbox import ConversationDirs, Workspaces
from codebuddy.warm_pool import WarmPool
from codebuddy.warm_sessions import WarmProcess

log = logging.getLogger("codebuddy_client")

ALIASES_FILE = "cli-sessions.json"  # beside the conversation's workspace and home, out of its runs' sight
# The next spare starts when the adopted process's first turn has ended (its CPU first: a CLI start takes 2-4 s of CPU),
# or this many seconds after the adoption if the turn is still running then (waiting for the model, mostly).
REFILL_AFTER = 5.0
RETRY_SECONDS = 60.0  # after a spare failed to start
# What a CLI start reads and a spare, started before its conversation was known, has not: CODEBUDDY.md is read at
# start only (checked with the real CLI 2.163.0), and so, presumably, are the others. Where the conversation's
# directories hold one of these, its first prompt starts a process of its own instead.
WORKSPACE_STARTUP_NAMES = ("CODEBUDDY.md", "CODEBUDDY.local.md", "AGENTS.md", "CLAUDE.md", ".codebuddy", ".claude",
                           ".mcp.json")
HOME_STARTUP_NAMES = ("CODEBUDDY.md", ".claude", ".mcp.json")
# What the CLI keeps of its own in $HOME/.codebuddy (state, not settings; seen after runs of 2.163.0 with Bash, Read and
# Write, and `todos`, its TodoWrite store, read from the binary). Anything else there may be settings, memory, agents,
# commands, hooks, …
CLI_STATE_NAMES = frozenset(("projects", "sessions", "local_storage", "logs", "traces", "shell-snapshots",
                             "diagnostics", "user-state.json", "file-history", "todos"))
CLI_STATE_IF_EMPTY = frozenset(("plugins",))

# (directories, CLI session id) → a started process (not waited for), or None and why not
StartSpare = Callable[[ConversationDirs, str], tuple[WarmProcess | None, str]]


def _aliases(workspaces: Workspaces, conversation: str) -> dict[str, str]:
    try:
        with open(os.path.join(workspaces.base_for(conversation), ALIASES_FILE), encoding="utf-8") as handle:
            aliases = json.load(handle)
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in aliases.items()} if isinstance(aliases, dict) else {}


def cli_session(workspaces: Workspaces, conversation: str, session_id: str) -> str:
    """The CLI session a process for the conversation's `session_id` runs on — the spare's it adopted, else the same
    id — recorded as in use, so that no spare is ever adopted for this session later."""
    aliases = _aliases(workspaces, conversation)
    if session_id not in aliases:
        try:
            record_cli_session(workspaces, conversation, session_id, session_id)
        except OSError as exc:  # the run goes on; at worst a later first prompt of this session takes a spare
            log.warning("无法记录会话的 CLI 会话: %s", exc)
    return aliases.get(session_id, session_id)


def record_cli_session(workspaces: Workspaces, conversation: str, session_id: str, cli: str) -> None:
    """Remember that the conversation's `session_id` lives in the CLI session `cli`."""
    base = workspaces.base_for(conversation)
    os.makedirs(base, mode=0o700, exist_ok=True)
    path = os.path.join(base, ALIASES_FILE)
    aliases = {**_aliases(workspaces, conversation), session_id: cli}
    temporary = f"{path}.{uuid.uuid4().hex[:8]}"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        json.dump(aliases, handle)
    os.replace(temporary, path)


def has_cli_session(workspaces: Workspaces, conversation: str, session_id: str, dirs: ConversationDirs) -> bool:
    """Whether the conversation's `session_id` already exists for the CLI (a process was started for it, or its
    transcript is in the CLI home: a session from before spares): then a process must resume it, and no spare can."""
    if session_id in _aliases(workspaces, conversation):
        return True
    pattern = os.path.join(glob.escape(dirs.home), ".codebuddy", "projects", "*", glob.escape(session_id) + ".jsonl")
    return bool(glob.glob(pattern))


def startup_files(dirs: ConversationDirs) -> list[str]:
    """What the conversation's directories hold that a CLI reads when it starts (a spare has read none of it)."""
    found = [name for name in WORKSPACE_STARTUP_NAMES if os.path.lexists(os.path.join(dirs.workspace, name))]
    found += ["~/" + name for name in HOME_STARTUP_NAMES if os.path.lexists(os.path.join(dirs.home, name))]
    state = os.path.join(dirs.home, ".codebuddy")
    try:
        entries = list(os.scandir(state))
    except OSError:
        entries = []
    for entry in entries:
        if entry.name not in CLI_STATE_NAMES and not (entry.name in CLI_STATE_IF_EMPTY and _empty_dir(entry)):
            found.append("~/.codebuddy/" + entry.name)
    return found


def _empty_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False) and not os.listdir(entry.path)
    except OSError:
        return False


def memory_available(meminfo: str = "/proc/meminfo") -> int | None:
    """The host's MemAvailable in bytes; None when it cannot be read."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class SpareKeeper:
    """Keeps `count` spares ready in the warm pool, replaces old ones, and hands one to a new conversation. The client
    asks for none with CODEBUDDY_SANDBOX=none: outside a jail a CLI sees host paths, which adoption changes."""

    def __init__(self, count: int, pool: WarmPool, workspaces: Workspaces, start: StartSpare,
                 end: Callable[[WarmProcess], None], *, memory_floor: int = 0, meminfo: str = "/proc/meminfo",
                 max_age: float = 600.0, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.count = count
        self.pool = pool
        self.workspaces = workspaces
        self._start = start
        self._end = end
        self.memory_floor = memory_floor  # bytes the host must have available for a spare to start (RUN_MEMORY_MB)
        self.meminfo = meminfo
        self.max_age = max_age
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._dirs: dict[str, ConversationDirs] = {}  # a live spare's directories, by its run tag
        self._retry_at = 0.0
        self._problem = ""  # the last reason spares could not start (logged once per change)
        self._adopted: list[WarmProcess] = []  # adopted since the keeper last looked: their first turns come first
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # -- a conversation takes a spare

    def adopt(self, conversation: str, session_id: str) -> WarmProcess | None:
        """A spare for the conversation's first prompt in `session_id`, its directories now the conversation's and
        marked busy in the pool; None when the session exists already, the conversation's directories hold what a
        CLI reads at start, or no spare is ready."""
        if self.count <= 0:
            return None
        dirs = self.workspaces.dirs_for(conversation)
        if has_cli_session(self.workspaces, conversation, session_id, dirs):
            return None
        startup = startup_files(dirs)
        if startup:
            log.info("会话目录含有 CLI 启动时读取的 %s: 不使用备用进程", ", ".join(startup[:3]))
            return None
        process = self.pool.take_spare()
        if process is None:
            return None
        with self._lock:
            spare = self._dirs.pop(process.tag, None)
        try:
            if spare is None:  # not one this keeper started
                raise OSError(f"no directories known for {process.tag}")
            self.workspaces.adopt(conversation, spare)
            record_cli_session(self.workspaces, conversation, session_id, process.cli_session)
        except OSError as exc:
            log.error("备用 CodeBuddy 进程 %d 无法接手会话: %s", process.pid, exc)
            self.pool.give_back(process, keep=False, reason="接手失败")
            return None
        process.conversation, process.session_id = conversation, session_id
        log.info("备用 CodeBuddy 进程 %d 接手新会话 (启动于 %.0f 秒前)", process.pid, self.clock() - process.started_at)
        with self._lock:
            self._adopted.append(process)
        self.wake()
        return process

    def ended(self, process: WarmProcess) -> None:
        """A process has ended: if it was a spare nobody adopted, its directories go."""
        with self._lock:
            spare = self._dirs.pop(process.tag, None)
        if spare is not None:
            self.workspaces.remove_spare(spare)

    # -- keeping spares ready

    def tend(self) -> int:
        """Replace spares older than `max_age`, end them all while memory is short, and start spares until `count`
        are ready or starting; return how many started."""
        now = self.clock()
        self.pool.end_spares(f"备用进程已存在超过 {self.max_age:.0f} 秒，换新", started_before=now - self.max_age)
        available = memory_available(self.meminfo) if self.memory_floor else None
        if available is not None and available < self.memory_floor:
            self.pool.end_spares("主机内存不足")
            self._note(f"主机可用内存 {available >> 20} MB，低于 {self.memory_floor >> 20} MB")
            return 0
        if now < self._retry_at:
            return 0
        started = 0
        while not self._stopping.is_set() and self.pool.reserve_spare(self.count):
            if self._start_one() is None:
                self._retry_at = self.clock() + RETRY_SECONDS
                break
            started += 1
            self._note("")
        return started

    def _start_one(self) -> WarmProcess | None:
        """Start one spare in fresh directories and wait for it to answer `initialize` (a slot is reserved)."""
        try:
            dirs = self.workspaces.new_spare()
        except OSError as exc:
            self.pool.spare_ready(None)
            self._note(f"无法创建备用目录: {exc}")
            return None
        process, problem = self._start(dirs, str(uuid.uuid4()))
        if process is None:
            self.pool.spare_ready(None)
            self.workspaces.remove_spare(dirs)
            self._note(problem)
            return None
        with self._lock:
            self._dirs[process.tag] = dirs
        log.info("启动备用 CodeBuddy 进程 %d", process.pid)
        problem = process.wait_ready()
        if problem:
            self.pool.spare_ready(None)
            self._note(f"{problem}: {process.stderr_tail[-1]}" if process.stderr_tail else problem)
            self._end(process)
            return None
        if not self.pool.spare_ready(process):  # the bot is stopping
            self._end(process)
            return None
        return process

    def _note(self, problem: str) -> None:
        """Log why spares cannot start, once per reason (and once when they can again)."""
        if problem != self._problem:
            if problem:
                log.warning("备用 CodeBuddy 进程未启动: %s", problem)
            elif self._problem:
                log.info("备用 CodeBuddy 进程恢复启动")
        self._problem = problem

    # -- the keeper thread

    def start(self) -> None:
        """Clear what earlier spares left on disk and keep spares ready from now on (a daemon thread)."""
        if self.count <= 0 or self._thread is not None:
            return
        self.workspaces.clear_spares()
        self._thread = threading.Thread(target=self._run, daemon=True, name="spare-keeper")
        self._thread.start()

    def wake(self) -> None:
        """Start a spare soon: one was just adopted (its first turn ends first, for REFILL_AFTER s at most)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tend()
            except Exception:  # the next round tries again
                log.exception("维护备用 CodeBuddy 进程时出错")
            self._wake.wait(self.interval)
            self._wake.clear()
            with self._lock:
                adopted, self._adopted = self._adopted, []
            deadline = time.monotonic() + REFILL_AFTER
            for process in adopted:
                self.pool.wait_given_back(process, max(0.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 2.0) -> None:
        """Stop starting spares (one being started is ended once it is ready: the pool is closed by then)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
