"""End to end: the chat's limits, its privacy between chats, and the log lines operators grep for.

The real SDK over a real websocket to the local DingTalk stand-in, `python bot.py` as a subprocess, the fake CLI.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.conftest import cli_runs, replies

pytestmark = pytest.mark.e2e


def _all_texts(standin, sent) -> list[str]:
    return [post.text or "" for message in sent for post in standin.webhook_posts(message.session)]


def _task_id(text: str) -> str:
    match = re.search(r"任务ID: (\w+)", text)
    assert match, text
    return match.group(1)


def _ask(standin, text: str, user: str = "alice", group: bool = False) -> str:
    """Send `text` from `user` in the group (or their 1:1 chat) and return the first reply."""
    sent = standin.send_bot_message(text, sender_staff_id=user, conversation_type="2" if group else "1")
    return replies(standin, sent, 1)[0]


# ---------------------------------------------------------------- privacy


def test_a_group_sees_only_its_own_tasks_and_the_private_chat_the_users(standin, make_bot):
    make_bot(ADMIN_USERS="boss")
    private = standin.send_bot_message("私聊里的秘密问题", sender_staff_id="alice")
    private_id = _task_id(replies(standin, private, 2)[0])
    in_group = standin.send_bot_message("群里的问题", sender_staff_id="alice", conversation_type="2")
    group_id = _task_id(replies(standin, in_group, 2)[0])

    group_tasks = _ask(standin, "/tasks", group=True)
    assert group_id in group_tasks and "群里的问题" in group_tasks
    assert private_id not in group_tasks and "秘密" not in group_tasks
    in_group_status = _ask(standin, "/status", group=True)
    assert in_group_status.startswith(f"任务 {group_id}: 已完成")
    spend = in_group_status.splitlines()[-1]  # /status without an id: the month's calls; in a group not the sender's
    assert spend.startswith("钉钉接口调用: 本月 ") and "你今天" not in spend
    assert _ask(standin, f"/status {private_id}", group=True) == f"找不到任务 {private_id}"
    private_tasks = _ask(standin, "/tasks")
    assert private_id in private_tasks and "私聊里的秘密问题" in private_tasks

    # An admin, in the group: that group's tasks only; in the admin's own 1:1 chat: any task.
    assert _ask(standin, f"/status {private_id}", user="boss", group=True) == f"找不到任务 {private_id}"
    assert "群里的问题" in _ask(standin, f"/status {group_id}", user="boss", group=True)
    assert "私聊里的秘密问题" in _ask(standin, f"/status {private_id}", user="boss")


# ---------------------------------------------------------------- limits


def test_a_prompt_over_the_queue_cap_is_refused_in_plain_words(standin, make_bot, tmp_path):
    bot = make_bot(MAX_WORKERS="1", MAX_QUEUED_PER_USER="2")
    standin.send_bot_message("生成报告 [sleep=20]", sender_staff_id="busy")
    bot.wait_log("后台任务开始执行")  # the one worker is taken: what follows waits in the queue
    for number in range(2):
        assert "排队中" in replies(standin, standin.send_bot_message(f"排队 {number}", sender_staff_id="u1"), 1)[0]
    refused = standin.send_bot_message("第三个", sender_staff_id="u1")
    assert replies(standin, refused, 1)[0] == "你已有 2 个任务在排队，请等待完成或 /cancel 后再发送。"
    assert "排队中" in replies(standin, standin.send_bot_message("别人的", sender_staff_id="u2"), 1)[0]
    bot.wait_log(r"排队任务已达上限 \(2 个\) user=u1")
    time.sleep(0.3)
    assert len(standin.webhook_posts(refused.session)) == 1
    assert not any("第三个" in run["prompt"] for run in cli_runs(tmp_path))


def test_a_flood_of_commands_is_answered_only_up_to_the_limit(standin, make_bot):
    bot = make_bot(USER_RATE_LIMIT="2")  # commands: twice that a minute
    sent = [standin.send_bot_message("/status", sender_staff_id="u1") for _ in range(30)]
    bot.wait_log(r"请求过于频繁 \(命令\) user=u1", count=26)
    standin.wait_for(lambda: len(_all_texts(standin, sent)) >= 5)
    time.sleep(0.3)
    texts = _all_texts(standin, sent)
    assert [text.splitlines()[0] for text in texts].count("你还没有任务。") == 4
    assert texts.count("请求过于频繁，请稍后再试 (每分钟最多 4 条命令)。") == 1 and len(texts) == 5
    answer = standin.send_bot_message("还能提问", sender_staff_id="u1")
    assert "回答: 还能提问" in replies(standin, answer, 2)[1]  # prompts have their own window


# ---------------------------------------------------------------- log lines


def test_the_log_has_every_seed_phrase_with_task_and_user(standin, make_bot):
    bot = make_bot()
    short = standin.send_bot_message("你好", sender_staff_id="u1")
    short_id = _task_id(replies(standin, short, 2)[0])
    standin.send_bot_message("生成报告: 私聊", sender_staff_id="u2", webhook_ttl_ms=1000)  # expired: pushed
    standin.send_bot_message("生成报告: 群里", sender_staff_id="u3", conversation_type="2", webhook_ttl_ms=1000)
    standin.wait_for(lambda: standin.batch_sends() and standin.group_sends())
    bot.wait_log(r"任务结果已推送", count=2)
    assert bot.terminate() == 0
    log = bot.log_text()
    for pattern in (
        r"收到消息类型: text user=u1",
        rf"任务 {short_id} 状态更新: processing task={short_id} user=u1",
        rf"任务 {short_id} 状态更新: succeeded task={short_id} user=u1",
        r"准备发送消息，长度: \d+ 字符 user=u1",
        r'回复消息发送成功，钉钉响应: \{"errcode":0,"errmsg":"ok"\} user=u1',
        r"发送消息到用户 u2, 内容长度: \d+ user=u2",
        r'消息发送响应: \{"processQueryKey":"[\w-]+",.*\} user=u2',
        r"发送消息到群 cid\S+, 内容长度: \d+ user=u3",
        r'消息发送响应: \{"processQueryKey":"[\w-]+"\} user=u3',
    ):
        assert re.search(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d - INFO - {pattern}$", log, re.M), pattern


def test_text_from_outside_cannot_forge_a_log_line(standin, make_bot):
    bot = make_bot()
    forged = "x\n2026-01-01 00:00:00 - ERROR - forged\x1b[2J"
    sent = standin.send_bot_message(msgtype=forged, content={}, sender_staff_id="u4")
    assert "类型的消息" in replies(standin, sent, 1)[0]
    line = bot.wait_log(r"收到消息类型: x")[0]
    assert line.endswith(r"收到消息类型: x\n2026-01-01 00:00:00 - ERROR - forged\x1b[2J user=u4")
    assert not any(row.startswith("2026-01-01") for row in bot.log_text().splitlines())
