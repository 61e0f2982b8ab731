"""What the bot tells a user about their task, in their words: acknowledgements, notices and results."""

from __future__ import annotations

import re

from dingtalk.message_parts import split_message, utf8_json_cost
from tasks.admission import HELD_BY_CONVERSATION, HELD_BY_USER, HELD_BY_WORKERS
from tasks.task import CANCELLED, RUNNING, STATUS_LABELS, SUCCEEDED, TIMED_OUT, Task


def waiting_note(hold: str, position: int, per_user_limit: int) -> str:
    """Why a new task waits, for its acknowledgement ("" when it starts at once); `hold` from scheduling."""
    if hold == HELD_BY_CONVERSATION:
        return "\n排队中: 等待本会话上一条完成后自动开始 (同一会话的消息依次处理)。"
    if hold == HELD_BY_USER:
        return (f"\n排队中: 你已有 {per_user_limit} 个任务在执行 (每人最多同时执行 "
                f"{per_user_limit} 个)，其中一个完成后自动开始。")
    if hold == HELD_BY_WORKERS:
        return f"\n当前排队中 (第 {position} 位)，有空闲时自动开始。"
    return ""


def waiting_status(hold: str, position: int, per_user_limit: int) -> str:
    """Why a queued task still waits, for /status."""
    if hold == HELD_BY_CONVERSATION:
        return "等待本会话上一条完成 (同一会话的消息依次处理)"
    if hold == HELD_BY_USER:
        return f"等待你的其他任务完成 (每人最多同时执行 {per_user_limit} 个)"
    if hold == HELD_BY_WORKERS:
        return f"排队位置: 第 {position} 位 (等待空闲的执行位置)"
    return "即将开始"


def acknowledgement(task: Task, waiting: str, expected_duration: str) -> str:
    """The first answer to a prompt: received, its id, for a background task how long it should take, and what
    it waits for (`waiting_note`)."""
    queue_note = waiting
    if task.background:
        return (f"收到任务，正在处理中…\n这是一个长时间任务，已转入后台执行 (任务ID: {task.id})，"
                f"预计耗时: {expected_duration}。完成后会主动推送结果，"
                f"可发送 /status {task.id} 查看进度。{queue_note}")
    return f"收到任务，正在处理中… (任务ID: {task.id}){queue_note}"


def moved_to_background(task: Task, sync_timeout: float) -> str:
    """A short task ran (or waited) past SYNC_TIMEOUT: its result will be pushed."""
    doing = "执行" if task.status == RUNNING else "排队"
    return (f"任务{doing}已超过 {sync_timeout:.0f} 秒，已转入后台继续{doing} "
            f"(任务ID: {task.id})。完成后会主动推送结果，可发送 /status {task.id} 查看进度。")


def progress_note(task: Task, now: float) -> str:
    """A background task is still running: for how long, and its last step."""
    step = task.last_step or "等待 CodeBuddy 输出"
    return f"任务 {task.id} 仍在处理中 (已用时 {task.elapsed(now) / 60:.0f} 分钟, 最近步骤: {step})"


def restarted(task: Task, interrupted: bool) -> str:
    """After a restart: the task runs again (it had started) or keeps its place in the queue."""
    if interrupted:
        return f"上次运行被中断，正在重新执行… (任务ID: {task.id})"
    return f"机器人已重启，你的任务继续排队执行 (任务ID: {task.id})，完成后会主动推送结果。"


def result(task: Task, now: float) -> str:
    """What the user reads for a finished task (after its label, when it has one: a schedule's fire)."""
    text = _result(task, now)
    return f"{task.label}\n\n{text}" if task.label else text


def _result(task: Task, now: float) -> str:
    if task.status == SUCCEEDED:
        text = task.result.strip() or "(CodeBuddy 没有返回内容)"
        if task.background:
            return f"**任务 {task.id} 已完成** (耗时 {task.elapsed(now):.0f} 秒)\n\n{text}"
        return text
    if task.status == TIMED_OUT:
        step = task.last_step or "无"
        return (f"任务 {task.id} 执行超时 (已用时 {task.elapsed(now) / 60:.1f} 分钟, "
                f"最近步骤: {step})，已终止。")
    return f"CodeBuddy 执行失败: {task.error or '未知错误'} (任务ID: {task.id})"


def within_one_push(text: str, limit: int) -> str:
    """`text` cut to what one push of `limit` bytes carries (a fire's answer while the call budget is tight)."""
    parts = split_message(text, limit - len(BUDGET_CUT.encode()) - 16, utf8_json_cost)
    first = re.sub(r"^\(1/\d+\)\n", "", parts[0])  # not "(1/4)": the other parts are not sent
    return text if len(parts) == 1 else f"{first.rstrip()}\n\n{BUDGET_CUT}"


BUDGET_CUT = "（钉钉接口调用预算紧张，定时任务的回答只推送第一段；需要全文请在会话中再问一次。）"


def too_many_questions(max_waits: int, tool_name: str, is_question: bool) -> str:
    """Why a run that asked its sender past APPROVAL_MAX_WAITS was ended (its task's error)."""
    what = "又要提问" if is_question else f"又请求使用工具 {tool_name}"
    return (f"确认次数已达上限: 本任务已向你确认 {max_waits} 次 (每个任务最多 {max_waits} 次, APPROVAL_MAX_WAITS)，"
            f"CodeBuddy {what}，已拒绝并结束任务。可以把任务拆小后重新发送。")


def cancelled(task: Task) -> str:
    """The confirmation of a cancel: nothing of the task runs any more."""
    return f"已取消任务 {task.id}"


def cancel_outcome(task: Task, stopped: bool) -> str:
    """The answer to a /cancel of a running task once it ended: cancelled, or it had finished first."""
    if not stopped:
        return f"正在取消任务 {task.id} (进程仍在退出中)"
    if task.status == CANCELLED:
        return cancelled(task)
    return f"任务 {task.id} 在取消前已结束 ({STATUS_LABELS.get(task.status, task.status)})，结果照常发送。"


def conversation_moved(task: Task, old_host: str) -> str:
    """Issue 16: a conversation's host is gone and another took it over; its earlier files stayed there."""
    return (f"此会话之前在主机 {old_host} 上运行，该主机当前不可用，已改由其他主机继续 (任务ID: {task.id})。"
            "之前轮次生成的文件在新主机上不可用 (除非工作目录在共享存储上)。")
