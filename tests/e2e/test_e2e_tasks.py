"""End to end: task status, cancellation, persistence and restart recovery, dedup, queueing, sessions."""

from __future__ import annotations

import re
import sqlite3
import time

import pytest

from tests.conftest import cli_runs, process_alive, replies, run_alive, wait_for_process
from tests.standin import BATCH_SEND_PATH

pytestmark = pytest.mark.e2e


def _task_id(text: str) -> str:
    match = re.search(r"任务ID: (\w+)", text)
    assert match, text
    return match.group(1)


def _last_step(tmp_path, task_id: str) -> str:
    """The last step the bot recorded for a task, as its task DB holds it ("" before any)."""
    with sqlite3.connect(f"file:{tmp_path / 'data' / 'tasks.db'}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT last_step FROM tasks WHERE id = ?", (task_id,)).fetchone()
    return (row[0] or "") if row else ""


def _stored_run(tmp_path, task_id: str) -> tuple[str, int] | None:
    """(status, attempts) of a task as its task DB holds it: the store writes behind, so a log line saying a run
    started does not mean the run is counted yet."""
    with sqlite3.connect(f"file:{tmp_path / 'data' / 'tasks.db'}?mode=ro", uri=True) as conn:
        return conn.execute("SELECT status, attempts FROM tasks WHERE id = ?", (task_id,)).fetchone()


def _wait_run_stored(standin, tmp_path, task_id: str, attempt: int) -> None:
    """Wait until the task DB says the task runs its `attempt`-th time (a kill before that loses the count)."""
    standin.wait_for(lambda: _stored_run(tmp_path, task_id) == ("running", attempt), timeout=15,
                     message=f"task {task_id} stored as running, attempt {attempt}: {_stored_run(tmp_path, task_id)}")


def _pushes_for(standin, task_id: str) -> list[str]:
    """Messages about a task that reached the user: background ones go by webhook while it lives, else pushed."""
    texts = [r.text or "" for r in standin.webhook_posts() + standin.batch_sends() + standin.group_sends()]
    return [t for t in texts if task_id in t]


@pytest.mark.parametrize("conversation_type", ["1", "2"])
def test_help_tasks_and_status_commands_in_1to1_and_group(standin, make_bot, conversation_type):
    make_bot()
    help_reply = replies(standin, standin.send_bot_message("/help", conversation_type=conversation_type), 1)[0]
    assert "/cancel" in help_reply and "新会话" in help_reply
    alias = replies(standin, standin.send_bot_message("帮助", conversation_type=conversation_type), 1)[0]
    assert alias == help_reply
    first = standin.send_bot_message("第一个问题", conversation_type=conversation_type)
    task_id = _task_id(replies(standin, first, 2)[0])
    tasks = replies(standin, standin.send_bot_message("/tasks", conversation_type=conversation_type), 1)[0]
    assert task_id in tasks and "已完成" in tasks and "第一个问题" in tasks
    status = replies(standin, standin.send_bot_message(f"任务状态 {task_id}",
                                                        conversation_type=conversation_type), 1)[0]
    assert status.startswith(f"任务 {task_id}: 已完成") and "已用时" in status
    latest = replies(standin, standin.send_bot_message("/status", conversation_type=conversation_type), 1)[0]
    assert latest == status or latest.startswith(f"任务 {task_id}")


def test_commands_answer_at_once_while_every_worker_is_busy(standin, make_bot):
    bot = make_bot(MAX_WORKERS="1")
    standin.send_bot_message("生成报告 [sleep=20]", sender_staff_id="busy")
    bot.wait_log("后台任务开始执行")  # the one worker is busy
    sent = standin.send_bot_message("/tasks", sender_staff_id="busy")
    start = time.monotonic()
    reply = replies(standin, sent, 1)[0]
    assert "执行中" in reply and time.monotonic() - start < 3


def test_queue_positions_with_one_worker(standin, make_bot):
    bot = make_bot(MAX_WORKERS="1")
    standin.send_bot_message("生成报告 [sleep=20]", sender_staff_id="u1")
    bot.wait_log("后台任务开始执行")  # the one worker is busy
    second = replies(standin, standin.send_bot_message("问题二", sender_staff_id="u2"), 1)[0]
    third = replies(standin, standin.send_bot_message("问题三", sender_staff_id="u3"), 1)[0]
    assert "第 1 位" in second and "第 2 位" in third
    status = replies(standin, standin.send_bot_message(f"/status {_task_id(third)}", sender_staff_id="u3"), 1)[0]
    assert "排队中" in status and "排队位置: 第 2 位 (等待空闲的执行位置)" in status


def test_cancel_a_queued_task_it_never_runs(standin, make_bot, tmp_path):
    bot = make_bot(MAX_WORKERS="1")
    standin.send_bot_message("生成报告 [sleep=20]", sender_staff_id="u1")
    bot.wait_log("后台任务开始执行")  # the one worker is busy
    queued = standin.send_bot_message("排队的问题", sender_staff_id="u2")
    task_id = _task_id(replies(standin, queued, 1)[0])
    reply = replies(standin, standin.send_bot_message("/cancel", sender_staff_id="u2"), 1)[0]
    assert reply.startswith(f"已取消任务 {task_id}")
    status = replies(standin, standin.send_bot_message(f"/status {task_id}", sender_staff_id="u2"), 1)[0]
    assert "已取消" in status
    assert not any("排队的问题" in run["prompt"] for run in cli_runs(tmp_path))


def test_cancel_a_running_task_leaves_no_process_but_its_warm_cli(standin, make_bot, tmp_path):
    bot = make_bot()
    sent = standin.send_bot_message("长任务 [sleep=60] [spawn]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    child = wait_for_process(tmp_path, ["sleep", "300"])
    reply = replies(standin, standin.send_bot_message(f"取消任务 {task_id}", sender_staff_id="u1"), 1)[0]
    assert reply == f"已取消任务 {task_id}"
    # The turn was interrupted and its tool's process killed; the CLI itself stays warm for the next message.
    assert not process_alive(child) and run_alive(cli_runs(tmp_path)[0])
    bot.wait_log(rf"任务 {task_id} 失败 \(cancelled\)")
    time.sleep(0.5)
    assert len(standin.webhook_posts(sent.session)) == 1  # no error message after the confirmation


def test_another_user_cannot_see_or_cancel_but_an_admin_can(standin, make_bot):
    make_bot(ADMIN_USERS="boss")
    sent = standin.send_bot_message("我的秘密任务 [sleep=20]", sender_staff_id="alice")
    task_id = _task_id(replies(standin, sent, 1)[0])
    for command in (f"/status {task_id}", f"/cancel {task_id}"):
        reply = replies(standin, standin.send_bot_message(command, sender_staff_id="mallory"), 1)[0]
        assert reply == f"找不到任务 {task_id}"
    assert "alice" not in replies(standin, standin.send_bot_message("/tasks", sender_staff_id="mallory"), 1)[0]
    status = replies(standin, standin.send_bot_message(f"/status {task_id}", sender_staff_id="boss"), 1)[0]
    assert status.startswith(f"任务 {task_id}: 执行中")
    cancel = replies(standin, standin.send_bot_message(f"/cancel {task_id}", sender_staff_id="boss"), 1)[0]
    assert cancel.startswith(f"已取消任务 {task_id}")


def test_unknown_task_id_is_answered_plainly(standin, make_bot):
    make_bot()
    assert replies(standin, standin.send_bot_message("/status nope123"), 1)[0] == "找不到任务 nope123"
    assert replies(standin, standin.send_bot_message("/cancel"), 1)[0] == "你没有进行中的任务。"


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
def test_sigkill_mid_task_then_restart_gives_exactly_one_answer(standin, make_bot, tmp_path, sandbox):
    bot = make_bot(CODEBUDDY_SANDBOX=sandbox)
    sent = standin.send_bot_message("生成报告 重要 [sleep=3] [spawn]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    bot.wait_log("后台任务开始执行")
    orphan = wait_for_process(tmp_path, ["sleep", "300"])
    _wait_run_stored(standin, tmp_path, task_id, 1)
    bot.kill()
    if sandbox == "bwrap":  # the jail dies with the bot (bwrap --die-with-parent): nothing is left behind
        standin.wait_for(lambda: not process_alive(orphan), timeout=5)
    else:
        assert process_alive(orphan)  # without a sandbox a crash leaves the run's processes behind…
    restarted = make_bot(CODEBUDDY_SANDBOX=sandbox)
    restarted.wait_log("上次运行被中断，重新执行")
    standin.wait_for(lambda: not process_alive(orphan), timeout=5)  # …and the next start stops them
    notice = standin.wait_for(lambda: [t for t in _pushes_for(standin, task_id) if "重新执行" in t])
    assert notice[0].startswith("上次运行被中断，正在重新执行")
    standin.wait_for(lambda: [t for t in _pushes_for(standin, task_id) if "已完成" in t], timeout=20)
    time.sleep(1)
    answers = [t for t in _pushes_for(standin, task_id) if "回答: 生成报告 重要" in t]
    assert len(answers) == 1
    assert len([r for r in cli_runs(tmp_path) if "重要" in r["prompt"]]) == 2


def test_task_interrupted_twice_is_failed_and_the_user_told(standin, make_bot, tmp_path):
    bot = make_bot()
    sent = standin.send_bot_message("生成报告 [sleep=30]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    _wait_run_stored(standin, tmp_path, task_id, 1)
    bot.kill()
    second = make_bot()
    _wait_run_stored(standin, tmp_path, task_id, 2)
    second.kill()
    make_bot().wait_log(rf"任务 {task_id} 失败")
    failed = standin.wait_for(lambda: [t for t in _pushes_for(standin, task_id) if "执行失败" in t])
    assert "再次中断" in failed[0]


def test_undelivered_result_is_pushed_after_restart(standin, make_bot):
    bot = make_bot(DELIVERY_RETRY_WINDOW="1.5")
    standin.fail_next(BATCH_SEND_PATH, status=503, times=10_000)
    sent = standin.send_bot_message("生成报告 送达测试 [sleep=1]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    standin.expire_webhook(sent.session)  # the result must be pushed (a live webhook would carry it)
    bot.wait_log(rf"任务 {task_id} 结果发送失败", timeout=30)
    assert bot.terminate() == 0
    standin.clear_faults()
    restarted = make_bot()
    restarted.wait_log(rf"任务结果已推送: {task_id}")
    assert len([t for t in _pushes_for(standin, task_id) if "回答: 生成报告 送达测试" in t]) == 1


def test_same_msgid_twice_creates_one_task_even_across_a_restart(standin, make_bot, tmp_path):
    bot = make_bot()
    sent = standin.send_bot_message("只回答一次", sender_staff_id="u1")
    replies(standin, sent, 2)
    standin.redeliver(sent)
    bot.wait_log("重复消息已忽略")
    assert bot.terminate() == 0
    restarted = make_bot()
    standin.redeliver(sent)
    restarted.wait_log("重复消息已忽略")
    time.sleep(0.5)
    assert len([r for r in cli_runs(tmp_path) if "只回答一次" in r["prompt"]]) == 1
    assert len(standin.webhook_posts(sent.session)) == 2


def test_progress_note_for_a_long_background_task(standin, make_bot):
    make_bot(PROGRESS_INTERVAL="1")
    sent = standin.send_bot_message("市场调研 [sleep=3]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    notes = standin.wait_for(lambda: [t for t in _pushes_for(standin, task_id) if "仍在处理中" in t])
    assert "已用时" in notes[0] and "工具 Bash" in notes[0]
    standin.wait_for(lambda: [t for t in _pushes_for(standin, task_id) if "已完成" in t])


def test_one_conversation_is_one_session_and_new_resets_it(standin, make_bot, tmp_path):
    make_bot()
    first = replies(standin, standin.send_bot_message("第一句", sender_staff_id="u1"), 2)[1]
    second = replies(standin, standin.send_bot_message("第二句", sender_staff_id="u1"), 2)[1]
    other = replies(standin, standin.send_bot_message("别人的", sender_staff_id="u2"), 2)[1]
    assert "turn 1" in first and "turn 2, earlier: 第一句" in second and "turn 1" in other
    replies(standin, standin.send_bot_message("/new", sender_staff_id="u1"), 1)
    fresh = replies(standin, standin.send_bot_message("第三句", sender_staff_id="u1"), 2)[1]
    assert "turn 1" in fresh
    sessions = [r["session"] for r in cli_runs(tmp_path)]
    assert sessions[0] == sessions[1] != sessions[2] and sessions[3] not in sessions[:3]
    assert all(re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9\-_:]*", s) for s in sessions)


def test_prompts_in_one_conversation_run_one_at_a_time(standin, make_bot, tmp_path):
    make_bot(MAX_WORKERS="4")
    standin.send_bot_message("先 [sleep=1.5]", sender_staff_id="u1")
    second = standin.send_bot_message("后", sender_staff_id="u1")
    replies(standin, second, 2)
    runs = cli_runs(tmp_path)
    assert runs[1]["start"] - runs[0]["start"] >= 1.4


def test_prediction_sends_a_keywordless_prompt_to_the_background_after_its_class_ran_long(standin, make_bot):
    make_bot(SYNC_TIMEOUT="1")
    for number in range(2):
        sent = standin.send_bot_message(f"慢问题 {number} [sleep=1.5]", sender_staff_id="u1")
        task_id = _task_id(replies(standin, sent, 1)[0])
        standin.wait_for(lambda t=task_id: [x for x in _pushes_for(standin, t) if "已完成" in x])
    ack = replies(standin, standin.send_bot_message("又一个问题", sender_staff_id="u1"), 1)[0]
    assert "后台执行" in ack and "预计耗时" in ack
    other_user = replies(standin, standin.send_bot_message("又一个问题", sender_staff_id="u2"), 1)[0]
    assert "后台" not in other_user


def test_a_user_runs_at_most_max_tasks_per_user_at_once(standin, make_bot, tmp_path):
    make_bot(MAX_WORKERS="4", MAX_TASKS_PER_USER="1")
    first = standin.send_bot_message("生成报告 私聊任务 [sleep=60]", sender_staff_id="u1")
    first_id = _task_id(replies(standin, first, 1)[0])
    group = standin.send_bot_message("群里的任务", sender_staff_id="u1", conversation_type="2")
    other = standin.send_bot_message("别人的任务", sender_staff_id="u2", conversation_type="2",
                                     conversation_id="cidOTHERgroup==")
    assert "排队中" in replies(standin, group, 1)[0]
    assert "回答: 别人的任务" in replies(standin, other, 2)[1]  # another user did not wait…
    assert not [run for run in cli_runs(tmp_path) if run["prompt"] == "群里的任务"]  # …u1's second task does
    cancelled_at = time.time()
    replies(standin, standin.send_bot_message(f"/cancel {first_id}", sender_staff_id="u1"), 1)
    standin.wait_for(lambda: [p for p in standin.webhook_posts(group.session) if "回答: 群里的任务" in (p.text or "")],
                     timeout=15)
    [run] = [run for run in cli_runs(tmp_path) if run["prompt"] == "群里的任务"]
    assert run["start"] >= cancelled_at  # it ran once u1's first task was gone


def test_status_of_a_running_task_names_its_last_step_and_expected_remaining_time(standin, make_bot, tmp_path):
    make_bot()
    sent = standin.send_bot_message("生成报告 [sleep=20]", sender_staff_id="u1")
    task_id = _task_id(replies(standin, sent, 1)[0])
    standin.wait_for(lambda: _last_step(tmp_path, task_id), timeout=15, message="the run's first step")
    status = replies(standin, standin.send_bot_message("/status", sender_staff_id="u1"), 1)[0]
    assert status.startswith(f"任务 {task_id}: 执行中")
    assert "最近步骤: 工具 Bash" in status and "预计剩余时间: 同类任务通常需要 2-5 分钟" in status
