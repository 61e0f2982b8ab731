"""The chat app on its own: who sees which task, the per-user limits, and their memory."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from async_task_manager import AsyncTaskManager
from chat.app import ChatApp
from chat.rate_limits import RateLimits
from codebuddy.warm_sessions import ToolRequest
from config import load_config
from dingtalk.api_budget import ApiBudget
from dingtalk.incoming import IncomingMessage
from dingtalk.route import Route
from dingtalk_sender import Delivery
from store.memory import MemoryTaskStore
from tasks.task import RUNNING, Task

GROUP_A, GROUP_B = "cidGroupA+/==", "cidGroupB+/=="


class _NoClient:
    def run(self, *args, **kwargs):
        raise AssertionError("no task runs in these tests (the workers are not started)")

    def cancel(self, task_id):
        pass


class _QuietSender:
    def send(self, route, text, **kwargs):
        return Delivery(ok=True, path="webhook")


class _App:
    """A ChatApp whose manager keeps every task queued (no workers) and whose replies are collected."""

    def __init__(self, clock=time.time, **settings: str) -> None:
        config = load_config({"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret", **settings},
                             dotenv_path=None)
        self.manager = AsyncTaskManager(_NoClient(), _QuietSender(), MemoryTaskStore(), clock=clock)
        self.app = ChatApp(self.manager, config, clock=clock)
        self.replies: list[str] = []
        self.app.reply = lambda message, text: self.replies.append(text)
        self._number = 0

    def say(self, text: str, user: str = "alice", group: str = "") -> str:
        """Send `text` from `user` (in `group`, or their 1:1 chat); the app's reply to it, or ""."""
        self._number += 1
        before = len(self.replies)
        self.app.handle(IncomingMessage(
            msg_id=f"m{self._number}", user_id=user, user_name=user, conversation_type="2" if group else "1",
            conversation_id=group or f"cidSingle-{user}", text=text, session_webhook="http://hook"))
        return self.replies[-1] if len(self.replies) > before else ""

    def cancel(self, text: str, user: str = "alice", group: str = "") -> str:
        """Send a /cancel and wait for its reply (cancel answers from a thread of its own)."""
        before = len(self.replies)
        self.say(text, user, group)
        deadline = time.monotonic() + 5
        while len(self.replies) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.replies[before]

    def task(self, prompt: str, user: str = "alice", group: str = "") -> str:
        self.say(prompt, user, group)
        return next(t.id for t in self.manager.tasks_for(user, limit=50) if t.prompt == prompt)


@pytest.fixture
def chat():
    return _App(ADMIN_USERS="boss")


# ---------------------------------------------------------------- privacy


def test_group_tasks_lists_only_that_groups_tasks(chat):
    chat.task("私聊的秘密")
    chat.task("A 群的问题", group=GROUP_A)
    chat.task("B 群的问题", group=GROUP_B)
    listed = chat.say("/tasks", group=GROUP_A)
    assert "A 群的问题" in listed and "私聊的秘密" not in listed and "B 群的问题" not in listed


def test_private_chat_lists_the_users_tasks_and_no_group_shows_them(chat):
    chat.task("私聊的秘密")
    chat.task("A 群的问题", group=GROUP_A)
    assert "私聊的秘密" in chat.say("/tasks") and "A 群的问题" in chat.say("/tasks")
    assert chat.say("/tasks", group=GROUP_B) == "你还没有任务。"


def test_status_by_id_of_a_private_task_is_not_found_in_a_group(chat):
    private = chat.task("私聊的秘密")
    assert chat.say(f"/status {private}", group=GROUP_A) == f"找不到任务 {private}"
    assert chat.say(f"/status {private}").startswith(f"任务 {private}: 排队中")


def test_status_without_id_in_a_group_is_the_latest_task_of_that_group(chat):
    in_group = chat.task("A 群的问题", group=GROUP_A)
    chat.task("之后的私聊")
    status = chat.say("/status", group=GROUP_A)
    assert status.startswith(f"任务 {in_group}:") and "之后的私聊" not in status
    assert chat.say("/status", group=GROUP_B) == "你还没有任务。"


def test_admin_sees_another_chats_task_only_in_the_admins_private_chat(chat):
    private = chat.task("alice 的私聊秘密")
    group_a = chat.task("alice 在 A 群", group=GROUP_A)
    assert chat.say(f"/status {private}", user="boss", group=GROUP_A) == f"找不到任务 {private}"
    assert chat.say(f"/status {group_a}", user="boss", group=GROUP_B) == f"找不到任务 {group_a}"
    assert "alice 在 A 群" in chat.say(f"/status {group_a}", user="boss", group=GROUP_A)
    assert "alice 的私聊秘密" in chat.say(f"/status {private}", user="boss")
    assert chat.say(f"/status {private}", user="mallory") == f"找不到任务 {private}"


def test_cancel_without_id_in_a_group_picks_the_latest_active_task_of_that_group(chat):
    in_group = chat.task("A 群的问题", group=GROUP_A)
    private = chat.task("之后的私聊")
    assert chat.cancel("/cancel", group=GROUP_A) == f"已取消任务 {in_group}"
    assert chat.manager.get_task(private).status == "queued"
    assert chat.cancel("/cancel", group=GROUP_A) == "你没有进行中的任务。"


def test_cancel_by_id_keeps_the_owner_or_admin_rule_in_any_chat(chat):
    private = chat.task("私聊的问题")
    other = chat.task("别人的问题", user="bob")
    assert chat.cancel(f"/cancel {private}", group=GROUP_A) == f"已取消任务 {private}"
    assert chat.cancel(f"/cancel {other}", group=GROUP_A) == f"找不到任务 {other}"
    assert chat.cancel(f"/cancel {other}", user="boss", group=GROUP_A) == f"已取消任务 {other}"


# ---------------------------------------------------------------- limits


def test_a_prompt_beyond_max_queued_per_user_is_refused_with_a_clear_reply():
    chat = _App(MAX_QUEUED_PER_USER="3")
    for number in range(3):
        chat.task(f"问题 {number}")
    assert chat.say("第四个问题") == "你已有 3 个任务在排队，请等待完成或 /cancel 后再发送。"
    assert len(chat.manager.tasks_for("alice")) == 3 and chat.manager.queued_count("alice") == 3
    assert chat.manager.queued_count("bob") == 0
    chat.task("别人的问题", user="bob")  # the limit is per user


def test_commands_are_rate_limited_in_a_window_of_their_own():
    now = [1000.0]
    chat = _App(clock=lambda: now[0], USER_RATE_LIMIT="2")
    answers = [chat.say("/help") for _ in range(6)]
    assert all(answer.startswith("可用命令") for answer in answers[:4])  # twice USER_RATE_LIMIT
    assert answers[4] == "请求过于频繁，请稍后再试 (每分钟最多 4 条命令)。" and answers[5] == ""
    assert chat.say("") == ""  # the replies to empty messages count as commands
    chat.task("一个问题")  # prompts still go: they have their own window
    now[0] += 60
    assert chat.say("/help").startswith("可用命令")


def test_prompts_are_rate_limited_and_the_user_told_once_a_minute():
    now = [1000.0]
    chat = _App(clock=lambda: now[0], USER_RATE_LIMIT="2")
    for number in range(2):
        chat.task(f"问题 {number}")
    assert chat.say("第三个") == "请求过于频繁，请稍后再试 (每分钟最多 2 个任务)。"
    assert chat.say("第四个") == ""
    assert chat.say("/status").startswith("任务 ")  # commands are not held up by the prompt limit


def test_a_non_owners_approve_or_deny_counts_against_the_rate_limit_and_is_refused_once_per_window():
    now = [1000.0]
    chat = _App(clock=lambda: now[0], USER_RATE_LIMIT="2")  # 4 commands a minute
    approvals = chat.manager.workers.approvals
    told: list[str] = []  # lines sent to the task's chat (the card refusal goes there)
    approvals.send_question = lambda task, text: told.append(text)
    task = Task(id="t1", user_id="olga", user_name="Olga", conversation_key=GROUP_A, route=Route("2", "olga", GROUP_A),
                prompt="p", status=RUNNING)
    decisions: list = []
    request = ToolRequest("Bash", {"command": "ls"})
    asking = threading.Thread(target=lambda: decisions.append(approvals.ask(task, request)))
    asking.start()
    deadline = time.monotonic() + 5
    while approvals.waiting(GROUP_A) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    asked = len(told)
    assert chat.say("同意", user="mallory", group=GROUP_A) == "只有发起任务 t1 的人或管理员可以确认这个操作。"
    assert chat.say("拒绝", user="mallory", group=GROUP_A) == ""  # one refusal line per person per window
    assert approvals.click(f"t1-{approvals.asked}", "mallory", False, True) == "refused" and len(told) == asked
    assert chat.say("/help", user="mallory").startswith("可用命令")  # the 4th command of the minute: 3 were presses
    assert chat.say("同意", user="mallory", group=GROUP_A) == ""  # over the limit: nothing at all
    assert chat.say("/help", user="mallory") == "请求过于频繁，请稍后再试 (每分钟最多 4 条命令)。"  # as any command
    assert approvals.waiting(GROUP_A) is task  # nothing mallory did answered it
    now[0] += 60
    assert approvals.click(f"t1-{approvals.asked}", "mallory", False, True) == "refused"
    assert told[asked:] == ["只有发起任务 t1 的人或管理员可以确认这个操作。"]  # a new window: one line again
    assert chat.say("同意", user="mallory", group=GROUP_A) == ""
    assert chat.say("同意", user="olga", group=GROUP_A) == "已同意，任务 t1 继续执行。"
    asking.join(5)
    assert decisions and decisions[0].allowed


def test_per_user_limit_state_is_pruned_once_users_go_quiet():
    now = [1000.0]
    chat = _App(clock=lambda: now[0], ALLOWED_USERS="someone")
    for number in range(500):
        chat.say("/help", user=f"visitor{number}")  # each refused once: a quiet period per user
    assert len(chat.app.limits) == 500
    now[0] += 3601
    chat.say("/help", user="someone")
    assert len(chat.app.limits) == 1  # the sweep dropped everyone who has nothing left to remember


def test_rate_limits_sweep_drops_empty_windows_and_ended_quiet_periods():
    now = [0.0]
    limits = RateLimits(lambda: now[0], window=60, sweep_every=10)
    assert limits.allow("a", 1) and not limits.allow("a", 1)
    assert limits.once_per("b", 30) and not limits.once_per("b", 30)
    now[0] = 20
    assert limits.sweep() == 0 and len(limits) == 2
    now[0] = 59
    assert limits.sweep() == 1 and len(limits) == 1  # b's quiet period ended
    now[0] = 60
    assert limits.allow("a", 1)  # a's window moved on
    now[0] = 130
    assert limits.allow("c", 1) and len(limits) == 1  # the sweep ran on this call: only c is left


# ---------------------------------------------------------------- log lines


def test_each_message_type_is_logged_after_dedup(chat, caplog):
    with caplog.at_level(logging.INFO):
        chat.say("/help", user="u9")
        chat.app.handle(IncomingMessage("m1", "u9", "", "1", "c", "", msgtype="picture",
                                        session_webhook="http://hook"))  # m1 was seen: a redelivery
    lines = [r.getMessage() for r in caplog.records if "收到消息类型" in r.getMessage()]
    assert lines == ["收到消息类型: text user=u9"]


def test_status_changes_are_logged_with_running_as_processing(chat, caplog):
    task_id = chat.task("问题")
    with caplog.at_level(logging.INFO):
        chat.manager.update_status(task_id, "running")
        chat.manager.update_status(task_id, "running", last_step="工具 Read")  # no change of status: no line
        chat.manager.complete_task(task_id, "ok", 1.0)
    lines = [r.getMessage() for r in caplog.records if "状态更新" in r.getMessage()]
    assert lines == [f"任务 {task_id} 状态更新: processing task={task_id} user=alice",
                     f"任务 {task_id} 状态更新: succeeded task={task_id} user=alice"]


# ---------------------------------------------------------------- the DingTalk call budget


def test_status_shows_the_months_spend_by_kind_and_the_senders_day():
    chat = _App(ADMIN_USERS="boss", USER_DAILY_API_CALLS="3")
    chat.manager.outbox.budget = budget = ApiBudget(chat.manager.store, 5000, user_daily_limit=3, exempt=("boss",))
    assert [budget.spend(kind, "alice") == "" for kind in ("download", "download", "batchSend", "card_stream")] == [
        True, True, True, False]
    budget.spend("media_upload", "boss")
    assert chat.say("/status").splitlines() == [
        "你还没有任务。", "钉钉接口调用: 本月 4/5000 次 (下载 2、上传 1、推送 1、卡片 0)；你今天 3/3 次"]
    assert chat.say("/status", user="boss").endswith("；你今天 1 次 (管理员不限)")
    task_id = chat.task("一个问题")
    assert chat.say("/status").splitlines()[-1].startswith("钉钉接口调用: 本月 4/5000 次")
    assert "钉钉接口调用" not in chat.say(f"/status {task_id}")  # about that task only
    assert chat.say("/status", group=GROUP_A).splitlines()[-1] == (  # others read a group: not the sender's day
        "钉钉接口调用: 本月 4/5000 次 (下载 2、上传 1、推送 1、卡片 0)")
