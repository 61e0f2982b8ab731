"""Unit tests: routing, splitting, token caching, stream-json parsing, config validation."""

from __future__ import annotations

import json
import threading
import time

import pytest
from dotenv import dotenv_values

from async_task_manager import AsyncTaskManager
from codebuddy_client import StreamState, new_session_id, parse_stream_line, redact_secrets, result_from_stream
from config import EXAMPLE_VALUES, SEED_LONG_TASK_KEYWORDS, ConfigError, load_config, read_config
from dingtalk.message_parts import split_message, utf8_json_cost
from dingtalk_sender import AccessTokenProvider, Delivery, Route
from store.journal import open_store
from store.task_store import MemoryTaskStore, SQLiteTaskStore
from tasks.delivery import Outbox
from tasks.task import Task
from tests.conftest import ROOT

BASE_ENV = {"DINGTALK_CLIENT_ID": "id", "DINGTALK_CLIENT_SECRET": "secret"}


# ---------------------------------------------------------------- config


def test_config_defaults_and_robot_code_falls_back_to_client_id():
    config = load_config(BASE_ENV, dotenv_path=None)
    assert config.robot_code == "id"
    assert config.sync_timeout == 60 and config.task_timeout == 1800 and config.max_workers == 4
    assert config.log_file == ""  # stderr: a trial run never writes the production log
    assert config.openapi_endpoint == "https://api.dingtalk.com"
    assert config.all_long_task_keywords == SEED_LONG_TASK_KEYWORDS


def test_config_missing_secret_names_the_variable():
    with pytest.raises(ConfigError, match="DINGTALK_CLIENT_SECRET.*.env.example"):
        load_config({"DINGTALK_CLIENT_ID": "id"}, dotenv_path=None)


def test_config_names_every_problem_at_once_not_only_the_first():
    with pytest.raises(ConfigError) as raised:
        load_config({"SYNC_TIMEOUT": "soon", "MAX_WORKERS": "0", "CODEBUDDY_SANDBOX": "docker"}, dotenv_path=None)
    names = [problem.split()[0] for problem in raised.value.problems]
    assert names == ["DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET", "CODEBUDDY_SANDBOX", "SYNC_TIMEOUT",
                     "MAX_WORKERS"]
    config, error = read_config({"SYNC_TIMEOUT": "soon"}, dotenv_path=None)
    assert config.sync_timeout == 60 and error is not None  # the rest of the settings still usable (check)


def test_every_example_value_env_example_ships_is_recognised_as_unfilled():
    shipped = {name: value for name, value in dotenv_values(ROOT / ".env.example").items() if value}
    assert shipped == {name: example for name, (example, _) in EXAMPLE_VALUES.items()}
    with pytest.raises(ConfigError) as raised:
        load_config({}, dotenv_path=ROOT / ".env.example")
    assert raised.value.unfilled == ("DINGTALK_CLIENT_ID", "DINGTALK_CLIENT_SECRET", "CODEBUDDY_API_KEY")
    assert [p.split()[0] for p in raised.value.problems] == list(raised.value.unfilled)  # no "not set" twice
    assert "凭证与基础信息" in str(raised.value) and "codebuddy.ai" in str(raised.value)
    config, _ = read_config({}, dotenv_path=ROOT / ".env.example")
    assert config.cli_env == () and config.cli_secrets == ()  # an example key never reaches the CLI


def test_config_non_number_sync_timeout_is_a_clear_error():
    with pytest.raises(ConfigError, match="SYNC_TIMEOUT must be a number"):
        load_config({**BASE_ENV, "SYNC_TIMEOUT": "soon"}, dotenv_path=None)


def test_config_extra_args_split_like_a_shell_and_keywords_added(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("LONG_TASK_KEYWORDS=deep dive, 写论文\nCODEBUDDY_EXTRA_ARGS=--allowedTools 'Read Grep'\n"
                        "MAX_WORKERS=9\n")
    config = load_config({**BASE_ENV, "MAX_WORKERS": "3"}, dotenv_path=env_file)
    assert config.codebuddy_extra_args == ("--allowedTools", "Read Grep")
    assert config.all_long_task_keywords[-2:] == ("deep dive", "写论文")
    assert config.max_workers == 3  # the real environment wins over .env


def test_config_describe_masks_the_secret():
    config = load_config({**BASE_ENV, "DINGTALK_CLIENT_SECRET": "supersecretvalue"}, dotenv_path=None)
    shown = dict(config.describe())
    assert "supersecretvalue" not in shown["DINGTALK_CLIENT_SECRET"]
    assert "supersecretvalue" not in repr(config)


# ---------------------------------------------------------------- routing


class _NoClient:
    def run(self, *args, **kwargs):
        raise AssertionError("not used")


class _NoSender:
    def send(self, *args, **kwargs):
        raise AssertionError("not used")


def _manager(**kwargs) -> AsyncTaskManager:
    return AsyncTaskManager(_NoClient(), _NoSender(), MemoryTaskStore(), **kwargs)


@pytest.mark.parametrize("prompt", ["please do a Client Analysis of ACME", "帮我分析公司财报", "生成报告",
                                    "竞品分析一下"])
def test_should_use_async_matches_seed_keywords_case_insensitively(prompt):
    assert _manager().should_use_async(prompt)


def test_should_use_async_short_prompt_and_extra_keywords():
    manager = _manager(keywords=(*SEED_LONG_TASK_KEYWORDS, "Deep Dive"))
    assert not manager.should_use_async("hello, what is 1+1?")
    assert manager.should_use_async("a deep dive into X")


def test_prediction_routes_a_keywordless_prompt_after_its_class_ran_long():
    manager = _manager(sync_timeout=10)
    assert not manager.should_use_async("写个脚本", "u1")
    for seconds in (30, 40):  # two runs of this user's keyword-less prompts took longer than SYNC_TIMEOUT
        task = manager.create_task("u1", "写个脚本", Route("1", "u1", "c"))
        manager.complete_task(task.id, "ok", seconds)
    assert manager.should_use_async("写个脚本", "u1")
    manager.store.record_duration("u3", "none", 30, time.time())  # history from before a restart counts too
    manager.store.record_duration("u3", "none", 40, time.time())
    assert manager.should_use_async("写个脚本", "u3")
    assert not manager.should_use_async("写个脚本", "u2")  # another user's history is theirs


def test_expected_duration_uses_history_or_the_fixed_text():
    manager = _manager()
    assert manager.expected_duration("生成报告") == "2-5 分钟"
    for seconds in (60, 120, 180, 240, 600):
        manager.store.record_duration("u", "生成报告", seconds, time.time())
    assert manager.expected_duration("生成报告") == "约 3.0 分钟 (90% 的同类任务在 10.0 分钟内完成)"


def test_task_lifecycle_is_persisted_in_sqlite(tmp_path):
    store = open_store(str(tmp_path / "t.db"))
    manager = AsyncTaskManager(_NoClient(), _NoSender(), store)
    route = Route("2", "u1", "cidABC+/=", "http://x/hook", 123)
    task = manager.create_task("u1", "hello", route, user_name="A", msg_id="m1")
    manager.update_status(task.id, "running")
    manager.complete_task(task.id, "answer", 1.5)
    assert store.wait_written(5)
    again = SQLiteTaskStore(str(tmp_path / "t.db"), read_only=True).get(task.id)
    assert again is not None and again.status == "succeeded" and again.result == "answer"
    assert again.route == route and not again.delivered
    assert store.remember_message("m1", 1.0) and not store.remember_message("m1", 2.0)
    store.close()


def test_cleanup_drops_old_undelivered_tasks_from_memory_not_from_the_store():
    now = [1000.0]
    manager = AsyncTaskManager(_NoClient(), _NoSender(), MemoryTaskStore(), clock=lambda: now[0],
                               memory_retention=60)
    task = manager.create_task("u1", "hi", Route("1", "u1", "c"))
    manager.complete_task(task.id, "ok", 1)  # its delivery gave up: it waits in the store for the next start
    now[0] += 30
    assert manager.cleanup() == 0
    now[0] += 60
    assert manager.cleanup() == 1
    assert task.id not in manager.board.tasks and manager.store.load(undelivered_only=True)[0].id == task.id


# ---------------------------------------------------------------- splitting


def test_short_text_is_not_split():
    assert split_message("hello", 100) == ["hello"]


def test_long_text_is_split_in_order_with_markers_and_nothing_lost():
    text = "\n\n".join(f"段落 {i}: " + "字" * 50 for i in range(100))
    parts = split_message(text, 1000)
    assert len(parts) > 1
    assert all(len(p) <= 1000 for p in parts)
    assert parts[0].startswith(f"(1/{len(parts)})\n") and parts[-1].startswith(f"({len(parts)}/{len(parts)})\n")
    rebuilt = "".join(p.split("\n", 1)[1] for p in parts)
    assert rebuilt == text
    assert all(p.rstrip().endswith("字") for p in parts[:-1])  # cut at paragraph ends


def test_split_by_utf8_bytes_never_cuts_a_character():
    text = "汉" * 10000  # 30,000 bytes, one line
    parts = split_message(text, 15000, utf8_json_cost)
    assert all(utf8_json_cost(p) <= 15000 for p in parts)
    assert "".join(p.split("\n", 1)[1] for p in parts) == text


def test_code_fence_cut_across_parts_is_closed_and_reopened():
    code = "\n".join(f"print({i})" for i in range(300))
    text = "intro\n\n```python\n" + code + "\n```\n\nafter"
    parts = split_message(text, 1000)
    assert len(parts) > 2
    for part in parts:
        body = part.split("\n", 1)[1]
        assert body.count("```") % 2 == 0, part  # every part has balanced fences
    assert parts[1].split("\n", 1)[1].startswith("```python\n")


# ---------------------------------------------------------------- token cache


class _CountingHttp:
    """A JsonHttp stand-in that answers every token request with a new token."""

    def __init__(self):
        self.calls = 0
        self.lock = threading.Lock()

    def post_json(self, url, body, headers=None):
        from dingtalk_sender import HttpReply

        with self.lock:
            self.calls += 1
            number = self.calls
        time.sleep(0.05)
        return HttpReply(200, {"accessToken": f"tok{number}", "expireIn": 7200}, {}, "")


def test_token_is_fetched_once_for_many_threads_and_refreshed_before_expiry():
    now = [0.0]
    session = _CountingHttp()
    provider = AccessTokenProvider(session, "http://x", "k", "s", clock=lambda: now[0], refresh_margin=300)
    results = []
    threads = [threading.Thread(target=lambda: results.append(provider.get())) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.calls == 1 and set(results) == {"tok1"}
    now[0] = 7200 - 301
    assert provider.get() == "tok1"
    now[0] = 7200 - 299
    assert provider.get() == "tok2"
    provider.invalidate("tok2")
    assert provider.get() == "tok3"


# ---------------------------------------------------------------- stream-json


def _run(lines, returncode=0, stderr=""):
    state = StreamState()
    for line in lines:
        parse_stream_line(line if isinstance(line, str) else json.dumps(line), state)
    return result_from_stream(state, returncode, stderr, 1.0)


def test_stream_json_success_needs_a_result_line_without_is_error():
    result = _run([{"type": "system", "subtype": "init", "session_id": "s1"},
                   {"type": "assistant", "message": {"content": [{"type": "tool_use", "name": "Read"}]}},
                   {"type": "result", "subtype": "success", "is_error": False, "result": "done", "session_id": "s1"}])
    assert result.ok and result.text == "done" and result.session_id == "s1" and result.last_step == "工具 Read"


def test_stream_json_failures():
    assert not _run([{"type": "result", "subtype": "error_during_execution", "is_error": True,
                      "errors": ["boom"]}]).ok
    error_line = _run([{"type": "error", "error": "Authentication required"}])
    assert not error_line.ok and "Authentication required" in error_line.error
    missing = _run([{"type": "system", "subtype": "init"}], stderr="network down")
    assert not missing.ok and "network down" in missing.error
    crashed = _run(["not json"], returncode=3, stderr="Traceback")
    assert not crashed.ok and "3" in crashed.error


def test_session_ids_are_random_fit_the_cli_format_and_are_kept_per_conversation():
    import re

    first, second = new_session_id(), new_session_id()
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9\-_:]*", first) and first != second
    manager = _manager()
    session = manager.conversation_session("cidAB+/==1")
    assert manager.conversation_session("cidAB+/==1") == session != manager.conversation_session("cidAB+/==2")
    fresh = manager.new_session("cidAB+/==1")
    assert fresh != session and manager.conversation_session("cidAB+/==1") == fresh


def test_redact_secrets_removes_token_like_text():
    text = redact_secrets("auth failed: sk-FAKESECRET1234567890abcdef; token=abcd1234efgh", ["mysecret"])
    assert "FAKESECRET" not in text and "abcd1234efgh" not in text
    assert redact_secrets("call mysecret now", ["mysecret"]) == "call *** now"


def test_task_elapsed_stops_at_finish():
    task = Task("t", "u", "", "c", Route("1", "u", "c"), "p", created_at=10.0, finished_at=15.0)
    assert task.elapsed(100.0) == 5.0


def test_cli_variables_in_dotenv_are_handed_to_the_cli_and_never_shown(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("CODEBUDDY_API_KEY=ck-live-123456\nCODEBUDDY_MODEL=m1\nOTHER=x\n")
    config = load_config(BASE_ENV, dotenv_path=env_file)
    assert config.cli_env == (("CODEBUDDY_API_KEY", "ck-live-123456"),)  # bot settings are not passed on
    assert "ck-live" not in repr(config)
    from codebuddy_client import CodeBuddyClient

    assert CodeBuddyClient.from_config(config).run_env("/h")["CODEBUDDY_API_KEY"] == "ck-live-123456"


def test_a_stopped_run_leaves_no_process_even_in_another_session(tmp_path):
    """The real CLI's Bash tool starts commands in their own session; after a KILL they must still go."""
    import os
    from pathlib import Path

    from codebuddy_client import CodeBuddyClient
    from tests.conftest import FAKE_CLI, process_alive

    pids = tmp_path / "pids.txt"
    env = {**os.environ, "HOME": str(tmp_path), "CODEBUDDY_FAKE_PIDS": str(pids)}
    client = CodeBuddyClient(str(FAKE_CLI), str(tmp_path / "ws"), timeout=1.0, kill_grace=0.3, env=env)
    result = client.run("[sleep=30] [spawn-session] [ignore-term]", run_tag="t-leftover")
    assert result.timed_out
    child = int(Path(pids).read_text().split()[0])
    deadline = time.monotonic() + 2
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child)


def test_answer_text_grows_with_partial_and_whole_assistant_messages() -> None:
    state = StreamState()
    deltas = ("先", "看看")
    lines = [{"type": "stream_event", "event": {"type": "content_block_delta",
                                                "delta": {"type": "text_delta", "text": text}}} for text in deltas]
    for line in lines:
        parse_stream_line(json.dumps(line), state)
    assert state.answer_text == "先看看"
    parse_stream_line(json.dumps({"type": "assistant", "message": {"content": [
        {"type": "text", "text": "先看看代码。"}, {"type": "tool_use", "name": "Read", "input": {}}]}}), state)
    assert state.answer_text == "先看看代码。"
    parse_stream_line(json.dumps({"type": "assistant", "message": {"content": [{"type": "text", "text": "结论"}]}}),
                      state)
    assert state.answer_text == "先看看代码。\n\n结论"


def test_one_persons_notices_in_a_chat_go_out_in_order_while_nobody_else_is_held_up():
    sent: list[tuple[str, str]] = []
    lock = threading.Lock()
    slow_chat_started = threading.Event()

    class Sender:
        def send(self, route, text, **_):
            if route.user_id == "slow":
                slow_chat_started.set()
                time.sleep(0.02 * (3 - int(text) % 3))  # later notices would finish first if sent at once
            with lock:
                sent.append((route.user_id, text))
            return Delivery(ok=True, path="webhook")

    outbox = Outbox(Sender(), clock=time.time, mark_delivered=lambda t: None, mark_undeliverable=lambda t: None)
    outbox.prestart()
    slow, other = Route("2", "slow", "cidGroup"), Route("2", "other", "cidGroup")  # two people in one group
    futures = [outbox.notice(slow, str(n)) for n in range(12)]
    assert slow_chat_started.wait(5)
    assert outbox.notice(other, "x").result(timeout=5).ok
    with lock:  # the other person's notice did not wait for the slow one's twelve
        assert ("other", "x") in sent and len([s for s in sent if s[0] == "slow"]) < 12
    assert all(f.result(timeout=10).ok for f in futures)
    assert [text for user, text in sent if user == "slow"] == [str(n) for n in range(12)]
    outbox.shutdown()
