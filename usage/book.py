"""The usage book: each finished run and each metered call made for a task written to the usage table off the caller's
thread, this process's totals for /metrics, and a user's day and month as every host recorded them.

Writers never wait for the DB: rows go to a queue that one thread writes in order; a DB that cannot be reached keeps
them queued (at most MAX_WAITING rows, the oldest dropped and counted past it) and tried again every RETRY seconds. A
user's sums read the table and add the rows still queued here, so a quota sees a run that just ended.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from codebuddy_client import RunResult
from common.settled_read import read_with_pending
from tasks.task import Task
from usage.table import COUNTERS, Totals, UsageRow, UsageTable

log = logging.getLogger("usage")

MAX_WAITING = 10_000
RETRY = 5.0
READ_TRIES = 200  # a user's sums wait at most this many READ_PAUSEs for a row being written
READ_PAUSE = 0.005
TOKEN_KINDS = ("input", "output", "cache_read", "cache_creation")


def day_in(wall_time: float, tz: ZoneInfo | str) -> str:
    """The day ("2026-12-06") of a wall-clock time in `tz` (SCHEDULE_TZ); its first seven letters are the month."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    return datetime.fromtimestamp(wall_time, UTC).astimezone(zone).strftime("%Y-%m-%d")


def _sum(rows: list[UsageRow], base: Totals) -> Totals:
    return replace(base, **{name: getattr(base, name) + sum(getattr(row, name) for row in rows) for name in COUNTERS})


class UsageBook:
    """Records usage into `table` (None: kept in this process only, e.g. the console) in `tz` days."""

    def __init__(self, table: UsageTable | None, tz: str = "Asia/Shanghai", *,
                 clock: Callable[[], float] = time.time, retry: float = RETRY) -> None:
        self.table = table
        self.tz = ZoneInfo(tz)
        self.clock = clock
        self.retry = retry
        self._lock = threading.Condition()
        self._waiting: collections.deque[UsageRow] = collections.deque()
        self._written: list[UsageRow] = []  # without a table: every row, for the sums
        self._stopping = False
        self._writes = 0  # rows written so far, and whether one is being written (it may be in the DB already)
        self._writing = False
        self.dropped = 0
        self.totals: dict[str, float] = {"runs": 0, "cost_usd": 0.0, "cpu_seconds": 0.0, "api_calls": 0,
                                         **{f"{kind}_tokens": 0 for kind in TOKEN_KINDS}}  # this process, for /metrics
        self._thread = threading.Thread(target=self._write_loop, name="usage-writer", daemon=True)

    def day(self, wall_time: float) -> str:
        """The bot's day ("2026-12-06") of a wall-clock time, in SCHEDULE_TZ."""
        return day_in(wall_time, self.tz)

    # -- recording

    def record_run(self, task: Task, result: RunResult) -> None:
        """A run of `task` ended with `result`: its tokens, cost, model, wall and CPU time are the task's."""
        usage = result.usage
        now = self.clock()
        row = UsageRow(task.id, task.user_id, task.user_name or "", task.conversation_key or "", self.day(now), now,
                       runs=1, wall_seconds=max(0.0, result.duration))
        if usage is not None:
            row = replace(row, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                          cache_read_tokens=usage.cache_read_tokens, cache_creation_tokens=usage.cache_creation_tokens,
                          cost_usd=usage.cost_usd, model=usage.model, cpu_seconds=usage.cpu_seconds or 0.0)
        self._add(row)

    def record_call(self, task_id: str, user_id: str, wall_time: float) -> None:
        """One metered DingTalk call was made for `task_id` (dingtalk/api_budget.py `on_task_call`)."""
        self._add(UsageRow(task_id, user_id, day=self.day(wall_time), finished_at=wall_time, api_calls=1))

    def _add(self, row: UsageRow) -> None:
        with self._lock:
            for name in self.totals:
                self.totals[name] += getattr(row, name)
            if self.table is None:
                self._written.append(row)
                return
            if len(self._waiting) >= MAX_WAITING:
                self._waiting.popleft()
                self.dropped += 1
                log.error("用量记录积压过多 (任务数据库不可用)，丢弃最早的一条 (共丢弃 %d 条)", self.dropped)
            self._waiting.append(row)
            self._lock.notify()

    # -- writing

    def start(self) -> UsageBook:
        if self.table is not None:
            self._thread.start()
        return self

    def _write_loop(self) -> None:
        failing = False
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._waiting or self._stopping)
                if not self._waiting:
                    return
                row = self._waiting[0]
                self._writing = True
            try:
                assert self.table is not None
                self.table.add(row)
            except Exception as exc:
                with self._lock:
                    self._writing = False
                if not failing:
                    log.warning("用量写入任务数据库失败，%.0f 秒后重试: %s", self.retry,
                                " ".join(str(exc).split())[:200])
                failing = True
                with self._lock:
                    if self._lock.wait_for(lambda: self._stopping, self.retry):
                        return
                continue
            if failing:
                log.info("用量记录已恢复写入")
            failing = False
            with self._lock:
                if self._waiting and self._waiting[0] is row:
                    self._waiting.popleft()
                self._writes, self._writing = self._writes + 1, False
                self._lock.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every row recorded so far is written (or `timeout` s); True when none waits."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._waiting, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what waits (for at most `timeout` s), then stop the writer."""
        self.flush(timeout)
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
            if self._waiting:  # the DB stayed away: what this process recorded since is not in it
                log.error("停止时仍有 %d 条用量记录未能写入任务数据库", len(self._waiting))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- reading

    def _with_waiting(self, keep: Callable[[UsageRow], bool], read: Callable[[UsageTable], Totals],
                      empty: Totals) -> Totals:
        """The table's sums (`read`) plus this host's rows not written yet that `keep` selects, taken with no row
        written between the two (a row written meanwhile would count twice, or not at all); while one is being
        written the read waits for it (at most READ_TRIES pauses)."""
        if self.table is None:
            with self._lock:
                return _sum([row for row in self._written if keep(row)], empty)
        table = self.table
        waiting, base = read_with_pending(
            self._lock, lambda: (self._writes, self._writing), lambda: self._writing,
            lambda: [row for row in self._waiting if keep(row)], lambda: read(table), tries=READ_TRIES,
            pause=READ_PAUSE)
        return _sum(waiting, base)

    def user_day(self, user_id: str, day: str) -> Totals:
        """`user_id`'s sums on `day`, every host's, with this host's rows not written yet."""
        return self._with_waiting(lambda row: row.user_id == user_id and row.day == day,
                                  lambda table: table.user_totals(user_id, day=day), Totals(user_id))

    def user_month(self, user_id: str, month: str) -> Totals:
        return self._with_waiting(lambda row: row.user_id == user_id and row.day[:7] == month,
                                  lambda table: table.user_totals(user_id, month=month), Totals(user_id))

    def month(self, month: str, by: str = "user") -> list[Totals]:
        """The month's sums per user, day or chat (only what the table holds; [] without one)."""
        return self.table.grouped(month, by) if self.table is not None else []

    def month_totals(self, month: str) -> Totals:
        return self.table.month_totals(month) if self.table is not None else Totals(month)
