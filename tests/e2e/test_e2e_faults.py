"""Fault injection, end to end: DingTalk, the network and CodeBuddy misbehave; users send bad or hostile input.

All through the real SDK frames, real sockets and `python bot.py` as a subprocess.
"""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest

from tests.conftest import CLIENT_SECRET, cli_runs, process_alive, replies, run_alive, send_pushed, wait_for_process
from tests.standin import BATCH_SEND_PATH, BOT_TOPIC, GROUP_SEND_PATH, OPEN_PATH

pytestmark = pytest.mark.e2e


def _push_texts(standin) -> list[str]:
    return [r.msg_param.get("text") or r.msg_param.get("content") or ""
            for r in standin.batch_sends() + standin.group_sends()]


def _messages(standin) -> list[str]:
    """Every message that reached a user: webhook replies (results go there while the webhook lives) and pushes."""
    return [r.text or "" for r in standin.webhook_posts()] + _push_texts(standin)


# ---------------------------------------------------------------- delivery


@pytest.mark.parametrize("status,body,headers", [
    (503, {"code": "ServiceUnavailable"}, {}),
    (429, {"code": "Throttling"}, {"Retry-After": "1"}),
    (403, {"code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi", "message": "qps"}, {}),
    (403, {"code": "Forbidden.AccessDenied.QpsLimitForApi", "message": "qps"}, {}),
])
def test_push_is_retried_until_delivered(standin, make_bot, status, body, headers):
    make_bot()
    standin.fail_next(BATCH_SEND_PATH, status=status, body=body, headers=headers, times=4)
    send_pushed(standin, "生成报告 重试", sender_staff_id="u1")
    standin.wait_for(lambda: standin.batch_sends(), timeout=30)
    faulted = [r for r in standin.requests if r.path == BATCH_SEND_PATH and r.faulted]
    assert len(faulted) == 4 and len(standin.batch_sends()) == 1
    if headers:
        gaps = [b.time - a.time for a, b in zip(faulted, faulted[1:], strict=False)]
        assert min(gaps) >= 0.9, gaps  # Retry-After honoured


def test_flow_controlled_user_is_retried_alone(standin, make_bot):
    make_bot()
    standin.flow_control_next("u1", times=2)
    send_pushed(standin, "生成报告 限流", sender_staff_id="u1")
    delivered = standin.wait_for(lambda: [r for r in standin.batch_sends() if "u1" in r.delivered_user_ids],
                                 timeout=20)
    assert len(delivered) == 1
    attempts = [r for r in standin.requests if r.path == BATCH_SEND_PATH]
    assert len(attempts) == 3 and all(r.user_ids == ["u1"] for r in attempts)


def test_monthly_quota_is_not_retried_at_once_and_logged_loudly(standin, make_bot):
    bot = make_bot()
    standin.fail_next(BATCH_SEND_PATH, status=403, times=50,
                      body={"code": "Forbidden.AccessDenied.ApiCountLimitForOrg", "message": "quota"})
    send_pushed(standin, "生成报告 额度", sender_staff_id="u1")
    bot.wait_log("月度调用额度已用完")
    bot.wait_log(r"结果发送失败 \(60 秒后重试\)")  # later, with backoff: the quota resets monthly
    time.sleep(1)
    assert len([r for r in standin.requests if r.path == BATCH_SEND_PATH]) == 1


def test_parameter_error_is_not_retried(standin, make_bot):
    bot = make_bot()
    standin.fail_next(BATCH_SEND_PATH, status=400, times=50,
                      body={"code": "invalidParameter.msgParam.invalid", "message": "bad"})
    send_pushed(standin, "生成报告 参数", sender_staff_id="u1")
    bot.wait_log(r"结果发送失败 \(不再重试，已放弃: 钉钉拒绝且无法重试\).*invalidParameter")
    assert len([r for r in standin.requests if r.path == BATCH_SEND_PATH]) == 1


def test_expired_token_is_refreshed_once_and_the_push_retried(standin, make_bot):
    make_bot()
    send_pushed(standin, "生成报告 一", sender_staff_id="u1")
    standin.wait_for(lambda: len(standin.batch_sends()) == 1)
    standin.invalidate_tokens()
    send_pushed(standin, "生成报告 二", sender_staff_id="u1", conversation_type="2")
    standin.wait_for(lambda: standin.group_sends())
    rejected = [r for r in standin.requests if r.path == GROUP_SEND_PATH and r.status == 401]
    assert len(rejected) == 1 and standin.token_fetches == 2


def test_webhook_errors_fall_back_to_push(standin, make_bot):
    make_bot()
    standin.fail_next("/robot/sendBySession", status=200, times=20,
                      body={"errcode": 130101, "errmsg": "send too fast"})
    standin.send_bot_message("普通问题", sender_staff_id="u1")
    texts = standin.wait_for(lambda: len(standin.batch_sends()) >= 2 and _push_texts(standin))
    assert texts[0].startswith("收到任务") and "回答: 普通问题" in texts[1]


def test_long_answer_is_split_with_code_fences_kept_intact(standin, make_bot):
    make_bot()
    send_pushed(standin, "生成报告 [big=40000]", sender_staff_id="u1")
    def last_part_arrived() -> bool:  # "(k/k)": every part of the answer is in
        texts = [r.msg_param["text"] for r in standin.batch_sends()]
        return any(re.match(r"\((\d+)/\1\)\n", text) for text in texts)

    standin.wait_for(last_part_arrived, timeout=20)
    time.sleep(0.5)
    parts = [r.msg_param["text"] for r in standin.batch_sends()]
    total = len(parts)
    assert total >= 3
    for number, part in enumerate(parts, 1):
        assert part.startswith(f"({number}/{total})\n")
        assert len(part.encode()) <= 15000
        assert part.count("```") % 2 == 0, part[-300:]


# ---------------------------------------------------------------- the stream connection


def test_stream_reconnects_after_drops_and_tasks_keep_running(standin, make_bot):
    bot = make_bot()
    sent = standin.send_bot_message("跑着 [sleep=3]", sender_staff_id="u1")
    replies(standin, sent, 1)
    standin.drop_stream()
    standin.wait_connected(timeout=15, connects_at_least=2)
    standin.send_disconnect()
    standin.wait_connected(timeout=15, connects_at_least=3)
    after = standin.send_bot_message("重连之后", sender_staff_id="u2")
    assert "回答: 重连之后" in replies(standin, after, 2)[1]
    assert "回答: 跑着" in replies(standin, sent, 2)[1]  # the task survived both reconnects
    assert bot.proc.poll() is None


def test_gateway_unreachable_is_retried_with_backoff(standin, make_bot):
    standin.fail_next(OPEN_PATH, status=503, times=3)
    bot = make_bot(connect=False, STREAM_CONNECTIONS="1")  # one loop's backoff (two: tests/e2e/test_e2e_stream_gaps.py)
    standin.wait_connected(timeout=30)
    opens = [r.time for r in standin.requests if r.path == OPEN_PATH]
    assert len(opens) == 4
    gaps = [b - a for a, b in zip(opens, opens[1:], strict=False)]
    assert gaps[2] > gaps[0]  # backoff grows
    assert bot.log_text().count("重新连接钉钉 Stream") >= 3


def test_watchdog_reconnects_a_silent_stream(standin, make_bot):
    bot = make_bot(STREAM_IDLE_TIMEOUT="1.5")
    standin.wait_connected(timeout=20, connects_at_least=2)
    bot.wait_log("秒没有任何消息，重新连接")
    sent = standin.send_bot_message("还在吗", sender_staff_id="u1")
    assert "回答: 还在吗" in replies(standin, sent, 2)[1]


def test_pings_are_acked_and_keep_the_watchdog_quiet(standin, make_bot):
    bot = make_bot(STREAM_IDLE_TIMEOUT="2", STREAM_CONNECTIONS="1")  # the stand-in pings the newest connection only
    for _ in range(8):
        frame = standin.send_ping()
        standin.wait_ack(frame)
        time.sleep(0.4)
    assert "没有任何消息" not in bot.log_text() and standin.stream_connects == 1


# ---------------------------------------------------------------- shutdown


def test_sigterm_waits_for_a_task_that_finishes_within_the_grace(standin, make_bot):
    bot = make_bot(SHUTDOWN_GRACE="5")
    sent = standin.send_bot_message("快结束了 [sleep=1.5]", sender_staff_id="u1")
    replies(standin, sent, 1)
    started = time.monotonic()
    assert bot.terminate(timeout=15) == 0
    assert time.monotonic() - started < 5 + 5
    assert "回答: 快结束了" in replies(standin, sent, 2, timeout=1)[1]


def test_sigterm_stops_a_long_task_and_the_next_start_reruns_it(standin, make_bot, tmp_path):
    bot = make_bot(SHUTDOWN_GRACE="1")
    sent = standin.send_bot_message("生成报告 停机 [sleep=4] [spawn]", sender_staff_id="u1")
    task_id = re.search(r"任务ID: (\w+)", replies(standin, sent, 1)[0]).group(1)
    child = wait_for_process(tmp_path, ["sleep", "300"])
    started = time.monotonic()
    assert bot.terminate(timeout=15) == 0
    assert time.monotonic() - started < 1 + 5
    assert not process_alive(child) and not run_alive(cli_runs(tmp_path)[0])
    assert not [t for t in _messages(standin) if task_id in t and not t.startswith("收到任务")]  # nothing false
    make_bot()
    answer = standin.wait_for(lambda: [t for t in _messages(standin) if "回答: 生成报告 停机" in t], timeout=20)
    assert len(answer) == 1


# ---------------------------------------------------------------- bad input


def test_bad_frames_are_rejected_and_the_daemon_stays_up(standin, make_bot):
    bot = make_bot(STREAM_CONNECTIONS="1")  # one connection, never reconnected
    headers = {"appId": "a", "connectionId": "c", "contentType": "application/json", "time": "0"}
    standin.send_raw_frame("this is not json")
    standin.send_raw_frame("[1, 2, 3]")
    standin.send_raw_frame({"specVersion": "1.0", "type": "CALLBACK", "data": "{not json",
                            "headers": {**headers, "messageId": "bad-data", "topic": BOT_TOPIC}})
    standin.send_raw_frame({"specVersion": "1.0", "type": "CALLBACK", "data": "{}",
                            "headers": {**headers, "messageId": "empty-data", "topic": BOT_TOPIC}})
    standin.send_raw_frame({"specVersion": "1.0", "type": "CALLBACK", "data": "{}",
                            "headers": {**headers, "messageId": "odd-topic", "topic": "/v1.0/unknown"}})
    standin.send_raw_frame({"specVersion": "1.0", "type": "WHATEVER", "data": "{}",
                            "headers": {**headers, "messageId": "odd-type", "topic": BOT_TOPIC}})
    assert standin.wait_ack("bad-data")["code"] == 400
    assert standin.wait_ack("empty-data")["code"] == 200
    bot.wait_log("忽略无法解析的 Stream 消息", count=2)
    bot.wait_log("忽略缺少发送者或会话信息的消息")
    sent = standin.send_bot_message("还活着吗", sender_staff_id="u1")
    assert "回答: 还活着吗" in replies(standin, sent, 2)[1]
    assert standin.stream_connects == 1


@pytest.mark.parametrize("msgtype,content,expected", [
    ("file", {"fileName": "a.pdf", "downloadCode": "x"}, "附件未能接收:\n- 文件 a.pdf: 无法获取下载地址"),
    ("video", {"downloadCode": "x", "duration": 3}, "附件未能接收:\n- 视频 视频.mp4: 无法获取下载地址"),
    ("audio", {"duration": 3}, "暂不支持语音"),
    ("richText", {"richText": [{"downloadCode": "x", "type": "picture"}]}, "附件未能接收:\n- 图片: 无法获取下载地址"),
    ("interactiveCard", {"x": 1}, "暂不支持 interactiveCard"),
])
def test_unsupported_messages_get_a_clear_reply(standin, make_bot, msgtype, content, expected):
    make_bot()
    sent = standin.send_bot_message(msgtype=msgtype, content=content, sender_staff_id="u1")
    assert expected in replies(standin, sent, 1)[0]


def test_huge_text_gets_a_clear_reply(standin, make_bot, tmp_path):
    make_bot()
    sent = standin.send_bot_message("字" * 1_000_000, sender_staff_id="u1")
    assert "消息过长" in replies(standin, sent, 1, timeout=20)[0]
    assert not cli_runs(tmp_path)


@pytest.mark.parametrize("prompt", ["--help", "-p --dangerously-skip-permissions",
                                    "$(touch /tmp/pwned) `id`; rm -rf ~ | cat", "nul\x00byte"])
def test_hostile_prompts_reach_the_cli_as_text(standin, make_bot, tmp_path, prompt):
    make_bot()
    sent = standin.send_bot_message(prompt, sender_staff_id="u1")
    replies(standin, sent, 2)
    run = cli_runs(tmp_path)[0]
    assert run["prompt"] == prompt
    assert prompt not in run["argv"] and "--dangerously-skip-permissions" not in run["argv"]
    assert run["argv"][:9] == ["-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
                               "--replay-user-messages", "--permission-mode", "acceptEdits"]


def test_flood_from_one_user_is_rate_limited(standin, make_bot, tmp_path):
    bot = make_bot(USER_RATE_LIMIT="20", MAX_WORKERS="4", MAX_QUEUED_PER_USER="20")  # the rate limit alone
    sent = [standin.send_bot_message(f"刷屏 {n}", sender_staff_id="flooder") for n in range(200)]
    bot.wait_log("请求过于频繁", count=180, timeout=20)
    limited = standin.wait_for(lambda: [t for s in sent for t in [p.text for p in standin.webhook_posts(s.session)]
                                        if t and "请求过于频繁" in t])
    assert len(limited) == 1
    standin.wait_for(lambda: len(cli_runs(tmp_path)) >= 20, timeout=30)
    time.sleep(0.5)
    assert len(cli_runs(tmp_path)) == 20
    other = standin.send_bot_message("我是别人", sender_staff_id="calm")
    assert "回答: 我是别人" in replies(standin, other, 2, timeout=30)[1]


def test_only_allowed_users_may_use_it(standin, make_bot, tmp_path):
    make_bot(ALLOWED_USERS="alice,bob")
    first = standin.send_bot_message("让我用", sender_staff_id="eve")
    second = standin.send_bot_message("再试一次", sender_staff_id="eve")
    assert "没有使用此机器人的权限" in replies(standin, first, 1)[0]
    allowed = standin.send_bot_message("你好", sender_staff_id="bob")
    replies(standin, allowed, 2)
    assert not standin.webhook_posts(second.session)  # one refusal, not one per message
    assert [r["prompt"] for r in cli_runs(tmp_path)] == ["你好"]


# ---------------------------------------------------------------- the mixed run


def _runs_by_prompt(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in cli_runs(tmp_path):
        key = re.search(r"T\d+-", run["prompt"]).group(0)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _answers_recorded(standin, tmp_path: Path) -> bool:
    """Whether every task whose answer the stand-in has seen is marked delivered in the bot's SQLite task DB."""
    seen = {key for text in _push_texts(standin) + [r.text or "" for r in standin.webhook_posts()]
            for key in re.findall(r"回答: (T\d+-)", text)}
    try:
        with sqlite3.connect(f"file:{tmp_path / 'data' / 'tasks.db'}?mode=ro", uri=True, timeout=1) as db:
            rows = db.execute("SELECT prompt, delivered FROM tasks").fetchall()
    except sqlite3.Error:
        return False
    delivered = {match.group(0) for prompt, done in rows if done and (match := re.search(r"T\d+-", prompt))}
    return seen <= delivered


def test_mixed_faults_every_answer_delivered_exactly_once(standin, make_bot, tmp_path):
    """100 tasks from 10 users (1:1 and group, short and long) while pushes fail 20% of the time, the token
    expires once, the stream drops twice, some webhooks expire, and the daemon is SIGKILLed once."""
    choices = [(503, {"code": "ServiceUnavailable"}, {}), (429, {"code": "Throttling"}, {"Retry-After": "0.2"}),
               (502, None, {})]
    standin.fail_randomly(BATCH_SEND_PATH, 0.2, choices, seed=7)
    standin.fail_randomly(GROUP_SEND_PATH, 0.2, choices, seed=8)
    env = {"MAX_WORKERS": "4", "MAX_TASKS_PER_USER": "2", "SYNC_TIMEOUT": "2", "USER_RATE_LIMIT": "100"}
    bot = make_bot(**env)
    group_id = "cidMIXEDgroup+/=="

    sent = []

    def settle() -> None:
        """Wait until every frame sent so far is ACKed (a drop or crash between messages, not inside one)."""
        standin.wait_for(lambda: all(standin.ack_time(m.frame_message_id) for m in sent), timeout=20)

    def send(number: int) -> None:
        user = f"user{number % 10}"
        long = number % 4 == 0
        sleep = "[sleep=2.5]" if number % 7 == 0 else ("[sleep=0.3]" if number % 3 == 0 else "")
        prompt = f"T{number}- {'生成报告 ' if long else ''}{sleep}"
        group = number % 5 == 0
        sent.append(standin.send_bot_message(prompt, sender_staff_id=user, conversation_type="2" if group else "1",
                                             conversation_id=group_id if group else None,
                                             webhook_ttl_ms=1500 if number % 6 == 0 else 90 * 60 * 1000))

    for number in range(0, 30):
        send(number)
    standin.invalidate_tokens()
    settle()
    standin.drop_stream()
    standin.wait_connected(timeout=20, connects_at_least=2)
    for number in range(30, 60):
        send(number)
    # SIGKILL while long tasks run, right after the last ACK, and once every answer already sent is recorded as
    # delivered: an answer that went out in the instant before the kill, its record not yet written, is sent again
    # after the restart (at least once, by design: docs/task-store.md, "At least once, at the edge").
    standin.wait_for(lambda: bot.log_text().count("后台任务开始执行") >= 1, timeout=30)
    settle()
    standin.wait_for(lambda: _answers_recorded(standin, tmp_path), timeout=30, message="sent answers recorded")
    bot.kill()
    bot = make_bot(**env)
    for number in range(60, 80):
        send(number)
    settle()
    standin.drop_stream()
    standin.wait_connected(timeout=20, connects_at_least=standin.stream_connects + 1)
    for number in range(80, 100):
        send(number)

    def answered() -> dict[str, int]:
        counts: dict[str, int] = {}
        texts = _push_texts(standin) + [r.text or "" for r in standin.webhook_posts()]
        for text in texts:
            for key in re.findall(r"回答: (T\d+-)", text):
                counts[key] = counts.get(key, 0) + 1
        return counts

    deadline = time.monotonic() + 120
    while len(answered()) < 100 and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    counts = answered()
    missing = sorted(set(f"T{n}-" for n in range(100)) - set(counts), key=lambda k: int(k[1:-1]))
    assert not missing, f"no answer for {missing}; runs: {_runs_by_prompt(tmp_path)}\n{bot.log_text()[-3000:]}"
    duplicates = {k: v for k, v in counts.items() if v != 1}
    assert not duplicates, duplicates
    runs = _runs_by_prompt(tmp_path)
    rerun = {k: v for k, v in runs.items() if v > 1}
    assert all(v == 2 for v in rerun.values()) and len(rerun) <= 4, rerun  # only tasks the SIGKILL interrupted
    assert bot.terminate() == 0
    leftovers = [r["run_tag"] for r in cli_runs(tmp_path) if run_alive(r)]
    assert not leftovers
    log = bot.log_text()
    tokens = {r.headers.get("x-acs-dingtalk-access-token") for r in standin.requests} - {None}
    assert CLIENT_SECRET not in log and not any(t in log for t in tokens)
    faulted = len([r for r in standin.requests if r.faulted])
    print(f"\nmixed run: 100 tasks, {sum(runs.values())} CLI runs ({len(rerun)} re-run after SIGKILL), "
          f"{faulted} injected push failures, {standin.token_fetches} token fetches, "
          f"{standin.stream_connects} stream connections, answers delivered once each: {len(counts)}")


def test_sigterm_ends_the_bot_while_the_gateway_hangs(make_bot):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections in the kernel, never answers
    try:
        bot = make_bot(connect=False, DINGTALK_OPENAPI_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}")
        silent.settimeout(20)
        hanging, _ = silent.accept()  # the bot's request is in, and will never be answered
        started = time.monotonic()
        assert bot.terminate(timeout=15) == 0
        assert time.monotonic() - started < 3 + 5
        hanging.close()
    finally:
        silent.close()


def test_tasks_queued_at_shutdown_run_after_the_restart(standin, make_bot):
    bot = make_bot(MAX_WORKERS="1", SHUTDOWN_GRACE="0.5")
    running = standin.send_bot_message("生成报告 跑着 [sleep=5]", sender_staff_id="u1")
    replies(standin, running, 1)
    bot.wait_log("后台任务开始执行")
    waiting = standin.send_bot_message("排着队", sender_staff_id="u2")
    assert "排队中" in replies(standin, waiting, 1)[0]
    assert bot.terminate(timeout=15) == 0
    make_bot(MAX_WORKERS="1")
    texts = standin.wait_for(lambda: (t := _messages(standin)) and any("回答: 排着队" in x for x in t) and t,
                             timeout=30)
    assert any(x.startswith("机器人已重启，你的任务继续排队执行") for x in texts)
    assert any(x.startswith("上次运行被中断，正在重新执行") for x in texts)
    assert len([x for x in texts if "回答: 排着队" in x]) == 1
