"""The warm CodeBuddy processes of this host: at most WARM_SESSIONS alive, spares included, a spare evicted first
and then the least recently used idle one, idle ones ended after WARM_IDLE_SECONDS (docs/warm-sessions.md).

A conversation's process is taken for a turn and given back after it; only idle processes and spares are ever
evicted. Ending a process loses nothing: its next run starts a new one on the same session, which the CLI reads back
from disk. A spare (codebuddy/spares.py) has no conversation yet: it only takes a free slot, never a conversation's.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from codebuddy import process_tree
from codebuddy.warm_sessions import WarmProcess

log = logging.getLogger("codebuddy_client")


class WarmPool:
    """Idle warm processes by conversation (least recently used first), the ones running a turn, and spares."""

    def __init__(self, capacity: int, idle_seconds: float, *, clock: Callable[[], float] = time.monotonic,
                 stop: Callable[[WarmProcess], None] | None = None) -> None:
        self.capacity = capacity
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._stop_process = stop or (lambda process: process.stop())
        self._lock = threading.Lock()
        self._given_back = threading.Condition(self._lock)  # notified when a turn's process is given back
        self._idle: collections.OrderedDict[str, WarmProcess] = collections.OrderedDict()
        self._busy: dict[int, WarmProcess] = {}  # by pid: processes running a turn
        self._reserved = 0  # warm slots promised to processes being started
        self._spares: collections.deque[WarmProcess] = collections.deque()  # ready for a new conversation, oldest first
        self._spares_starting = 0  # slots promised to spares being started
        self._closed = False  # stop_all ran: a spare that finishes starting now is ended, not kept
        self.hits = 0
        self.misses = 0
        self.adopted = 0  # runs whose conversation took a spare
        self.ended: collections.Counter[str] = collections.Counter()  # processes ended, by reason
        self._reaper_stop = threading.Event()

    def _used(self) -> int:
        """Slots taken: idle, busy, promised, spares and spares being started (under the lock)."""
        return len(self._idle) + len(self._busy) + self._reserved + len(self._spares) + self._spares_starting

    # -- a run takes a process and gives it back

    def take(self, conversation: str, session_id: str) -> WarmProcess | None:
        """The conversation's warm process for `session_id`, marked busy; None when there is none to reuse."""
        with self._lock:
            process = self._idle.pop(conversation, None)
            if process is not None:
                self._busy[process.pid] = process
        if process is not None and process.alive() and process.session_id == session_id:
            with self._lock:
                self.hits += 1
            log.info("复用 CodeBuddy 进程 %d (会话已有 %d 轮)", process.pid, process.turns)
            return process
        if process is not None:
            with self._lock:  # it holds no slot from now on
                self._busy.pop(process.pid, None)
            self._end(process, "输出异常" if process.flood else "进程已退出" if not process.alive()
                      else "会话已重置 (/new)")
        with self._lock:
            self.misses += 1
        return None

    def reserve(self) -> bool:
        """Make room for one more warm process (evicting the least recently used idle one if the pool is full);
        False when every slot runs a turn: the new process then ends after its turn."""
        evicted = None
        with self._lock:
            if self.capacity <= 0:
                return False
            if self._used() >= self.capacity and self._spares:  # a spare goes first: it serves nobody yet
                evicted = self._spares.popleft()
            elif self._used() >= self.capacity and self._idle:
                _, evicted = self._idle.popitem(last=False)
            if self._used() < self.capacity:
                self._reserved += 1
                reserved = True
            else:
                reserved = False
        if evicted is not None:
            self._end(evicted, f"为新会话腾出位置 (WARM_SESSIONS={self.capacity})")
        return reserved

    def started(self, process: WarmProcess, reserved: bool) -> None:
        """A new process runs its first turn (`reserved`: it holds a slot from `reserve`)."""
        with self._lock:
            if reserved:
                self._reserved -= 1
            self._busy[process.pid] = process
        log.info("启动 CodeBuddy 进程 %d (%s)", process.pid, "保持常驻" if reserved else "本轮结束后退出，常驻名额已满")

    def unreserve(self) -> None:
        """A reserved start failed: free its slot."""
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def give_back(self, process: WarmProcess, *, keep: bool, reason: str = "") -> None:
        """The turn is over: keep the process warm for the conversation's next message, or end it (`reason`)."""
        with self._lock:
            self._busy.pop(process.pid, None)
            self._given_back.notify_all()
            room = self._used() < self.capacity
            if keep and room and process.alive():
                replaced = self._idle.pop(process.conversation, None)
                self._idle[process.conversation] = process
            else:
                replaced = None
        if replaced is not None and replaced is not process:
            self._end(replaced, "同一会话的另一进程")
        if not (keep and room and process.alive()):
            self._end(process, reason or ("进程已退出" if not process.alive() else "常驻名额已满"))

    # -- spares: processes started ahead for the next new conversation (codebuddy/spares.py starts them)

    def reserve_spare(self, wanted: int) -> bool:
        """Promise a slot to one more spare: only while fewer than `wanted` exist and a slot is free (a spare never
        evicts a conversation's process)."""
        with self._lock:
            if self._closed or len(self._spares) + self._spares_starting >= wanted or self._used() >= self.capacity:
                return False
            self._spares_starting += 1
            return True

    def spare_ready(self, process: WarmProcess | None) -> bool:
        """A spare promised by `reserve_spare` answered `initialize` (None: it did not start); False when it is not
        kept (the bot is stopping): the caller ends it."""
        with self._lock:
            self._spares_starting = max(0, self._spares_starting - 1)
            if process is None or self._closed:
                return False
            self._spares.append(process)
        log.info("备用 CodeBuddy 进程 %d 已就绪", process.pid)
        return True

    def take_spare(self) -> WarmProcess | None:
        """The oldest live spare, marked busy (its conversation's now); dead ones met on the way are ended."""
        while True:
            with self._lock:
                if not self._spares:
                    return None
                process = self._spares.popleft()
                if process.alive():
                    self._busy[process.pid] = process
                    self.adopted += 1
                    return process
            self._end(process, "进程已退出")

    def wait_given_back(self, process: WarmProcess, timeout: float) -> bool:
        """Wait up to `timeout` s for `process` to end its turn (to be given back); True when it has."""
        with self._lock:
            return self._given_back.wait_for(lambda: process.pid not in self._busy, timeout)

    def end_spares(self, reason: str, *, started_before: float | None = None) -> int:
        """End the spares (only those started before `started_before`, if given); return how many."""
        with self._lock:
            ended = [p for p in self._spares if started_before is None or p.started_at < started_before]
            self._spares = collections.deque(p for p in self._spares if p not in ended)
        for process in ended:
            self._end(process, reason)
        return len(ended)

    def spare_count(self) -> int:
        """Spares ready now."""
        with self._lock:
            return len(self._spares)

    # -- ending processes

    def reap_idle(self, now: float | None = None) -> int:
        """End the processes idle for WARM_IDLE_SECONDS or more; return how many."""
        now = self.clock() if now is None else now
        with self._lock:
            expired = [c for c, p in self._idle.items() if now - p.last_used >= self.idle_seconds]
            processes = [self._idle.pop(c) for c in expired]
        for process in processes:
            self._end(process, f"空闲超过 {self.idle_seconds:.0f} 秒")
        return len(processes)

    def start_reaper(self, interval: float) -> threading.Thread:
        """A daemon thread calling `reap_idle` every `interval` seconds until `stop_all`."""
        def reap() -> None:
            while not self._reaper_stop.wait(interval):
                try:
                    self.reap_idle()
                except Exception:  # the next round tries again; an ended process is never needed
                    log.exception("结束空闲 CodeBuddy 进程时出错")

        thread = threading.Thread(target=reap, daemon=True, name="warm-reaper")
        thread.start()
        return thread

    def end_idle(self, conversation: str, reason: str) -> bool:
        """End the conversation's idle process now (its jail, and anything a turn left running there, go with it);
        False when it had none."""
        with self._lock:
            process = self._idle.pop(conversation, None)
        if process is not None:
            self._end(process, reason)
        return process is not None

    def stop_all(self) -> None:
        """End every idle process and spare (shutdown); busy ones end with their runs."""
        self._reaper_stop.set()
        with self._lock:
            self._closed = True
            processes = list(self._idle.values()) + list(self._spares)
            self._idle.clear()
            self._spares.clear()
        for process in processes:
            self._end(process, "机器人停止")

    def _end(self, process: WarmProcess, reason: str) -> None:
        log.info("结束 CodeBuddy 进程 %d: %s", process.pid, reason)
        with self._lock:
            self.ended[reason.split(" (")[0]] += 1
        try:
            self._stop_process(process)
        except Exception:
            log.exception("结束 CodeBuddy 进程 %d 失败", process.pid)

    # -- what /metrics and check show

    def stats(self) -> dict[str, int]:
        """Live, idle, busy and spare processes, their memory, and hits/misses since start."""
        with self._lock:
            idle, busy, spares = list(self._idle.values()), list(self._busy.values()), list(self._spares)
            hits, misses, adopted, evicted = self.hits, self.misses, self.adopted, sum(self.ended.values())
        every = idle + busy + spares
        tree = process_tree.children_by_parent() if every else {}  # /proc read once for every process
        return {"live": len(every), "idle": len(idle), "busy": len(busy), "spares": len(spares),
                "capacity": self.capacity, "hits": hits, "misses": misses, "adopted": adopted,
                "ended": evicted, "rss_bytes": sum(p.rss_bytes(tree) for p in every)}

    def processes(self) -> list[WarmProcess]:
        """Every live process of the pool: idle, busy or spare."""
        with self._lock:
            return list(self._idle.values()) + list(self._busy.values()) + list(self._spares)
