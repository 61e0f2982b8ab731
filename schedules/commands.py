"""The schedule chat commands — /every, /schedules, /unschedule, /pause, /resume — who may send each, the limits a new
schedule must keep (SCHEDULE_MIN_INTERVAL, MAX_SCHEDULES_PER_USER), and their answers."""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import psycopg

from async_task_manager import AsyncTaskManager
from config import MAX_PROMPT_CHARS
from dingtalk.route import Route
from schedules.forms import (
    FORMS,
    ScheduleError,
    Timing,
    fires_within,
    local_time,
    next_fire,
    next_fires,
    parse,
    shortest_gap,
)
from schedules.table import Schedule, ScheduleTable
from tasks.task import STATUS_LABELS

log = logging.getLogger("schedules")

COMMANDS = {
    "/every": "every", "定时": "every",
    "/schedules": "schedules", "定时任务": "schedules",
    "/unschedule": "unschedule", "取消定时": "unschedule",
    "/pause": "pause", "暂停定时": "pause",
    "/resume": "resume", "恢复定时": "resume",
}
CALLS_PER_FIRE = 1  # a fire's answer is one push (no acknowledgement; no card when the budget is tight)
MONTH = 30 * 86400.0  # the month a schedule's calls are estimated over
HELP_LINES = """/every 时间 内容 (定时) — 定时执行，如 /every 工作日 09:00 生成日报
/schedules (定时任务) — 本会话的定时任务；/unschedule ID (取消定时)、/pause ID、/resume ID"""


@dataclass(frozen=True)
class Sender:
    """Who sent a schedule command, from which chat, and where its answer goes."""

    user_id: str
    user_name: str
    conversation_key: str
    is_admin: bool
    route: Route


@dataclass(frozen=True)
class Limits:
    """The settings a schedule keeps: its time zone, the shortest gap between fires, schedules per user."""

    tz: str
    min_interval: float
    per_user: int


class ScheduleCommands:
    """Answers the schedule commands of every chat (at once: one short statement on the task DB each)."""

    def __init__(self, table: ScheduleTable, manager: AsyncTaskManager, limits: Limits,
                 clock: Callable[[], float]) -> None:
        self.table = table
        self.manager = manager
        self.limits = limits
        self.clock = clock

    def handle(self, command: str, argument: str, sender: Sender) -> str:
        """The answer to one schedule command (a one-line apology while the task DB cannot be reached)."""
        try:
            return self._answer(command, argument.strip(), sender)
        except (psycopg.Error, sqlite3.Error) as exc:
            log.warning("定时任务命令失败: 任务数据库不可用 (%s) user=%s", " ".join(str(exc).split()), sender.user_id)
            return "暂时无法访问任务数据库，定时任务命令未执行，请稍后再试。"

    def _answer(self, command: str, argument: str, sender: Sender) -> str:
        if command == "every":
            return self.create(argument, sender)
        if command == "schedules":
            return self.describe(sender, every_chat=argument.lower() in ("all", "全部") and sender.is_admin)
        if not argument:
            return f"请给出定时任务ID，例如 /{command} 1a2b3c4d (用 /schedules 查看)。"
        schedule = self.table.get(argument)
        if schedule is None or (schedule.user_id != sender.user_id and not sender.is_admin):
            return f"找不到定时任务 {argument}"
        if command == "unschedule":
            self.table.remove(schedule.id)
            log.info("定时任务 %s 已取消 user=%s", schedule.id, sender.user_id)
            return f"已取消定时任务 {schedule.id} ({schedule.words})。"
        if command == "pause":
            self.table.update(schedule.id, paused=True)
            return f"定时任务 {schedule.id} 已暂停，/resume {schedule.id} 恢复。"
        upcoming = next_fire(schedule.cron, self.clock(), self.limits.tz)  # resumed: no catch-up of the pause
        self.table.update(schedule.id, paused=False, next_fire=upcoming)
        return f"定时任务 {schedule.id} 已恢复，下次执行: {local_time(upcoming, self.limits.tz)}"

    def create(self, argument: str, sender: Sender) -> str:
        """A new schedule of this chat and sender, or why not."""
        try:
            timing, prompt = parse(argument)
        except ScheduleError as exc:
            return f"{exc}。\n{FORMS}"
        prompt = prompt.strip()
        if not prompt:
            return f"请在时间后写上要执行的内容。\n{FORMS}"
        if len(prompt) > MAX_PROMPT_CHARS:
            return f"内容过长 ({len(prompt)} 字)，请控制在 {MAX_PROMPT_CHARS} 字以内。"
        now, tz = self.clock(), self.limits.tz
        gap = shortest_gap(timing.cron, now, tz)
        if gap < self.limits.min_interval:
            return (f"{timing.words} 执行得太频繁: 两次最短间隔 {gap / 60:.0f} 分钟，最少 "
                    f"{self.limits.min_interval / 60:.0f} 分钟 (SCHEDULE_MIN_INTERVAL)。")
        owned = self.table.count_for_user(sender.user_id)
        if owned >= self.limits.per_user:
            return (f"你已有 {owned} 个定时任务 (每人最多 {self.limits.per_user} 个, MAX_SCHEDULES_PER_USER)，"
                    "请先 /unschedule 一个。")
        over_budget = self.over_budget(timing, now)
        if over_budget:
            return over_budget
        fires = next_fires(timing.cron, now, tz, 3)
        schedule = Schedule(id=uuid.uuid4().hex[:8], user_id=sender.user_id, user_name=sender.user_name,
                            conversation_key=sender.conversation_key,
                            route=replace(sender.route, session_webhook="", webhook_expires_ms=0),
                            cron=timing.cron, words=timing.words, prompt=prompt, created_at=now, next_fire=fires[0])
        self.table.add(schedule)
        log.info("定时任务 %s 已创建 (%s) user=%s", schedule.id, timing.cron, sender.user_id)
        times = "\n".join(f"- {local_time(fire, tz)}" for fire in fires)
        return (f"已创建定时任务 {schedule.id}: {timing.words} ({tz})\n内容: {prompt[:40]}"
                f"{'…' if len(prompt) > 40 else ''}\n接下来三次:\n{times}\n/unschedule {schedule.id} 取消")

    def over_budget(self, timing: Timing, now: float) -> str:
        """Why a new schedule would take the month's projected DingTalk calls past DINGTALK_MONTHLY_CALL_BUDGET: this
        month's spend, plus 30 days of every active schedule's fires and of this one's (CALLS_PER_FIRE each); "" if
        it fits or no budget is kept."""
        budget = self.manager.outbox.budget
        if budget is None:
            return ""
        limit, tz = budget.monthly_budget, self.limits.tz
        spent = budget.month_spend()[0]
        others = sum(CALLS_PER_FIRE * fires_within(schedule.cron, now, MONTH, tz, limit + 1)
                     for schedule in self.table.listed() if not schedule.paused)
        mine = CALLS_PER_FIRE * fires_within(timing.cron, now, MONTH, tz, limit + 1)
        if spent + others + mine <= limit:
            return ""
        return (f"钉钉接口调用预算不足，未创建: 本月已用 {spent} 次，现有定时任务每月约 {others} 次，"
                f"这个定时任务每月约 {mine} 次，合计约 {spent + others + mine} 次，超过每月预算 {limit} 次 "
                "(DINGTALK_MONTHLY_CALL_BUDGET)。")

    def describe(self, sender: Sender, every_chat: bool) -> str:
        """The chat's schedules (an admin's `all`: every schedule), one line each."""
        schedules = self.table.listed(None if every_chat else sender.conversation_key)
        if not schedules:
            return "没有定时任务。用 /every 创建，例如 /every 工作日 09:00 生成日报"
        lines = ["全部定时任务:" if every_chat else "本会话的定时任务:"]
        for schedule in schedules:
            state = "已暂停" if schedule.paused else f"下次 {local_time(schedule.next_fire, self.limits.tz)}"
            lines.append(f"- {schedule.id} {schedule.words} 「{schedule.prompt[:20]}」 {state}；"
                         f"上次: {self.last_result(schedule)}" + (f" (用户 {schedule.user_id})" if every_chat else ""))
        return "\n".join(lines)

    def last_result(self, schedule: Schedule) -> str:
        """What the last fire did: its task's state when it ran, else the recorded words."""
        task = self.manager.get_task(schedule.last_task) if schedule.last_task else None
        if task is not None and schedule.last_result.endswith(f"(任务 {task.id})"):
            return f"任务 {task.id} {STATUS_LABELS.get(task.status, task.status)}"
        return schedule.last_result or "尚未执行"
