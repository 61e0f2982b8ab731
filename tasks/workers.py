"""The worker threads: each takes the next task the queue allows, runs it through the CLI and records how it ended."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

from codebuddy.warm_sessions import Decision, ToolRequest
from codebuddy_client import RunResult
from common.logs import task_log
from common.redaction import redact_secrets
from common.supervision import Supervisor
from tasks.approvals import Approvals, RunQuestions
from tasks.board import Running, TaskBoard
from tasks.delivery import Outbox
from tasks.request_view import card_outcome, card_question
from tasks.seams import Client
from tasks.task import CANCELLED, QUEUED, TIMED_OUT, Task

log = logging.getLogger("async_task_manager")


class Workers:
    """`max_workers` threads running tasks one at a time each; results go to the outbox."""

    def __init__(self, board: TaskBoard, client: Client, outbox: Outbox, *, task_timeout: float,
                 session_for: Callable[[str], str], supervisor: Supervisor,
                 secrets: Iterable[str] = (), approval_timeout: float = 300.0, approvals: bool = True,
                 approval_max_waits: int = 3) -> None:
        self.board = board
        self.client = client
        self.outbox = outbox
        self.task_timeout = task_timeout
        self.session_for = session_for  # the CodeBuddy session id of a conversation
        self._secrets = tuple(secrets)
        self.supervisor = supervisor
        self.on_run: Callable[[Task, RunResult], None] | None = None  # told of every run's result (usage/)
        # Questions a run asks its sender go to the task's chat, ahead of its result.
        # Plain text: nothing the agent wrote renders as markdown in them.
        self.approvals = Approvals(lambda task, text: outbox.notice(task.route, text, task_id=task.id),
                                   timeout=approval_timeout, enabled=approvals, max_waits=approval_max_waits)

    def start(self) -> None:
        """Start one supervised thread per worker slot (a crash is logged and the worker restarted)."""
        for number in range(self.board.limits.max_workers):
            self.supervisor.start(f"worker-{number}", self._work)

    def join(self, deadline: float) -> None:
        """Wait for the threads to end, until `deadline` (time.monotonic)."""
        self.supervisor.join(deadline, prefix="worker-")

    def _work(self) -> None:
        while True:
            taken = self.board.take_next()
            if taken is None:
                return
            task, running = taken
            try:
                self._run(task, running)
            except Exception:
                task_log(log, task).exception("任务 %s 失败: unexpected error", task.id)
                if not task.finished:
                    self.board.fail(task.id, "内部错误")
                    self.outbox.deliver_later(task)
            finally:
                self.board.release(task)

    def _questions(self, task: Task, running: Running) -> RunQuestions:
        """The run's questions to its sender; with AI cards the task's card shows the one asked (and buttons for a
        tool request) and keeps each one's outcome among its steps."""
        cards = self.outbox.cards
        end_run = partial(self._end_run, running)
        deadline = self.approvals.clock() + self.task_timeout  # about when the client's turn times out
        if cards is None:
            return self.approvals.for_run(task, stop=running.cancel_event, end_run=end_run, deadline=deadline)
        return self.approvals.for_run(
            task, stop=running.cancel_event, end_run=end_run, deadline=deadline,
            shown=lambda pending: cards.ask(task.id, "" if pending.request.is_question else pending.id,
                                            card_question(pending.request)),
            settled=lambda request, decision: cards.settled(task.id, card_outcome(request, decision)))

    def _end_run(self, running: Running, reason: str) -> None:
        """Stop a run the bot itself ends (it asked past APPROVAL_MAX_WAITS): its task fails with `reason`."""
        with self.board.lock:
            running.stop_reason = reason
            running.cancel_event.set()  # the client interrupts the turn within its poll

    def _ask(self, running: Running, questions: RunQuestions, request: ToolRequest) -> Decision:
        """The CLI asks to use a tool: ask the task's sender. The wait counts towards TASK_TIMEOUT (the client's), not
        towards SYNC_TIMEOUT (the monitor's)."""
        since = self.board.clock()
        with self.board.lock:
            running.awaiting_since = since
        try:
            return questions(request)
        finally:
            with self.board.lock:
                running.awaiting_since = None
                running.waited += self.board.clock() - since

    def _run(self, task: Task, running: Running) -> None:
        tlog = task_log(log, task)
        if task.background:
            tlog.info("后台任务开始执行: %s", task.id)
        session = self.session_for(task.conversation_key)
        cards = self.outbox.cards  # AI cards (cards/task_cards.py) when on: the answer streams into the task's card
        card = cards.open(task) if cards is not None else None

        def on_step(step: str) -> None:
            self.board.transition(task, last_step=step)
            if card is not None:
                cards.step(task.id, step)

        questions = self._questions(task, running)
        try:
            result = self.client.run(task.prompt, conversation=task.conversation_key, session_id=session,
                                     timeout=self.task_timeout,
                                     cancel_event=running.cancel_event, run_tag=task.id, on_step=on_step,
                                     on_text=(lambda text: cards.text(task.id, text)) if card is not None else None,
                                     ask=lambda request: self._ask(running, questions, request))
        finally:
            questions.end()  # a question still waiting (the run timed out) is withdrawn
        if self.on_run is not None:
            try:
                self.on_run(task, result)
            except Exception:  # what the run used is a report: the task goes on
                tlog.exception("任务 %s 的用量未能记录", task.id)
        with self.board.lock:  # the outcome is decided once, against a cancel arriving at the same moment
            stopped_here = bool(running.stop_reason) and not task.cancel_requested  # too many questions
            if result.cancelled and running.by_shutdown and not task.cancel_requested and not stopped_here:
                # Stopped by a shutdown, not by the user: leave it to be re-run on the next start.
                self.board.transition(task, status=QUEUED, attempts=max(0, task.attempts - 1))
                tlog.info("任务 %s 因停止服务而中断，下次启动时重新执行", task.id)
                return
            if stopped_here:  # whatever the CLI still wrote after the refusal, the run was ended mid-work
                self.board.fail(task.id, running.stop_reason)
            elif result.ok:  # an answer that was complete before a cancel reached the CLI is still the answer
                self.board.complete(task.id, result.text, result.duration)
            elif result.cancelled:
                self.board.fail(task.id, "已被用户取消", status=CANCELLED)
                self.board.mark_delivered(task)  # the cancel's confirmation tells the user, not a result
                if card is not None:
                    cards.end(task, "已取消")
                return
            elif result.timed_out:
                self.board.fail(task.id, result.error, status=TIMED_OUT, duration=result.duration)
            else:
                self.board.fail(task.id, redact_secrets(result.error, self._secrets))
        self.outbox.deliver_later(task)
