"""Questions a running task asks its sender, without a network: who may answer what, several questions in one
reply, and what the chat is shown (tasks/approvals.py)."""

from __future__ import annotations

import threading
import time

from async_task_manager import AsyncTaskManager
from codebuddy.warm_sessions import ASK_QUESTION_TOOL, ToolRequest
from codebuddy_client import RunResult
from dingtalk.route import Route
from dingtalk_sender import Delivery
from store.memory import MemoryTaskStore
from tasks.approvals import Approvals, split_answers, verdict
from tasks.task import FAILED, RUNNING, Task


def _task(user: str = "olga") -> Task:
    return Task(id="t1", user_id=user, user_name="Olga", conversation_key="c", route=Route("2", user, "cidG"),
                prompt="p", status=RUNNING, attempts=1, started_at=1.0)


def test_only_the_sender_or_an_admin_answers_a_tool_request_and_only_the_sender_a_question():
    assert verdict("olga", False, "olga", False, "同意") == "approve"
    assert verdict("olga", False, "olga", False, "/deny 太危险") == "deny"
    assert verdict("olga", False, "boss", True, "批准") == "approve"
    assert verdict("olga", False, "mallory", False, "同意") == "refused"
    assert verdict("olga", False, "mallory", False, "你好") is None  # an ordinary message in the group
    assert verdict("olga", True, "olga", False, "用 PostgreSQL") == "answer"
    assert verdict("olga", True, "olga", False, "拒绝") == "decline"
    assert verdict("olga", True, "olga", False, "/status") is None  # a command while the question waits
    assert verdict("olga", True, "boss", True, "用 MySQL") is None  # an admin does not answer for the sender


def test_a_numbered_reply_answers_several_questions_one_by_one_and_any_other_reply_answers_each():
    questions = ["用哪个数据库？", "要不要加索引？"]
    assert split_answers(questions, "1. PostgreSQL\n2、要，按 user_id\n  和 created_at") == {
        "用哪个数据库？": "PostgreSQL", "要不要加索引？": "要，按 user_id\n和 created_at"}
    assert split_answers(questions, "都听你的") == dict.fromkeys(questions, "都听你的")
    assert split_answers(questions, "1. 只答了一个") == dict.fromkeys(questions, "1. 只答了一个")
    assert split_answers(["只有一个？"], "1. 带编号") == {"只有一个？": "1. 带编号"}  # one question: kept as written


def test_a_reply_to_several_questions_reaches_the_cli_as_one_answer_each():
    approvals = Approvals(lambda task, text: None, timeout=30)
    request = ToolRequest(ASK_QUESTION_TOOL, {"questions": [{"question": "A？"}, {"question": "B？"}]})
    decisions: list = []
    asking = threading.Thread(target=lambda: decisions.append(approvals.ask(_task(), request)))
    asking.start()
    deadline = time.monotonic() + 5
    while approvals.waiting("c") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert approvals.answer("c", "mallory", False, "1. 我来答") is None  # not the sender: an ordinary message
    assert approvals.answer("c", "olga", False, "1. 甲\n2. 乙") == ""
    asking.join(5)
    assert decisions[0].allowed and decisions[0].updated_input["answers"] == {"A？": "甲", "B？": "乙"}
    assert approvals.answer("c", "olga", False, "1. 再答一次") is None  # nothing waits any more


def _wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_question_still_waiting_when_its_run_ends_is_withdrawn_and_denied():
    approvals = Approvals(lambda task, text: None, timeout=300)
    questions = approvals.for_run(_task(), stop=threading.Event())
    decisions: list = []
    asking = threading.Thread(target=lambda: decisions.append(questions(ToolRequest("Bash", {"command": "ls"}))))
    asking.start()
    _wait_for(lambda: approvals.waiting("c") is not None)
    questions.end()  # the run timed out while nobody answered
    asking.join(5)
    assert decisions and not decisions[0].allowed and approvals.waiting("c") is None
    assert approvals.answer("c", "olga", False, "同意") is None  # a late 同意 answers nothing


def test_two_requests_at_once_are_asked_one_after_the_other_each_answered_by_its_own_reply_or_click():
    sent: list[str] = []
    approvals = Approvals(lambda task, text: sent.append(text), timeout=30)
    outcomes: list = []
    shown: list = []
    questions = approvals.for_run(_task(), stop=threading.Event(), shown=shown.append,
                                  settled=lambda request, decision: outcomes.append((request.input["command"],
                                                                                     decision.allowed)))
    decisions: dict = {}

    def ask(command: str) -> None:
        decisions[command] = questions(ToolRequest("Bash", {"command": command}))

    first = threading.Thread(target=ask, args=("echo one",))
    first.start()
    _wait_for(lambda: len(sent) == 1)
    second = threading.Thread(target=ask, args=("echo two",))
    second.start()
    time.sleep(0.3)
    assert len(sent) == 1 and "echo one" in sent[0]  # the second waits its turn, unseen
    assert approvals.click("t1-2", "olga", False, True) == "ignored"  # the second's buttons: not shown yet
    assert approvals.answer("c", "olga", False, "同意") == "已同意，任务 t1 继续执行。"
    _wait_for(lambda: len(sent) == 2)
    assert "echo two" in sent[1] and decisions == {"echo one": decisions["echo one"]}
    assert approvals.click(shown[0].id, "olga", False, False) == "ignored"  # the first is settled: its button is stale
    assert approvals.click(shown[1].id, "olga", False, False) == "denied"
    first.join(5)
    second.join(5)
    assert decisions["echo one"].allowed and not decisions["echo two"].allowed
    assert outcomes == [("echo one", True), ("echo two", False)]  # the card hid the first before showing the second
    assert approvals.waiting("c") is None


def test_a_run_asks_at_most_max_waits_questions_and_the_next_request_is_denied_and_ends_the_run():
    sent: list[str] = []
    now = [100.0]
    approvals = Approvals(lambda task, text: sent.append(text), timeout=30, max_waits=2, clock=lambda: now[0])
    ended: list[str] = []
    questions = approvals.for_run(_task(), stop=threading.Event(), end_run=ended.append)
    for number in (1, 2):
        asking = threading.Thread(target=questions, args=(ToolRequest("Bash", {"command": f"echo {number}"}),))
        asking.start()
        _wait_for(lambda: approvals.waiting("c") is not None)
        now[0] += 2  # read before answered
        assert approvals.answer("c", "olga", False, "同意").startswith("已同意")
        asking.join(5)
    third = questions(ToolRequest("Bash", {"command": "echo 3"}))
    assert not third.allowed and "APPROVAL_MAX_WAITS" in third.reason
    assert len(sent) == 2 and approvals.waiting("c") is None  # the third was never asked
    assert len(ended) == 1 and ended[0].startswith("确认次数已达上限") and "最多 2 次" in ended[0]
    assert "Bash" in ended[0]
    assert not questions(ToolRequest("Bash", {"command": "echo 4"})).allowed and len(ended) == 1  # ended once


class _Sender:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def send(self, route, text, **kwargs):
        self.sent.append(text)
        return Delivery(ok=True, path="batchSend")


class _AskingClient:
    """A CLI client whose run asks for each command in turn, going on after a denial (as the CLI does) until the
    run's cancel event stops it."""

    def __init__(self, commands: list[str]) -> None:
        self.commands = commands

    def run(self, prompt, *, cancel_event=None, ask=None, **kwargs):
        for command in self.commands:
            if cancel_event.is_set():
                return RunResult(ok=False, cancelled=True, error="任务已取消")
            ask(ToolRequest("Bash", {"command": command}))
        return RunResult(ok=True, text="都做完了")

    def cancel(self, run_tag):
        return True

    def kill_leftovers(self, run_tag):
        return 0

    def close(self):
        pass


def test_a_task_asking_past_approval_max_waits_fails_with_the_reason_in_the_chat():
    sender = _Sender()
    manager = AsyncTaskManager(_AskingClient(["echo 1", "echo 2", "echo 3"]), sender, MemoryTaskStore(), tick=0.02,
                               approval_max_waits=1)
    manager.start()
    try:
        task = manager.submit("做三件事", Route("1", "olga", ""), user_id="olga", conversation_key="c")
        _wait_for(lambda: manager.workers.approvals.waiting("c") is not None)
        assert manager.workers.approvals.answer("c", "olga", False, "同意")
        _wait_for(lambda: task.finished and task.delivered)
        assert task.status == FAILED and task.error.startswith("确认次数已达上限")
        failure = [text for text in sender.sent if "确认次数已达上限" in text]
        assert failure and failure[0].startswith("CodeBuddy 执行失败: 确认次数已达上限")
        assert sum("echo" in text for text in sender.sent) == 1  # one question asked; echo 2 never reached the chat
    finally:
        manager.shutdown(0.5)


def test_a_reply_sent_before_the_next_question_arrived_is_not_taken_for_it():
    sent: list[str] = []
    now = [100.0]
    approvals = Approvals(lambda task, text: sent.append(text), timeout=30, clock=lambda: now[0])
    questions = approvals.for_run(_task(), stop=threading.Event())
    decisions: list = []
    asking = threading.Thread(target=lambda: decisions.extend(  # one after the other, as the CLI's requests come
        questions(ToolRequest("Bash", {"command": command})) for command in ("echo one", "rm -rf data")))
    asking.start()
    _wait_for(lambda: len(sent) == 1)
    now[0] += 3
    assert approvals.answer("c", "olga", False, "同意") == "已同意，任务 t1 继续执行。"
    _wait_for(lambda: len(sent) == 2)
    double_tap = approvals.answer("c", "olga", False, "同意")  # the same 同意 sent twice
    assert double_tap.startswith("这条回复发出时下一个确认请求还没送到")
    assert approvals.waiting("c") is not None and len(decisions) == 1  # rm -rf data still waits
    now[0] += 3  # read, then answered
    assert approvals.answer("c", "olga", False, "拒绝") == "已拒绝，任务 t1 继续执行。"
    asking.join(5)
    assert [d.allowed for d in decisions] == [True, False]
    repeated = approvals.answer("c", "olga", False, "拒绝")  # once more at once: not a prompt either
    assert repeated.startswith("这个确认请求刚刚已经回答过了")
    now[0] += 11  # past REPEAT_GRACE
    assert approvals.answer("c", "olga", False, "同意") is None  # later, with nothing asked: an ordinary message
