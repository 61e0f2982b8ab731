"""The task manager (async_task_manager.py): which prompts run in the background, a task's life persisted and cleaned
up, and one CLI session per conversation."""

from __future__ import annotations

import re
import time

import pytest

from async_task_manager import AsyncTaskManager
from codebuddy_client import new_session_id
from config import SEED_LONG_TASK_KEYWORDS
from dingtalk.route import Route
from store.journal import open_store
from store.memory import MemoryTaskStore
from store.sqlite import SQLiteTaskStore
from tasks.task import Task


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


def test_task_elapsed_stops_at_finish():
    task = Task("t", "u", "", "c", Route("1", "u", "c"), "p", created_at=10.0, finished_at=15.0)
    assert task.elapsed(100.0) == 5.0


def test_session_ids_are_random_fit_the_cli_format_and_are_kept_per_conversation():

    first, second = new_session_id(), new_session_id()
    assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9\-_:]*", first) and first != second
    manager = _manager()
    session = manager.conversation_session("cidAB+/==1")
    assert manager.conversation_session("cidAB+/==1") == session != manager.conversation_session("cidAB+/==2")
    fresh = manager.new_session("cidAB+/==1")
    assert fresh != session and manager.conversation_session("cidAB+/==1") == fresh
