"""Threads that never die silently: supervised loops that log and restart, and exception hooks that log.

Every long-lived thread of the daemon (intake, workers, monitor, store writer, the cluster's lease, listener and
reconcile loops) runs through
`Supervisor.start`: an unexpected exception is logged with its traceback to LOG_FILE and the loop is
started again after a pause. A thread that crashes again and again is reported dead, and `healthy()` turns
False, which stops the systemd watchdog pings so systemd restarts the bot.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

log = logging.getLogger("bot")

RESTART_DELAY = 1.0  # seconds before a crashed loop is started again
CRASH_LIMIT = 5  # crashes within CRASH_WINDOW after which a thread counts as dead
CRASH_WINDOW = 60.0


def install_exception_hooks() -> None:
    """Uncaught exceptions in any thread, or in the main thread, go to the log with their traceback."""

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("线程 %s 未捕获的异常", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def main_hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc, tb)
            return
        log.critical("未捕获的异常，程序退出", exc_info=(exc_type, exc, tb))
        # The traceback went to the log, redacted; the raw one (secrets in its values) does not go to stderr.
        print(f"未捕获的异常，程序退出: {exc_type.__name__} (the traceback is in the log)", file=sys.stderr)

    threading.excepthook = thread_hook
    sys.excepthook = main_hook


@dataclass
class _Watched:
    """One supervised thread and its crash history."""

    name: str
    critical: bool
    thread: threading.Thread | None = None
    crashes: list[float] = field(default_factory=list)
    ended: bool = False  # its loop returned: a normal stop
    given_up: bool = False


class Supervisor:
    """Starts loops on named threads, restarts them after a crash, and says whether the core ones are alive."""

    def __init__(self, *, restart_delay: float = RESTART_DELAY, crash_limit: int = CRASH_LIMIT,
                 crash_window: float = CRASH_WINDOW, clock: Callable[[], float] = time.monotonic) -> None:
        self.restart_delay = restart_delay
        self.crash_limit = crash_limit
        self.crash_window = crash_window
        self.clock = clock
        self._lock = threading.Lock()
        self._watched: dict[str, _Watched] = {}
        self._stopping = threading.Event()

    def start(self, name: str, loop: Callable[[], None], *, critical: bool = True) -> threading.Thread:
        """Run `loop` on a daemon thread called `name`; a return ends it, an exception restarts it."""
        watched = _Watched(name, critical)
        thread = threading.Thread(target=self._run, args=(watched, loop), name=name, daemon=True)
        watched.thread = thread
        with self._lock:
            self._watched[name] = watched
        thread.start()
        return thread

    def stop(self) -> None:
        """No more restarts (shutdown): a loop that crashes now stays down."""
        self._stopping.set()

    def _run(self, watched: _Watched, loop: Callable[[], None]) -> None:
        while True:
            try:
                loop()
            except Exception:
                now = self.clock()
                with self._lock:
                    watched.crashes = [t for t in watched.crashes if now - t < self.crash_window] + [now]
                    give_up = len(watched.crashes) >= self.crash_limit
                    watched.given_up = give_up
                if give_up:
                    log.critical("线程 %s 在 %.0f 秒内崩溃 %d 次，不再重启 (健康检查失败，systemd 将重启机器人)",
                                 watched.name, self.crash_window, len(watched.crashes), exc_info=True)
                    return
                log.error("线程 %s 异常，%.1f 秒后重启", watched.name, self.restart_delay, exc_info=True)
                if self._stopping.wait(self.restart_delay):
                    return
                continue
            with self._lock:
                watched.ended = True
            return

    def dead(self) -> list[str]:
        """Names of critical threads that are not running although nobody stopped them."""
        with self._lock:
            watched = list(self._watched.values())
        if self._stopping.is_set():
            return []
        return [w.name for w in watched
                if w.critical and (w.given_up or (not w.ended and w.thread is not None and not w.thread.is_alive()))]

    def healthy(self) -> bool:
        """True while every critical thread is alive (or ended normally)."""
        return not self.dead()

    def join(self, deadline: float, prefix: str = "") -> None:
        """Wait until `deadline` (time.monotonic) for the threads whose names start with `prefix`."""
        with self._lock:
            threads = [w.thread for w in self._watched.values() if w.thread is not None and w.name.startswith(prefix)]
        for thread in threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))
