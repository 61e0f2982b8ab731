"""A task: one prompt from a chat, the states it moves through, and what happened to it.

A `Task` moves queued → running → succeeded / failed / cancelled / timed_out, and separately from
undelivered to delivered. The transitions themselves happen in `task_board.TaskBoard.transition`.
"""

from __future__ import annotations

from dataclasses import dataclass

from dingtalk.route import Route

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, TIMED_OUT = (
    "queued", "running", "succeeded", "failed", "cancelled", "timed_out")
ACTIVE_STATUSES = (QUEUED, RUNNING)
FINISHED_STATUSES = (SUCCEEDED, FAILED, CANCELLED, TIMED_OUT)
STATUS_LABELS = {QUEUED: "排队中", RUNNING: "执行中", SUCCEEDED: "已完成", FAILED: "失败", CANCELLED: "已取消",
                 TIMED_OUT: "已超时"}
NO_KEYWORD = "none"


@dataclass
class Task:
    """One prompt and everything that happened to it."""

    id: str
    user_id: str
    user_name: str
    conversation_key: str
    route: Route
    prompt: str
    keyword: str = NO_KEYWORD  # the keyword class that routed it ("none" when no keyword matched)
    status: str = QUEUED
    background: bool = False  # the result is pushed rather than sent through the session webhook
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: str = ""
    error: str = ""
    delivered: bool = False
    attempts: int = 0  # runs started (a task interrupted twice by a crash is failed)
    last_step: str = ""
    msg_id: str = ""
    last_progress_at: float | None = None
    cancel_requested: bool = False  # the user asked to stop it: final, even across a restart
    undeliverable: bool = False  # delivery was given up (DELIVERY_GIVE_UP_HOURS, or a permanent refusal)
    label: str = ""  # the line its answer opens with: a schedule's fire names the schedule (docs/schedules.md)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def elapsed(self, now: float) -> float:
        """Seconds since the task was created, up to its end if it has ended."""
        return (self.finished_at or now) - self.created_at
