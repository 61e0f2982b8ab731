"""Questions a running task asks the person who sent it — may CodeBuddy use this tool? what does the agent want
to know? — asked in the task's chat and answered there by that person (or an admin), or denied after
APPROVAL_TIMEOUT.

Questions of one conversation are asked one at a time, in the order they came: the next is shown once the one before
it is settled, so each reply or card click answers the question it was shown with. Who may answer is checked here,
against the task's sender, never against what the answering message claims.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from codebuddy.warm_sessions import Decision, ToolRequest
from common.logs import task_log
from tasks import texts
from tasks.task import Task

log = logging.getLogger("async_task_manager")

APPROVE_WORDS = ("同意", "/approve", "批准", "允许")
DENY_WORDS = ("拒绝", "/deny", "不同意", "不允许")
DETAIL_CHARS = 300  # of a command, path or question shown in the chat
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.、)）:：]\s*(.*)$")  # "1. …", "2、…", "3) …" in an answer to several questions
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#|~<>])")  # what makes emphasis, code, links, headings, HTML


def escape_markdown(text: str) -> str:
    """`text` shown literally in DingTalk markdown (no links, emphasis, headings or HTML from the agent)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def shorten(text: str, limit: int = DETAIL_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def request_detail(request: ToolRequest) -> str:
    """What the tool wants to do, in one short line: the command, the file, or its input."""
    data = request.input
    for key in ("command", "file_path", "path", "url", "pattern", "query", "prompt"):
        if isinstance(data.get(key), str) and data[key].strip():
            return shorten(data[key])
    return shorten(", ".join(f"{k}={v}" for k, v in data.items() if k != "description")) or "(无参数)"


def question_text(task: Task, request: ToolRequest, timeout: float) -> str:
    """The markdown message that asks the task's sender."""
    who = f"@{escape_markdown(task.user_name)} " if task.user_name else ""
    minutes = f"{timeout / 60:.0f} 分钟" if timeout >= 120 else f"{timeout:.0f} 秒"
    if request.is_question:
        lines = [f"**CodeBuddy 有问题问你** (任务 {task.id})", ""]
        for number, question in enumerate(request.questions or [{"question": "?"}], 1):
            options = [str(o.get("label")) for o in question.get("options") or [] if isinstance(o, dict)]
            line = f"{number}. {escape_markdown(shorten(str(question.get('question'))))}"
            if options:
                line += " (" + " / ".join(escape_markdown(shorten(o, 60)) for o in options) + ")"
            lines.append(line)
        several = "，多个问题请按编号逐行回答 (「1. …」换行「2. …」)" if len(request.questions) > 1 else ""
        lines += ["", f"{who}请直接回复你的答案{several} (回复「拒绝」则不回答)，{minutes}内未回复视为不回答。"]
        return "\n".join(lines)
    return "\n".join([
        f"**CodeBuddy 请求使用工具 {escape_markdown(request.tool_name)}** (任务 {task.id})", "",
        f"> {escape_markdown(request_detail(request))}", "",
        f"{who}回复「同意」允许，回复「拒绝」拒绝 (也可用 /approve、/deny)。{minutes}内未回复视为拒绝。",
    ])


def card_question(request: ToolRequest) -> str:
    """The line a task's AI card shows while the request waits (its buttons answer a tool request)."""
    if request.is_question:
        return "⏸ **CodeBuddy 在等你的回答** (见聊天消息，直接回复即可)"
    return (f"⏸ **等待确认: 工具 {escape_markdown(request.tool_name)}** — "
            f"{escape_markdown(shorten(request_detail(request), 120))}\n\n点「同意」或「拒绝」，或在聊天中回复")


def card_outcome(request: ToolRequest, decision: Decision | None) -> str:
    """The step a task's AI card keeps once the request was answered, refused or timed out."""
    allowed = decision is not None and decision.allowed
    if request.is_question:
        return f"问题: {'已回答' if allowed else '未回答'}"
    return f"工具 {escape_markdown(request.tool_name)}: {'已同意' if allowed else '已拒绝'}"


def verdict(owner: str, is_question: bool, user_id: str, is_admin: bool, text: str) -> str | None:
    """What `text` from `user_id` says to a waiting request of `owner`'s task: "approve", "deny", "answer",
    "decline" or "refused" (not the owner nor an admin); None when it is no answer (an ordinary message)."""
    words = text.split()
    first = words[0].lower() if words else ""
    if is_question:
        if user_id != owner:
            return None  # someone else's message in the group: an ordinary prompt
        if first in DENY_WORDS:
            return "decline"
        return None if text.startswith("/") else "answer"  # a command (/status, /cancel) while it waits
    if first not in APPROVE_WORDS and first not in DENY_WORDS:
        return None
    if user_id != owner and not is_admin:
        return "refused"
    return "approve" if first in APPROVE_WORDS else "deny"


def split_answers(questions: list[str], text: str) -> dict[str, str]:
    """Each question's answer: to several questions, a reply numbered line by line ("1. …", "2、…"; a line without a
    number continues the answer above it) answers them one by one; any other reply answers each of them."""
    numbered: dict[int, list[str]] = {}
    current = None
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match and 1 <= int(match.group(1)) <= len(questions) and int(match.group(1)) not in numbered:
            current = int(match.group(1))
            numbered[current] = [match.group(2).strip()]
        elif current is not None:
            numbered[current].append(line.strip())
    if len(questions) > 1 and sorted(numbered) == list(range(1, len(questions) + 1)):
        return {q: "\n".join(numbered[n]).strip() for n, q in enumerate(questions, 1)}
    return dict.fromkeys(questions, text)


def reply_for(kind: str, task_id: str) -> str:
    """The chat reply to an answer of `verdict`'s kind ("" for none)."""
    return {"refused": f"只有发起任务 {task_id} 的人或管理员可以确认这个操作。", "answer": "",
            "decline": "好的，不回答这个问题。", "approve": f"已同意，任务 {task_id} 继续执行。",
            "deny": f"已拒绝，任务 {task_id} 继续执行。"}[kind]


APPROVALS_OFF = Decision(False, "tool approvals are off for this bot (APPROVALS=off); the permission mode does not "
                               "allow this tool")


@dataclass
class Pending:
    """One question: waiting its turn, then asked in the chat (`shown`) until it has its answer."""

    task: Task
    request: ToolRequest
    id: str = ""  # "<task id>-<n>": what an AI card's approve/deny buttons answer (cards/actions.py)
    answered: threading.Event = field(default_factory=threading.Event)
    decision: Decision | None = None
    shown: bool = False  # asked in the chat; the questions behind it in its conversation wait their turn


Settled = Callable[[ToolRequest, "Decision | None"], None]  # a question's outcome, told before the next is shown


class Approvals:
    """The questions of running tasks, by conversation: asked one at a time in the order they came, each answered by
    its own reply or card click."""

    def __init__(self, send_question: Callable[[Task, str], None], *, timeout: float, enabled: bool = True,
                 max_waits: int = 3, clock: Callable[[], float] = time.monotonic) -> None:
        self.send_question = send_question
        self.timeout = timeout
        self.enabled = enabled
        self.max_waits = max_waits  # questions one run may ask (RunQuestions)
        self.clock = clock
        self._lock = threading.Lock()
        self._turns = threading.Condition(self._lock)  # a conversation's question settled: the next one may go
        self._queues: dict[str, list[Pending]] = {}  # by conversation key, the one asked first
        self.asked = 0
        self.timed_out = 0
        # Several hosts (issue 16): the questions shared with them, so an answer reaching another host gets here
        # (cluster_questions.SharedQuestions; None on one host).
        self.remote: Any = None

    def for_run(self, task: Task, *, stop: threading.Event, end_run: Callable[[str], None] = lambda reason: None,
                shown: Callable[[Pending], None] | None = None, settled: Settled | None = None) -> RunQuestions:
        """The `ask` of one run of `task`: at most `max_waits` questions (the next ends the run through `end_run`),
        ending with the run (`RunQuestions.end`) or `stop` (a cancel)."""
        return RunQuestions(self, task, stop=stop, end_run=end_run, shown=shown, settled=settled)

    def ask(self, task: Task, request: ToolRequest, stop: threading.Event | None = None,
            shown: Callable[[Pending], None] | None = None, settled: Settled | None = None) -> Decision:
        """Ask the task's sender once the questions before it in the conversation are settled, and wait for the
        answer, `timeout` s, or `stop` (a cancel): deny on either. `shown(pending)` runs once the question is asked
        (the task's AI card shows it, with buttons), `settled(request, decision)` once it is answered, before the
        next question of the conversation is shown."""
        if not self.enabled:
            return APPROVALS_OFF
        return self.ask_until(task, request, lambda: stop is not None and stop.is_set(), shown, settled)

    def ask_until(self, task: Task, request: ToolRequest, stopped: Callable[[], bool],
                  shown: Callable[[Pending], None] | None = None, settled: Settled | None = None) -> Decision:
        """`ask`, until `stopped()` says the run was cancelled or has ended."""
        with self._lock:
            self.asked += 1
            pending = Pending(task, request, id=f"{task.id}-{self.asked}")
            queue = self._queues.setdefault(task.conversation_key, [])
            queue.append(pending)
        tlog = task_log(log, task)
        decision: Decision | None = None
        try:
            if not self._wait_turn(pending, queue, stopped):
                tlog.info("任务 %s 已结束或被取消，撤回确认请求", task.id)
                decision = Decision(False, "the task was cancelled or has ended")
                return decision
            tlog.info("任务 %s 等待用户确认: %s %s", task.id, request.tool_name, request_detail(request))
            if self.remote is not None:
                self.remote.asked(pending)
            self.send_question(task, question_text(task, request, self.timeout))
            if shown is not None:
                shown(pending)
            decision = self._wait_answer(pending, stopped)
            return decision
        finally:
            if pending.shown:
                if settled is not None:
                    settled(request, decision)
                if self.remote is not None:
                    self.remote.settled(pending)
            with self._lock:
                queue.remove(pending)
                if not queue and self._queues.get(task.conversation_key) is queue:
                    del self._queues[task.conversation_key]
                self._turns.notify_all()

    def _wait_turn(self, pending: Pending, queue: list[Pending], stopped: Callable[[], bool]) -> bool:
        """Wait until `pending` is the first of its conversation's questions and mark it shown; False if `stopped()`
        first."""
        with self._lock:
            while queue[0] is not pending:
                if stopped():
                    return False
                self._turns.wait(0.1)
            if stopped():
                return False
            pending.shown = True
            return True

    def _wait_answer(self, pending: Pending, stopped: Callable[[], bool]) -> Decision:
        """The answer to the question being asked; a denial after `timeout` s or once `stopped()`."""
        tlog = task_log(log, pending.task)
        deadline = self.clock() + self.timeout
        while not pending.answered.wait(0.1):
            if stopped():
                tlog.info("任务 %s 已结束或被取消，撤回确认请求", pending.task.id)
                return Decision(False, "the task was cancelled or has ended")
            if self.clock() >= deadline:
                with self._lock:
                    self.timed_out += 1
                tlog.info("任务 %s 的确认请求超时，按拒绝处理", pending.task.id)
                return Decision(False, f"the user did not answer within {self.timeout:.0f} seconds; "
                                       "do not retry this tool")
        assert pending.decision is not None
        return pending.decision

    def _asking(self, conversation_key: str) -> Pending | None:
        """(Under the lock.) The question being asked in this conversation, if any."""
        queue = self._queues.get(conversation_key)
        return queue[0] if queue and queue[0].shown else None

    def waiting(self, conversation_key: str) -> Task | None:
        """The task waiting for an answer in this conversation, if any."""
        with self._lock:
            pending = self._asking(conversation_key)
        return pending.task if pending is not None else None

    def is_waiting(self, task: Task) -> bool:
        """Whether `task` waits for its sender's answer, here or (`remote`) on the host running it."""
        if getattr(self.waiting(task.conversation_key), "id", None) == task.id:
            return True
        return self.remote is not None and self.remote.waits(task.id)

    def answer(self, conversation_key: str, user_id: str, is_admin: bool, text: str) -> str | None:
        """If `text` answers the question waiting in this conversation: take it and return the reply to show
        ("" for none); None when the message is not an answer (it is handled as usual). A question another host's
        task waits on is answered there (`remote`)."""
        with self._lock:
            pending = self._asking(conversation_key)
        if pending is None:
            return self.remote.answer(conversation_key, user_id, is_admin, text) if self.remote is not None else None
        return self._answer(pending, user_id, is_admin, text)

    def answer_relayed(self, question_id: str, user_id: str, is_admin: bool, text: str) -> None:
        """An answer another host received for a question asked here: checked here again, as if it came here."""
        pending = self._by_id(question_id)
        if pending is not None:
            self._answer(pending, user_id, is_admin, text)

    def _by_id(self, question_id: str) -> Pending | None:
        with self._lock:
            return next((p for queue in self._queues.values() for p in queue if p.id == question_id and p.shown), None)

    def _answer(self, pending: Pending, user_id: str, is_admin: bool, text: str) -> str | None:
        if pending.answered.is_set():
            return None
        kind = verdict(pending.task.user_id, pending.request.is_question, user_id, is_admin, text)
        if kind is None:
            return None
        if kind == "refused":
            log.warning("拒绝非发起人的确认: 任务 %s user=%s", pending.task.id, user_id)
            return reply_for(kind, pending.task.id)
        if kind == "answer":
            answers = split_answers([str(q.get("question")) for q in pending.request.questions], text)
            decision = Decision(True, updated_input={**pending.request.input, "answers": answers})
        else:
            decision = Decision(kind == "approve", "" if kind == "approve" else
                                "the user declined to answer" if kind == "decline" else "the user denied this tool use")
        if not self._settle(pending, decision, user_id):
            return None  # answered a moment ago (a button click): this message is an ordinary one
        return reply_for(kind, pending.task.id)

    def click(self, question_id: str, user_id: str, is_admin: bool, approve: bool) -> str:
        """An AI card's approve or deny button for the tool request `question_id`: "approved", "denied",
        "refused" (not the sender nor an admin) or "ignored" (that question is not waiting any more)."""
        pending = self._by_id(question_id)
        if pending is None or not question_id or pending.request.is_question or pending.answered.is_set():
            return "ignored"
        if user_id != pending.task.user_id and not is_admin:
            log.warning("拒绝非发起人的卡片确认: 任务 %s user=%s", pending.task.id, user_id)
            return "refused"
        decision = Decision(True) if approve else Decision(False, "the user denied this tool use")
        if not self._settle(pending, decision, user_id):
            return "ignored"
        return "approved" if approve else "denied"

    def _settle(self, pending: Pending, decision: Decision, user_id: str) -> bool:
        """Give the waiting question its answer, once (a message and a click can race): False if it had one."""
        with self._lock:
            if pending.answered.is_set():
                return False
            pending.decision = decision
            pending.answered.set()
        verb = "同意" if decision.allowed else "拒绝"
        task_log(log, pending.task).info("任务 %s 的确认请求已被%s (user=%s)", pending.task.id, verb, user_id)
        return True


class RunQuestions:
    """One run's questions to its sender: the CLI client's `ask` for that run. At most `approvals.max_waits` are asked:
    the first request past them is denied and ends the run (`end_run(reason)`, the reason for the chat), as do those
    after it. A question still waiting when the run ends (its TASK_TIMEOUT passed while nobody answered, say) or is
    cancelled is withdrawn and denied."""

    def __init__(self, approvals: Approvals, task: Task, *, stop: threading.Event,
                 end_run: Callable[[str], None] = lambda reason: None, shown: Callable[[Pending], None] | None = None,
                 settled: Settled | None = None) -> None:
        self.approvals = approvals
        self.task = task
        self.stop = stop
        self.end_run = end_run
        self.shown = shown
        self.settled = settled
        self.asked = 0
        self.over = ""  # why the run was ended, once it asked past max_waits
        self._lock = threading.Lock()
        self._ended = threading.Event()

    def __call__(self, request: ToolRequest) -> Decision:
        if not self.approvals.enabled:
            return self._settle(request, APPROVALS_OFF)
        limit = self.approvals.max_waits
        with self._lock:
            self.asked += 1
            count = self.asked
            first_over = count == limit + 1
            if first_over:
                self.over = texts.too_many_questions(limit, request.tool_name, request.is_question)
        if count <= limit:
            return self.approvals.ask_until(self.task, request, self.stopped, self.shown, self.settled)
        if first_over:
            task_log(log, self.task).warning("任务 %s 的确认请求超过上限 (%d 次)，已拒绝并结束任务: %s",
                                             self.task.id, limit, request.tool_name)
            self.end_run(self.over)
        return self._settle(request, Decision(
            False, f"this task has already asked its user {limit} times (APPROVAL_MAX_WAITS); no further request is "
                   "allowed and the task is being stopped"))

    def _settle(self, request: ToolRequest, decision: Decision) -> Decision:
        """A request decided without asking anyone: its outcome is told as an asked one's is."""
        if self.settled is not None:
            self.settled(request, decision)
        return decision

    def stopped(self) -> bool:
        return self.stop.is_set() or self._ended.is_set()

    def end(self) -> None:
        """The run is over: nothing more is asked, and a question still waiting is withdrawn."""
        self._ended.set()
