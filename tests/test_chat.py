"""The chat app on its own: who sees which task, the per-user limits, and their memory."""

from __future__ import annotations

import time

import pytest

from async_task_manager import AsyncTaskManager
from chat import ChatApp, IncomingMessage
from config import load_config
from dingtalk_sender import Delivery
from rate_limits import RateLimits
from task_store import MemoryTaskStore

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
