"""Fires over a controlled clock: each due fire claimed once (two tables on one DB, a restart), catch-up and skip
after downtime, a fire skipped while the previous one runs, a sender no longer allowed; and the commands' limits
(SCHEDULE_MIN_INTERVAL, MAX_SCHEDULES_PER_USER), who may unschedule, pause and resume.

The manager is real but not started: a fire's task stays queued (still running, as far as the next fire can tell)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from async_task_manager import AsyncTaskManager
from config import PUSH_MAX_BYTES
from dingtalk.api_budget import ApiBudget
from dingtalk.route import Route
from dingtalk_sender import Delivery
from schedules.commands import Limits, ScheduleCommands, Sender
from schedules.firing import ScheduleFiring
from schedules.table import ScheduleTable
from store.memory import MemoryTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.task import SUCCEEDED

TZ = "Asia/Shanghai"
MONDAY_0830 = datetime(2026, 12, 7, 8, 30, tzinfo=ZoneInfo(TZ)).timestamp()
NINE = MONDAY_0830 + 1800


class _Unused:
    def run(self, *args, **kwargs):
        raise AssertionError("not started")

    send = run


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Bot:
    """A table on a SQLite task DB, a manager, the commands and the firing, all on one clock."""

    def __init__(self, db: str, clock: Clock, *, allowed=lambda user: True, min_interval: float = 3600.0,
                 per_user: int = 5, catch_up: float = 3600.0) -> None:
        self.clock = clock
        self.table = ScheduleTable(db)
        self.manager = AsyncTaskManager(_Unused(), _Unused(), MemoryTaskStore(), clock=clock)
        self.notices: list[tuple[Route, str]] = []
        self.manager.outbox.notice = lambda route, text, **kw: self.notices.append((route, text))
        self.commands = ScheduleCommands(self.table, self.manager, Limits(TZ, min_interval, per_user), clock)
        self.firing = ScheduleFiring(self.table, self.manager, tz=TZ, catch_up=catch_up, allowed=allowed,
                                     clock=clock)

    def say(self, text: str, user: str = "alice", admin: bool = False, chat: str = "chat-a") -> str:
        command, _, argument = text.partition(" ")
        route = Route("1", user, "", session_webhook="https://hook")
        return self.commands.handle(command.lstrip("/"), argument, Sender(user, user.title(), chat, admin, route))

    def fire(self) -> list[str]:
        return self.firing.fire_due(self.clock())


@pytest.fixture
def db(tmp_path) -> str:
    path = str(tmp_path / "tasks.db")
    SQLiteTaskStore(path).close()  # the task store migrates the file to schema version 6
    return path


def _created_id(answer: str) -> str:
    assert answer.startswith("已创建定时任务 "), answer
    return answer.split()[1].rstrip(":")


def test_a_new_schedule_answers_its_id_words_and_next_three_fires(db):
    bot = Bot(db, Clock(MONDAY_0830))
    answer = bot.say("/every 工作日 09:00 生成日报")
    assert "工作日 (周一至周五) 09:00 (Asia/Shanghai)" in answer and "内容: 生成日报" in answer
    assert "2026-12-07 09:00 (周一)\n- 2026-12-08 09:00 (周二)\n- 2026-12-09 09:00 (周三)" in answer
    schedule = bot.table.get(_created_id(answer))
    assert schedule.route.session_webhook == "" and schedule.user_id == "alice"  # fires are pushed
    assert "可用的定时写法" in bot.say("/every 明天 09:00 x")


def test_a_due_fire_is_claimed_once_by_two_processes_and_not_again_after_a_restart(db):
    clock = Clock(MONDAY_0830)
    first, second = Bot(db, clock), Bot(db, clock)
    schedule_id = _created_id(first.say("/every 每天 09:00 生成日报"))
    assert first.fire() == [] and second.fire() == []  # not due yet
    clock.now = NINE + 1
    started = first.fire() + second.fire()
    assert len(started) == 1
    task = (first.manager.get_task(started[0]))
    assert task.prompt == "生成日报" and task.background and task.label.startswith(f"⏰ 定时任务 {schedule_id}")
    restarted = Bot(db, clock)
    assert restarted.fire() == []  # the restart finds the fire taken
    clock.now = NINE + 24 * 3600 + 1
    assert len(restarted.fire()) == 1  # and fires the next day's
    assert restarted.table.get(schedule_id).fires == 2


def test_after_downtime_a_fire_less_than_catch_up_late_runs_once_and_says_how_many_were_missed(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock, min_interval=60)
    bot.say("/every 每30分钟 检查")  # due 09:00
    clock.now = NINE + 3 * 1800 + 600  # down from before 09:00 to 10:40: 09:00, 09:30, 10:00 and 10:30 missed
    started = bot.fire()
    assert len(started) == 1
    assert "错过 4 次，补执行最近一次 (2026-12-07 10:30" in bot.manager.get_task(started[0]).label
    assert bot.fire() == []


def test_after_downtime_a_fire_past_catch_up_is_skipped_and_the_next_answer_says_so(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock, catch_up=3600)
    schedule_id = _created_id(bot.say("/every 每天 09:00 生成日报"))
    clock.now = NINE + 2 * 3600  # 11:00: the 09:00 fire is two hours late
    assert bot.fire() == []
    schedule = bot.table.get(schedule_id)
    assert schedule.skipped == 1 and "已晚 120 分钟" in schedule.last_result
    clock.now = NINE + 24 * 3600
    started = bot.fire()
    assert "机器人停机期间错过 1 次 (最近一次 2026-12-07 09:00" in bot.manager.get_task(started[0]).label
    assert bot.table.get(schedule_id).note == ""  # said once


def test_a_fire_while_the_previous_one_still_runs_is_skipped_and_noted_in_the_next_answer(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock, min_interval=60)
    bot.say("/every 每小时 生成报告")
    clock.now = NINE
    first = bot.fire()[0]
    clock.now = NINE + 3600
    assert bot.fire() == []  # the 09:00 fire's task is still queued
    bot.manager.board.transition(bot.manager.get_task(first), status=SUCCEEDED, finished_at=clock.now)
    clock.now = NINE + 7200
    label = bot.manager.get_task(bot.fire()[0]).label
    assert "2026-12-07 10:00 (周一) 的一次未执行: 上一次 (任务 " in label


def test_a_fire_of_a_sender_over_a_quota_is_skipped_and_the_next_answer_says_why(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock, min_interval=60)
    over = {"alice": "你今天的 token 用量已达上限: 6,000/5,000，12-08 00:00 (Asia/Shanghai) 重置。"}
    bot.firing.quota = lambda user: over.get(user, "")  # usage/quotas.py Quotas.refusal, as bot.py wires it
    schedule_id = _created_id(bot.say("/every 每小时 生成报告"))
    clock.now = NINE
    assert bot.fire() == []  # no task: the quota is used up
    schedule = bot.table.get(schedule_id)
    assert schedule.skipped == 1 and not schedule.paused and "token 用量已达上限: 6,000/5,000" in schedule.last_result
    over.clear()  # the next day
    clock.now = NINE + 3600
    label = bot.manager.get_task(bot.fire()[0]).label
    assert "2026-12-07 09:00 (周一) 的一次未执行: 你今天的 token 用量已达上限" in label


def test_a_sender_no_longer_allowed_is_not_run_the_schedule_pauses_and_the_owner_is_told_once(db):
    clock, allowed = Clock(MONDAY_0830), {"alice"}
    bot = Bot(db, clock, allowed=lambda user: user in allowed, min_interval=60)
    schedule_id = _created_id(bot.say("/every 每小时 生成报告"))
    allowed.clear()
    clock.now = NINE
    assert bot.fire() == []
    assert bot.table.get(schedule_id).paused
    clock.now = NINE + 7200
    assert bot.fire() == []
    assert [text for _, text in bot.notices] == [
        f"定时任务 {schedule_id} (每小时整点) 已暂停: 你已不在允许使用机器人的名单 (ALLOWED_USERS) 中。"
        "如需恢复，请联系管理员。"]


def test_a_schedule_firing_more_often_than_min_interval_is_refused(db):
    bot = Bot(db, Clock(MONDAY_0830), min_interval=3600)
    assert "执行得太频繁: 两次最短间隔 30 分钟，最少 60 分钟 (SCHEDULE_MIN_INTERVAL)" in bot.say("/every 每30分钟 x")
    assert "太频繁" in bot.say('/every "* * * * *" x')
    assert bot.say("/every 每小时 x").startswith("已创建")


def test_a_user_past_max_schedules_per_user_is_refused(db):
    bot = Bot(db, Clock(MONDAY_0830), per_user=2)
    for hour in (9, 10):
        assert bot.say(f"/every 每天 {hour}:00 x").startswith("已创建")
    assert "你已有 2 个定时任务 (每人最多 2 个, MAX_SCHEDULES_PER_USER)" in bot.say("/every 每天 11:00 x")
    assert bot.say("/every 每天 11:00 x", user="bob").startswith("已创建")


def test_only_the_owner_or_an_admin_may_unschedule_pause_or_resume(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock)
    schedule_id = _created_id(bot.say("/every 每天 09:00 生成日报"))
    assert bot.say(f"/pause {schedule_id}", user="mallory") == f"找不到定时任务 {schedule_id}"
    assert "已暂停" in bot.say(f"/pause {schedule_id}")
    clock.now = NINE + 1
    assert bot.fire() == []  # paused
    assert "已恢复，下次执行: 2026-12-08 09:00" in bot.say(f"/resume {schedule_id}", user="boss", admin=True)
    assert "本会话的定时任务:" in bot.say("/schedules") and schedule_id in bot.say("/schedules")
    assert schedule_id not in bot.say("/schedules", chat="chat-b")
    assert schedule_id in bot.say("/schedules all", user="boss", admin=True, chat="chat-b")
    assert bot.say(f"/unschedule {schedule_id}", user="mallory") == f"找不到定时任务 {schedule_id}"
    assert bot.say(f"/unschedule {schedule_id}").startswith(f"已取消定时任务 {schedule_id}")
    clock.now = NINE + 24 * 3600 + 1
    assert bot.fire() == [] and bot.table.listed() == []


def test_a_schedule_that_would_take_the_months_projected_calls_past_the_budget_is_refused_with_the_numbers(db):
    clock = Clock(MONDAY_0830)
    bot = Bot(db, clock, min_interval=60)
    store = MemoryTaskStore()
    store.add_api_calls("2026-12", 1000)
    bot.manager.outbox.budget = ApiBudget(store, 2500, clock=clock)
    assert bot.say("/every 每小时 x").startswith("已创建")  # 720 a month: 1000 + 720 fits in 2500
    answer = bot.say("/every 每30分钟 y")  # 1440 more: 3160 in all
    assert answer == ("钉钉接口调用预算不足，未创建: 本月已用 1000 次，现有定时任务每月约 720 次，"
                      "这个定时任务每月约 1440 次，合计约 3160 次，"
                      "超过每月预算 2500 次 (DINGTALK_MONTHLY_CALL_BUDGET)。")
    assert bot.say("/every 每天 09:00 z").startswith("已创建")  # 30 more fits


def test_a_command_while_the_task_db_cannot_be_reached_is_answered_with_one_line(db):
    bot = Bot(db, Clock(MONDAY_0830))
    bot.table._conn.close()  # as a DB gone away would leave it
    assert bot.say("/every 每天 09:00 x") == "暂时无法访问任务数据库，定时任务命令未执行，请稍后再试。"


class _RecordingSender:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def send(self, route, text, **kwargs) -> Delivery:
        self.texts.append(text)
        return Delivery(ok=True, path="batchSend")


def test_near_the_budget_a_fires_long_answer_is_cut_to_one_push_and_says_so(db):
    clock = Clock(MONDAY_0830)
    sender = _RecordingSender()
    manager = AsyncTaskManager(_Unused(), sender, MemoryTaskStore(), clock=clock)
    store = MemoryTaskStore()
    manager.outbox.budget = ApiBudget(store, 1000, clock=clock)
    long_answer = "\n\n".join(f"第 {n} 段。" + "内容" * 400 for n in range(20))  # ~48 KB: four pushes at least

    def deliver(label: str) -> str:
        task = manager.board.create("alice", "生成报告", Route("1", "alice", ""), background=True, label=label)
        manager.board.transition(task, status=SUCCEEDED, result=long_answer, finished_at=clock.now)
        assert manager.outbox.deliver_result(task)
        return sender.texts[-1]

    assert deliver("⏰ 定时任务 ab12cd34 (每天 09:00)").endswith(long_answer)  # room in the budget: all of it
    store.add_api_calls("2026-12", 950)  # past 90 % of the month's budget: cards off, fires in one push
    manager.outbox.budget = ApiBudget(store, 1000, clock=clock)
    cut = deliver("⏰ 定时任务 ab12cd34 (每天 09:00)")
    assert len(cut.encode()) < PUSH_MAX_BYTES - 1000 and cut.startswith("⏰ 定时任务 ab12cd34")
    assert cut.endswith("（钉钉接口调用预算紧张，定时任务的回答只推送第一段；需要全文请在会话中再问一次。）")
    assert deliver("").endswith(long_answer)  # a task of no schedule keeps its whole answer
