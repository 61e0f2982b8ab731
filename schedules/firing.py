"""The schedule thread: each tick it claims the due fires (schedules/table.py: one host each) and makes each a
background task of its chat and sender, or skips it (the previous fire still runs, too late after downtime, the
sender no longer allowed) and says so in the next answer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from async_task_manager import AsyncTaskManager
from schedules.forms import local_time
from schedules.table import MAX_COUNTED, Claim, Schedule, ScheduleTable

log = logging.getLogger("schedules")

TICK = 2.0  # seconds between two looks at the due schedules


def label_of(schedule: Schedule, note: str) -> str:
    """The line a fire's answer opens with: the schedule, and what happened to the fires before it."""
    head = f"⏰ 定时任务 {schedule.id} ({schedule.words})"
    return f"{head}\n{note}" if note else head


class ScheduleFiring:
    """Fires due schedules as tasks: `fire_due(now)` once, or every `tick` s on its own thread from `start`."""

    def __init__(self, table: ScheduleTable, manager: AsyncTaskManager, *, tz: str, catch_up: float,
                 allowed: Callable[[str], bool], clock: Callable[[], float] = time.time, tick: float = TICK) -> None:
        self.table = table
        self.manager = manager
        self.tz = tz
        self.catch_up = catch_up
        self.allowed = allowed  # whether a sender may still use the bot (ALLOWED_USERS, read at each fire)
        self.quota: Callable[[str], str] = lambda user_id: ""  # why a sender may not start a run now (usage/)
        self.clock = clock
        self.tick = tick
        self.counts = {"fired": 0, "skipped": 0, "schedules": 0}  # for /metrics (the count as of the last look)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = self.manager.supervisor.start("schedules", self._watch, critical=False)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            try:
                self.fire_due(self.clock())
            except Exception:  # the DB away a moment: the fires stay due and are claimed on a later tick
                log.exception("定时任务检查失败")

    def fire_due(self, now: float) -> list[str]:
        """Claim every due fire and run or skip each; the ids of the tasks started."""
        started = []
        self.counts["schedules"] = self.table.count()
        for claim in self.table.claim_due(now, self.tz):
            task_id = self._fire(claim, now)
            if task_id:
                started.append(task_id)
        return started

    def _skip(self, schedule: Schedule, why: str, **changes: object) -> None:
        self.counts["skipped"] += 1
        note = f"{schedule.note}\n{why}" if schedule.note else why
        self.table.update(schedule.id, note=note, last_result=f"跳过: {why}", skipped=schedule.skipped + 1, **changes)
        log.info("定时任务 %s 跳过: %s user=%s", schedule.id, why, schedule.user_id)

    def _fire(self, claim: Claim, now: float) -> str:
        schedule, when = claim.schedule, local_time(claim.due, self.tz)
        if not self.allowed(schedule.user_id):
            self._skip(schedule, f"{when} 未执行: 你已不在允许使用机器人的名单中，定时任务已暂停", paused=True)
            self.manager.outbox.notice(schedule.route, f"定时任务 {schedule.id} ({schedule.words}) 已暂停: 你已不在"
                                       "允许使用机器人的名单 (ALLOWED_USERS) 中。如需恢复，请联系管理员。")
            return ""
        late = now - claim.due
        if late > self.catch_up:
            missed = f"{claim.missed} 次" if claim.missed < MAX_COUNTED else f"{MAX_COUNTED} 次以上"
            self._skip(schedule, f"机器人停机期间错过 {missed} (最近一次 {when}，已晚 {late / 60:.0f} 分钟)，未补执行")
            return ""
        previous = self.manager.get_task(schedule.last_task) if schedule.last_task else None
        if previous is not None and not previous.finished:
            self._skip(schedule, f"{when} 的一次未执行: 上一次 (任务 {previous.id}) 仍在进行")
            return ""
        over = self.quota(schedule.user_id)
        if over:  # the sender's quota is used up: this fire is skipped, the schedule stays
            self._skip(schedule, f"{when} 的一次未执行: {over}")
            return ""
        note = schedule.note
        if claim.missed > 1:
            note = f"{note}\n机器人停机期间错过 {claim.missed} 次，补执行最近一次 ({when})".strip()
        task = self.manager.submit(schedule.prompt, schedule.route, user_id=schedule.user_id,
                                   user_name=schedule.user_name, conversation_key=schedule.conversation_key,
                                   label=label_of(schedule, note))
        if task is None:  # shutting down: this fire is lost with the process (docs/schedules.md)
            self._skip(schedule, f"{when} 未执行: 机器人正在重启")
            return ""
        self.counts["fired"] += 1
        self.table.update(schedule.id, last_task=task.id, note="", last_result=f"{when} 已执行 (任务 {task.id})")
        log.info("定时任务 %s 触发: 任务 %s user=%s", schedule.id, task.id, schedule.user_id)
        return task.id
