"""Admission across hosts asks the DB without the board's lock (issue 23 item 4): a slow or black-holed DB holds up the
worker asking, never the intake, /status or the other workers; and the answer is checked again under the lock."""

from __future__ import annotations

import threading
import time

from dingtalk.route import Route
from store.memory import MemoryTaskStore
from tasks.admission import Limits
from tasks.board import TaskBoard
from tasks.routing import Router
from tasks.task import CANCELLED, QUEUED, RUNNING, Task


def _board(workers: int = 2, per_user: int = 1) -> TaskBoard:
    store = MemoryTaskStore()
    return TaskBoard(store, Router(store), limits=Limits(workers, per_user), clock=time.time)


def _queue(board: TaskBoard, user: str, conversation: str) -> Task:
    task = board.create(user, "p", Route("1", user, conversation), conversation_key=conversation)
    board.enqueue(task)
    return task


class SlowAdmission:
    """An `admit` that holds every call until `release` (a DB that does not answer) and records what it saw."""

    def __init__(self, board: TaskBoard, verdict: bool | None = True) -> None:
        self.board, self.verdict = board, verdict
        self.asked: list[str] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, task: Task, running_here: list[Task]) -> bool | None:
        self.asked.append(task.id)
        self.entered.set()
        self.release.wait(10)
        return self.verdict


def _take_in_background(board: TaskBoard) -> tuple[threading.Thread, list]:
    taken: list = []
    thread = threading.Thread(target=lambda: taken.append(board.take_next(poll=0.05)), daemon=True)
    thread.start()
    return thread, taken


def _held_elsewhere(board: TaskBoard) -> bool:
    """Whether another thread holds the board's lock (tried from a fresh thread)."""
    got: list[bool] = []
    probe = threading.Thread(target=lambda: got.append(board.lock.acquire(timeout=0.5)) or (
        got[-1] and board.lock.release()))
    probe.start()
    probe.join()
    return not got[0]


def test_admission_waits_on_the_db_without_the_board_lock():
    board = _board()
    admit = board.admit = SlowAdmission(board)
    first = _queue(board, "u1", "c1")
    worker, taken = _take_in_background(board)
    assert admit.entered.wait(5)
    assert not _held_elsewhere(board)  # the lock is free while the DB is asked
    second = _queue(board, "u2", "c2")  # the intake queues meanwhile, at once
    assert board.position(second.id) == 2 and board.hold_reason(second) == ""
    admit.release.set()
    worker.join(5)
    assert taken[0][0] is first and first.status == RUNNING and first.id not in board.queue


def test_a_task_being_admitted_counts_against_its_user_limit_on_this_host():
    board = _board(workers=2, per_user=1)
    admit = board.admit = SlowAdmission(board)
    first = _queue(board, "u1", "c1")
    same_user = _queue(board, "u1", "c2")
    first_worker, _ = _take_in_background(board)
    assert admit.entered.wait(5)
    second_worker, second_taken = _take_in_background(board)
    time.sleep(0.3)  # the second worker looks, and must not start u1's second task past MAX_TASKS_PER_USER=1
    assert admit.asked == [first.id] and not second_taken
    admit.release.set()
    first_worker.join(5)
    assert first.status == RUNNING and same_user.status == QUEUED
    with board.lock:
        board.stopping = True
        board.wakeup.notify_all()
    second_worker.join(5)
    assert second_taken == [None]


def test_a_task_cancelled_while_being_admitted_is_not_started_and_its_row_is_written_again():
    board = _board()
    admit = board.admit = SlowAdmission(board)
    task = _queue(board, "u1", "c1")
    worker, taken = _take_in_background(board)
    assert admit.entered.wait(5)
    with board.lock:  # /cancel of a queued task (async_task_manager.cancel), while the DB says "running here"
        board.queue.remove(task.id)
        board.transition(task, status=CANCELLED, delivered=True)
    saved_before = task.status
    admit.release.set()
    time.sleep(0.3)
    with board.lock:
        board.stopping = True
        board.wakeup.notify_all()
    worker.join(5)
    assert taken == [None] and saved_before == CANCELLED and task.status == CANCELLED
    assert board.store.get(task.id).status == CANCELLED and task.id not in board.running


def test_a_task_another_host_took_over_while_being_admitted_leaves_this_host():
    board = _board()
    admit = board.admit = SlowAdmission(board, verdict=None)
    task = _queue(board, "u1", "c1")
    worker, taken = _take_in_background(board)
    assert admit.entered.wait(5)
    admit.release.set()
    time.sleep(0.3)
    with board.lock:
        board.stopping = True
        board.wakeup.notify_all()
    worker.join(5)
    assert taken == [None] and task.id not in board.tasks and task.id not in board.queue
