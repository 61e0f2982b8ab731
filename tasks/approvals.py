"""Questions a running task asks the person who sent it — may CodeBuddy use this tool? what does the agent want
to know? — asked in the task's chat and answered there by that person (or an admin), or denied after
APPROVAL_TIMEOUT.

Questions of one conversation are asked one at a time, in the order they came: the next is shown once the one before
it is settled, so each reply or card click answers the question it was shown with. Who may answer is checked here,
against the task's sender, never against what the answering message claims; a refusal to anyone else is told only
as the chat's rate limit allows (`refusal_gate`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from codebuddy.warm_sessions import Decision, ToolRequest
from common.logs import task_log
from tasks import texts
from tasks.request_view import SHOWN_PAGES, detail_page, question_messages, request_detail, wants_page
from tasks.task import Task

log = logging.getLogger("async_task_manager")

APPROVE_WORDS = ("同意", "/approve", "批准", "允许")
DENY_WORDS = ("拒绝", "/deny", "不同意", "不允许")
# Seconds after a question that follows another of its conversation at once (several requests in a row) during which a
# reply is not taken for it: it was sent before the question arrived (a 同意 sent twice must not approve the next one).
FOLLOW_UP_GRACE = 1.0
# A bare 同意/拒绝 this soon after this conversation's question was settled, with none waiting, is a repeat of that
# answer (a double tap, or the same word typed twice), never a prompt: longer than FOLLOW_UP_GRACE because a loaded
# host may take seconds between two messages sent together.
REPEAT_GRACE = 10.0
EARLY_REPLY = "这条回复发出时下一个确认请求还没送到，未作为回答：请看完上面的新请求再回复。"
REPEATED_REPLY = "这个确认请求刚刚已经回答过了，这条回复未作处理。"
_REFUSAL = re.compile(r"只有发起任务 \S+ 的人或管理员可以确认这个操作。")  # reply_for("refused", …)
_NUMBERED = re.compile(r"^\s*(\d+)\s*[.、)）:：]\s*(.*)$")  # "1. …", "2、…", "3) …" in an answer to several questions


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


def is_refusal(reply: str) -> bool:
    """Whether `reply` is `reply_for`'s refusal (another host's `SharedQuestions.answer` gives only the text)."""
    return _REFUSAL.fullmatch(reply) is not None


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
    shown_at: float = 0.0
    follows: bool = False  # shown right as the one before it in its conversation was settled (FOLLOW_UP_GRACE)
    pages: list[str] = field(default_factory=list)  # the whole request as the chat reads it (request_view)


class Answer(NamedTuple):
    """What a chat message did to a waiting question: `verdict`'s kind, "detail" (a page of a long request was asked
    for), "early" (sent before the question arrived, or again after it was answered: not taken) or "relayed" (another
    host's question); and the reply to show ("" for none)."""

    kind: str
    reply: str


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
        # when each conversation's last question was settled, lately, and whose task it was
        self._settled_at: dict[str, tuple[float, str]] = {}
        self.asked = 0
        self.timed_out = 0
        # Several hosts (issue 16): the questions shared with them, so an answer reaching another host gets here
        # (cluster_questions.SharedQuestions; None on one host).
        self.remote: Any = None
        # Whether someone who may not answer (their 同意/拒绝, a message or a card button) may be told so now: the
        # chat's rate limit, set by chat.app.ChatApp (it counts the press first, and allows one line per window).
        self.refusal_gate: Callable[[str], bool] = lambda user_id: True

    def for_run(self, task: Task, *, stop: threading.Event, end_run: Callable[[str], None] = lambda reason: None,
                deadline: float | None = None, shown: Callable[[Pending], None] | None = None,
                settled: Settled | None = None) -> RunQuestions:
        """The `ask` of one run of `task`: at most `max_waits` questions (the next ends the run through `end_run`),
        ending with the run (`RunQuestions.end`) or `stop` (a cancel); `deadline` (on `clock`) is when the run's
        TASK_TIMEOUT passes, which a question names when it comes before APPROVAL_TIMEOUT."""
        return RunQuestions(self, task, stop=stop, end_run=end_run, deadline=deadline, shown=shown, settled=settled)

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
                  shown: Callable[[Pending], None] | None = None, settled: Settled | None = None,
                  deadline: float | None = None) -> Decision:
        """`ask`, until `stopped()` says the run was cancelled or has ended (`deadline`: see `for_run`)."""
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
            remaining = deadline - self.clock() if deadline is not None else None
            messages, pending.pages = question_messages(task, request, self.timeout, remaining)
            for message in messages:  # the whole request: one message, or a few pages of a long one
                self.send_question(task, message)
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
                if pending.answered.is_set():  # by its sender (not withdrawn, not timed out)
                    self._note_settled(task)
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
            pending.shown, pending.shown_at = True, self.clock()
            settled = self._settled_at.pop(pending.task.conversation_key, None)
            # Only the same task's next question: a new task's question came after a prompt sent after the answer.
            pending.follows = (settled is not None and settled[1] == pending.task.id
                               and pending.shown_at - settled[0] < FOLLOW_UP_GRACE)
            return True

    def _note_settled(self, task: Task) -> None:
        """(Under the lock.) A question of `task` was settled now; older notes are dropped."""
        now = self.clock()
        for key, (at, _task_id) in list(self._settled_at.items()):
            if now - at >= REPEAT_GRACE:
                del self._settled_at[key]
        self._settled_at[task.conversation_key] = (now, task.id)

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
        """(Under the lock.) The question being asked in this conversation, if any (one answered a moment ago, its
        waiter not yet awake, is not: a second 同意 right after the first is then a repeat, not an answer to it)."""
        queue = self._queues.get(conversation_key)
        return queue[0] if queue and queue[0].shown and not queue[0].answered.is_set() else None

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
        """`respond`'s reply to show ("" for none); None when the message is not an answer."""
        answered = self.respond(conversation_key, user_id, is_admin, text)
        return answered.reply if answered is not None else None

    def respond(self, conversation_key: str, user_id: str, is_admin: bool, text: str) -> Answer | None:
        """If `text` answers the question asked in this conversation (or asks for a page of it): take it and say what
        it did; None when the message is not an answer (it is handled as usual). A question another host's task
        waits on is answered there (`remote`)."""
        with self._lock:
            pending = self._asking(conversation_key)
            just_settled = self.clock() - self._settled_at.get(conversation_key, (float("-inf"), ""))[0] < REPEAT_GRACE
        words = text.split()
        if pending is None and just_settled and words and words[0].lower() in APPROVE_WORDS + DENY_WORDS:
            return Answer("early", REPEATED_REPLY)  # the same 同意 twice: neither the next question's nor a prompt
        if pending is None:
            reply = self.remote.answer(conversation_key, user_id, is_admin, text) if self.remote is not None else None
            if reply is not None and is_refusal(reply):
                return Answer("refused", reply if self.refusal_gate(user_id) else "")
            return Answer("relayed", reply) if reply is not None else None
        return self._answer(pending, user_id, is_admin, text)

    def answer_relayed(self, question_id: str, user_id: str, is_admin: bool, text: str) -> None:
        """An answer another host received for a question asked here: checked here again, as if it came here."""
        pending = self._by_id(question_id)
        if pending is not None and not wants_page(text):
            self._answer(pending, user_id, is_admin, text, relayed=True)

    def _by_id(self, question_id: str) -> Pending | None:
        with self._lock:
            return next((p for queue in self._queues.values() for p in queue if p.id == question_id and p.shown), None)

    def _answer(self, pending: Pending, user_id: str, is_admin: bool, text: str,
                relayed: bool = False) -> Answer | None:
        if pending.answered.is_set():
            return None
        if len(pending.pages) > SHOWN_PAGES and wants_page(text):  # anyone in the chat saw the first pages too
            return Answer("detail", detail_page(pending.pages, text))
        kind = verdict(pending.task.user_id, pending.request.is_question, user_id, is_admin, text)
        if kind is None:
            return None
        if kind == "refused":  # the host that received it told the sender already, if the chat's limit allowed
            if relayed:
                log.warning("拒绝非发起人的确认: 任务 %s user=%s (另一主机收到)", pending.task.id, user_id)
                return Answer(kind, "")
            return Answer(kind, self._refusal(pending.task.id, user_id))
        if pending.follows and self.clock() - pending.shown_at < FOLLOW_UP_GRACE:
            task_log(log, pending.task).info("任务 %s 的回复早于新的确认请求送达，未作为回答 (user=%s)",
                                             pending.task.id, user_id)
            return Answer("early", EARLY_REPLY)
        if kind == "answer":
            answers = split_answers([str(q.get("question")) for q in pending.request.questions], text)
            decision = Decision(True, updated_input={**pending.request.input, "answers": answers})
        else:
            decision = Decision(kind == "approve", "" if kind == "approve" else
                                "the user declined to answer" if kind == "decline" else "the user denied this tool use")
        if not self._settle(pending, decision, user_id):
            return None  # answered a moment ago (a button click): this message is an ordinary one
        return Answer(kind, reply_for(kind, pending.task.id))

    def click(self, question_id: str, user_id: str, is_admin: bool, approve: bool) -> str:
        """An AI card's approve or deny button for the tool request `question_id`: "approved", "denied",
        "refused" (not the sender nor an admin) or "ignored" (that question is not waiting any more)."""
        pending = self._by_id(question_id)
        if pending is None or not question_id or pending.request.is_question or pending.answered.is_set():
            return "ignored"
        if user_id != pending.task.user_id and not is_admin:
            refusal = self._refusal(pending.task.id, user_id, card=True)
            if refusal:
                self.send_question(pending.task, refusal)
            return "refused"
        decision = Decision(True) if approve else Decision(False, "the user denied this tool use")
        if not self._settle(pending, decision, user_id):
            return "ignored"
        return "approved" if approve else "denied"

    def _refusal(self, task_id: str, user_id: str, card: bool = False) -> str:
        """The line telling someone who may not answer (a message or, `card`, a button) so; "" when the chat's rate
        limit says not now (`refusal_gate`: over their limit, or told already in this window)."""
        if not self.refusal_gate(user_id):
            log.debug("非发起人的确认未回复 (频率限制): 任务 %s user=%s", task_id, user_id)
            return ""
        log.warning("拒绝非发起人的%s确认: 任务 %s user=%s", "卡片" if card else "", task_id, user_id)
        return reply_for("refused", task_id)

    def _settle(self, pending: Pending, decision: Decision, user_id: str) -> bool:
        """Give the waiting question its answer, once (a message and a click can race): False if it had one."""
        with self._lock:
            if pending.answered.is_set():
                return False
            pending.decision = decision
            pending.answered.set()
            self._note_settled(pending.task)  # now, not when its waiter wakes: a repeat is caught
        verb = "同意" if decision.allowed else "拒绝"
        task_log(log, pending.task).info("任务 %s 的确认请求已被%s (user=%s)", pending.task.id, verb, user_id)
        return True


class RunQuestions:
    """One run's questions to its sender: the CLI client's `ask` for that run. At most `approvals.max_waits` are asked:
    the first request past them is denied and ends the run (`end_run(reason)`, the reason for the chat), as do those
    after it. A question still waiting when the run ends (its TASK_TIMEOUT passed while nobody answered, say) or is
    cancelled is withdrawn and denied."""

    def __init__(self, approvals: Approvals, task: Task, *, stop: threading.Event,
                 end_run: Callable[[str], None] = lambda reason: None, deadline: float | None = None,
                 shown: Callable[[Pending], None] | None = None, settled: Settled | None = None) -> None:
        self.approvals = approvals
        self.task = task
        self.stop = stop
        self.end_run = end_run
        self.deadline = deadline
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
            return self.approvals.ask_until(self.task, request, self.stopped, self.shown, self.settled, self.deadline)
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
