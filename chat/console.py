"""The terminal console (`python bot.py console`): each typed line goes through the same chat app, task manager
and CLI as a DingTalk 1:1 message, and what the chat would show is printed."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TextIO

from async_task_manager import AsyncTaskManager
from chat.app import ChatApp
from codebuddy_client import CodeBuddyClient
from config import KILL_GRACE, Config
from dingtalk.incoming import IncomingMessage
from dingtalk.route import Route
from dingtalk_sender import Delivery
from projects.wiring import project_commands, with_project_runs
from store.memory import MemoryTaskStore


class ConsoleSender:
    """The sender seam of `DingTalkSender`, printing what the chat would show instead of calling DingTalk.

    It picks the path the real sender would (the session webhook while it is alive and allowed, else a
    push), so the console shows which answers are replies and which are pushed results.
    """

    def __init__(self, out: TextIO | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.out = out or sys.stdout
        self.stats: dict[str, int] = {}
        self.last_activity = clock()
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()

    def print_line(self, text: str) -> None:
        """Print a line of the console itself (never interleaved with a message)."""
        with self._lock:
            print(text, file=self.out, flush=True)

    def send(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             allow_webhook: bool = True, retry_window: float | None = None) -> Delivery:
        """Print `text` under a header naming the path it would take; always delivered."""
        path = route.path_for(allow_webhook, self._wall_clock() * 1000)
        how = path if path == "webhook" else f"push {path}"
        header = f"[bot · {how}" + (f' · markdown "{title}"' if markdown else "") + "]"
        body = text.replace("\n", "\n  ")  # indented continuation lines: one message reads as one block
        with self._lock:
            print(f"{header} {body}", file=self.out, flush=True)
            self.stats[f"{path}_ok"] = self.stats.get(f"{path}_ok", 0) + 1
            self.last_activity = self._clock()
        return Delivery(ok=True, path=path)


def _busy(manager: AsyncTaskManager) -> bool:
    stats = manager.stats
    if stats["queue_length"] or stats["running"]:
        return True
    return any(not (task.finished and task.delivered) for task in manager.tasks_for(None, limit=10_000))


def wait_until_idle(manager: AsyncTaskManager, sender: ConsoleSender, *, quiet: float = 0.3, poll: float = 0.05,
                    timeout: float | None = None, clock: Callable[[], float] = time.monotonic,
                    also_busy: Callable[[], bool] = lambda: False) -> bool:
    """Block until no task is queued, running or undelivered and nothing was printed for `quiet` seconds.

    The quiet period lets answers already on their way (a /cancel confirmation, a command reply) come out.
    Returns False if `timeout` passed first.
    """
    started = clock()
    last_busy = started
    while True:
        now = clock()
        if _busy(manager) or also_busy():  # also_busy: project commands still at work
            last_busy = now
        elif now - max(last_busy, sender.last_activity) >= quiet:
            return True
        if timeout is not None and now - started >= timeout:
            return False
        time.sleep(poll)


def build_console_app(config: Config, sender: ConsoleSender) -> ChatApp:
    """A chat app like the daemon's (same settings, real CLI, the projects of PROJECTS_FILE; no files sent) with an
    in-memory store and the console sender."""
    cli = CodeBuddyClient.from_config(config)
    client, bindings = with_project_runs(config, cli, cli)
    manager = AsyncTaskManager.from_config(config, client, sender, MemoryTaskStore())
    projects = None if bindings is None else project_commands(config, cli, bindings, new_session=manager.new_session,
                                                               send_file=None)
    return ChatApp(manager, config, projects=projects)


CONSOLE_BANNER = ("CodeBuddy console: each line you type goes to the bot as a DingTalk 1:1 message would.\n"
                  "/help lists the commands; Ctrl-D quits after running tasks finish, Ctrl-C quits at once.")
# The console's session webhook never expires, like a chat the user keeps open.
_CONSOLE_WEBHOOK_TTL = 10 * 365 * 86400.0


def run_console(config: Config, *, user_id: str = "console", stdin: TextIO | None = None, out: TextIO | None = None,
                quiet: float = 0.3, wall_clock: Callable[[], float] = time.time) -> int:
    """`python bot.py console`: chat through `ChatApp` in the terminal; EOF waits for running tasks, then 0.

    Each line becomes the same neutral `IncomingMessage` a DingTalk frame becomes.
    """
    stdin = stdin or sys.stdin
    sender = ConsoleSender(out, wall_clock=wall_clock)
    app = build_console_app(config, sender)
    manager = app.manager
    interactive = stdin.isatty()
    if interactive:
        sender.print_line(CONSOLE_BANNER)
    manager.start()
    conversation = f"console-{user_id}"
    try:
        while True:
            line = stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if not interactive:
                sender.print_line(f"> {text}")  # a piped transcript shows what was said
            app.handle(IncomingMessage(
                msg_id=f"console-{uuid.uuid4().hex}", user_id=user_id, user_name=user_id, conversation_type="1",
                conversation_id=conversation, text=text, msgtype="text", session_webhook="console://session",
                webhook_expires_ms=int((wall_clock() + _CONSOLE_WEBHOOK_TTL) * 1000)))
        wait_until_idle(manager, sender, quiet=quiet,
                        also_busy=lambda: app.projects is not None and app.projects.pending > 0)
    except KeyboardInterrupt:
        sender.print_line("interrupted: stopping running tasks")
        manager.shutdown(0, after_grace=KILL_GRACE + 1)
        return 130
    manager.shutdown(0, after_grace=KILL_GRACE + 1)
    return 0
