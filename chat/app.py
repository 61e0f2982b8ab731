"""The chat app: the neutral incoming message, and what to do with it — refuse, answer a command, or submit a task.

Transports (the DingTalk Stream in bot.py, the terminal console) turn what they receive into an
`IncomingMessage`; `ChatApp.handle` never sees a frame, a websocket or HTTP. The command texts live here.

What a chat may see: a group only its own tasks; a 1:1 chat the sender's tasks (an admin's: any task by id).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from async_task_manager import AsyncTaskManager
from chat.rate_limits import RateLimits
from config import MAX_PROMPT_CHARS, Config
from dingtalk.api_budget import GROUP_LABELS, ApiBudget
from dingtalk.incoming import IncomingMessage
from dingtalk.route import Route
from files.attachments import AttachmentIntake
from projects.changes import Asker
from projects.commands import COMMANDS as PROJECT_COMMANDS
from projects.commands import HELP_LINES as PROJECT_HELP
from projects.commands import ProjectCommands
from schedules.commands import COMMANDS as SCHEDULE_COMMANDS
from schedules.commands import HELP_LINES as SCHEDULE_HELP
from schedules.commands import ScheduleCommands, Sender
from tasks import texts
from tasks.task import ACTIVE_STATUSES, QUEUED, RUNNING, STATUS_LABELS, Task
from usage.commands import COMMANDS as USAGE_COMMANDS
from usage.commands import HELP_LINES as USAGE_HELP
from usage.commands import UsageCommands

log = logging.getLogger("bot")

HELP_TEXT = """可用命令:
/help (帮助) — 显示本帮助
/tasks (我的任务) — 我最近的任务
/status [任务ID] (任务状态, 查询任务) — 任务状态，默认最近一个
/cancel [任务ID] (取消任务) — 取消排队中或执行中的任务，默认最近一个
/new (新会话) — 开始新的 CodeBuddy 会话 (忘记之前的对话)
其他任何文字都会发给 CodeBuddy 处理。"""

COMMANDS = {
    "/help": "help", "帮助": "help",
    "/tasks": "tasks", "我的任务": "tasks",
    "/status": "status", "任务状态": "status", "查询任务": "status",
    "/cancel": "cancel", "取消任务": "cancel",
    "/new": "new", "新会话": "new",
}
UNSUPPORTED_TYPES = {"picture": "图片", "file": "文件", "video": "视频", "audio": "语音"}
# Commands (and the fixed replies to empty messages) have a window of their own, this many times USER_RATE_LIMIT:
# looking at a task never costs a prompt, yet a flood of /status is not answered without end.
COMMANDS_PER_PROMPT = 2
# A group's tasks are picked from the sender's newest this many (the store selects by user, not by chat).
SCAN_FOR_CHAT = 200


def without_text(msgtype: str) -> str:
    """The reply to a message with no text: what is not supported, or that it was empty."""
    if msgtype in UNSUPPORTED_TYPES:
        return (f"暂不支持{UNSUPPORTED_TYPES[msgtype]}消息 (语音需开启钉钉的语音转文字)。"
                "请发送文字，或发送 /help 查看命令。")
    if msgtype not in ("text", "richText", "audio", ""):
        return f"暂不支持 {msgtype} 类型的消息，请发送文字。"
    return "消息为空。请直接输入想让 CodeBuddy 处理的问题，或发送 /help 查看命令。"


def command_for(word: str, projects: bool, schedules: bool, usage: bool = False) -> str | None:
    """The command `word` names (a project, schedule or usage one only when those are on), or None."""
    return COMMANDS.get(word) or (PROJECT_COMMANDS.get(word) if projects else None) or (
        SCHEDULE_COMMANDS.get(word) if schedules else None) or (USAGE_COMMANDS.get(word) if usage else None)


def help_text(projects: bool, schedules: bool, usage: bool = False) -> str:
    """/help: the commands, with the project, schedule and usage ones when those are on."""
    head, last = HELP_TEXT.rsplit("\n", 1)
    extra = [PROJECT_HELP] * projects + [SCHEDULE_HELP] * schedules + [USAGE_HELP] * usage
    return "\n".join([head, *extra, last])


def describe_spend(budget: ApiBudget | None, user_id: str, *, admin: bool, daily_limit: int, mine: bool = True) -> str:
    """The DingTalk API calls of this month by kind and (`mine`: not in a group, where others read it) the sender's
    today against their daily limit (`/status`); "" when no budget is kept (the console)."""
    if budget is None:
        return ""
    spent, groups = budget.month_spend()
    kinds = "、".join(f"{GROUP_LABELS[group]} {calls}" for group, calls in groups.items())
    line = f"钉钉接口调用: 本月 {spent}/{budget.monthly_budget} 次 ({kinds})"
    if not mine:
        return line
    used = budget.used_today(user_id)
    today = f"{used} 次 (管理员不限)" if admin else f"{used}/{daily_limit} 次" if daily_limit else f"{used} 次"
    return f"{line}；你今天 {today}"


class ChatApp:
    """Decides what to do with one message: refuse, answer a command, or submit a task."""

    def __init__(self, manager: AsyncTaskManager, config: Config, *, clock: Callable[[], float] = time.time,
                 attachments: AttachmentIntake | None = None, projects: ProjectCommands | None = None,
                 schedules: ScheduleCommands | None = None, usage: UsageCommands | None = None) -> None:
        self.manager = manager
        self.config = config
        self.clock = clock
        self.attachments = attachments  # None: pictures and files get the "not supported" reply
        self.projects = projects  # None: no PROJECTS_FILE, no project commands
        self.schedules = schedules  # None: no schedule commands (the console)
        self.usage = usage  # None: no /usage and no quotas
        self.limits = RateLimits(clock)  # per user: prompts and commands per minute, one refusal per while
        manager.workers.approvals.refusal_gate = self.may_refuse  # a non-owner's 同意/拒绝, message or card button

    def route_for(self, message: IncomingMessage) -> Route:
        """Where answers to `message` go: its chat, and its session webhook while alive."""
        return Route(conversation_type=message.conversation_type, user_id=message.user_id,
                     conversation_id=message.conversation_id, session_webhook=message.session_webhook,
                     webhook_expires_ms=message.webhook_expires_ms)

    def reply(self, message: IncomingMessage, text: str) -> None:
        """Answer in the message's chat, off this thread."""
        self.manager.outbox.notice(self.route_for(message), text)

    def _over_limit(self, message: IncomingMessage, kind: str) -> bool:
        """True (and the user told once a minute) when the sender has sent too many of `kind` this minute."""
        if kind == "prompt":
            limit, unit = self.config.user_rate_limit, "个任务"
        else:
            limit, unit = self.config.user_rate_limit * COMMANDS_PER_PROMPT, "条命令"
        if self.limits.allow((message.user_id, kind), limit):
            return False
        log.warning("请求过于频繁%s user=%s", "" if kind == "prompt" else " (命令)", message.user_id)
        if self.limits.once_per((message.user_id, f"{kind}-rate"), 60):
            self.reply(message, f"请求过于频繁，请稍后再试 (每分钟最多 {limit} {unit})。")
        return True

    def may_refuse(self, user_id: str) -> bool:
        """Whether someone pressing 同意/拒绝 on a question they may not answer (a message or a card button) may be
        told so: the press counts against their command limit first, and a refusal line goes out at most once per
        person per window (none while over the limit)."""
        if not self.limits.allow((user_id, "command"), self.config.user_rate_limit * COMMANDS_PER_PROMPT):
            return False
        return self.limits.once_per((user_id, "approval-refusal"), self.limits.window)

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.config.admin_users

    def handle(self, message: IncomingMessage) -> None:
        """Handle one message; never raises for bad input."""
        if not message.user_id or not (message.session_webhook or message.conversation_id):
            log.warning("忽略缺少发送者或会话信息的消息 msgId=%s", message.msg_id or "-")
            return
        if not self.manager.remember_message(message.msg_id):
            log.info("重复消息已忽略: msgId=%s user=%s", message.msg_id, message.user_id)
            return
        log.info("收到消息类型: %s user=%s", message.msgtype or "-", message.user_id)
        if self.config.allowed_users and message.user_id not in self.config.allowed_users:
            log.warning("拒绝未授权用户 user=%s", message.user_id)
            if self.limits.once_per((message.user_id, "refusal"), 3600):
                self.reply(message, "抱歉，你没有使用此机器人的权限。如需开通，请联系管理员。")
            return
        if message.attachments and self.attachments is not None:
            if not self._over_limit(message, "prompt"):
                self.attachments.receive(message.conversation_key, message.user_id, message.attachments,
                                         message.text[:MAX_PROMPT_CHARS], msg_id=message.msg_id,
                                         reply=lambda text: self.reply(message, text),
                                         submit=lambda prompt: self.submit_prompt(message, prompt))
            return
        if not message.text:
            if not self._over_limit(message, "command"):
                self.reply(message, without_text(message.msgtype))
            return
        answered = self.manager.workers.approvals.respond(message.conversation_key, message.user_id,
                                                          self.is_admin(message.user_id), message.text)
        if answered is not None:  # the sender (or an admin) answering a question a running task asked
            if answered.kind == "detail" and self._over_limit(message, "command"):  # a page of a long request
                return
            if answered.reply:
                self.reply(message, answered.reply)
            return
        words = message.text.split(maxsplit=1)
        command = command_for(words[0].lower(), self.projects is not None, self.schedules is not None,
                              self.usage is not None)
        if command is not None:
            if not self._over_limit(message, "command"):
                self.run_command(command, words[1].strip() if len(words) > 1 else "", message)
            return
        if self._over_limit(message, "prompt"):
            return
        if len(message.text) > MAX_PROMPT_CHARS:
            self.reply(message, f"消息过长 ({len(message.text)} 字)，请控制在 {MAX_PROMPT_CHARS} 字以内。")
            return
        if self.attachments is None:
            self.submit_prompt(message, message.text)
        else:  # after the sender's attachments still downloading in this chat, which the prompt then carries
            self.attachments.when_fetched(message.conversation_key, message.user_id,
                                          lambda: self.submit_prompt(message, message.text))

    def submit_prompt(self, message: IncomingMessage, prompt: str) -> None:
        """Queue `prompt` (with any attachments the sender left before it in this chat) as the sender's task."""
        waiting = self.manager.queued_count(message.user_id)
        if waiting >= self.config.max_queued_per_user:
            log.warning("排队任务已达上限 (%d 个) user=%s", waiting, message.user_id)
            self.reply(message, f"你已有 {waiting} 个任务在排队，请等待完成或 /cancel 后再发送。")
            return
        over = self.usage.quotas.refusal(message.user_id) if self.usage is not None else ""
        if over:  # a quota is used up: no run (usage/quotas.py)
            log.warning("用量已达配额，拒绝任务 user=%s", message.user_id)
            self.reply(message, over)
            return
        if self.attachments is not None:
            prompt = self.attachments.with_pending(message.conversation_key, message.user_id, prompt)
        if self.projects is not None:  # the sender of a bound chat's latest task may /push
            self.projects.note_prompt(message.conversation_key, message.user_id)
        task = self.manager.submit(prompt, self.route_for(message), user_id=message.user_id,
                                   user_name=message.user_name, conversation_key=message.conversation_key,
                                   msg_id=message.msg_id)
        if task is None:
            self.reply(message, "机器人正在重启，请稍后重新发送。")

    # ------------------------------------------------------------ commands

    def run_command(self, command: str, argument: str, message: IncomingMessage) -> None:
        """Answer one chat command at once (commands never wait behind tasks)."""
        if command in PROJECT_COMMANDS.values() and self.projects is not None:
            asker = Asker(message.conversation_key, message.user_id, message.user_name, message.in_group,
                          self.is_admin(message.user_id), self.route_for(message))
            self.projects.handle(command, argument, asker, lambda text: self.reply(message, text))
        elif command in SCHEDULE_COMMANDS.values() and self.schedules is not None:
            sender = Sender(message.user_id, message.user_name, message.conversation_key,
                            self.is_admin(message.user_id), self.route_for(message))
            self.reply(message, self.schedules.handle(command, argument, sender))
        elif command == "usage" and self.usage is not None:
            self.reply(message, self.usage.handle(argument, message.user_id, self.is_admin(message.user_id),
                                                  message.in_group))
        elif command == "help":
            self.reply(message, help_text(*(part is not None for part in (self.projects, self.schedules, self.usage))))
        elif command == "tasks":
            self.reply(message, self.describe_tasks(message))
        elif command == "status":  # without an id: the sender's latest task, then the DingTalk calls spent
            spend = "" if argument else describe_spend(
                self.manager.outbox.budget, message.user_id, admin=self.is_admin(message.user_id),
                daily_limit=self.config.user_daily_api_calls, mine=not message.in_group)
            self.reply(message, self.describe_status(argument, message) + (f"\n{spend}" if spend else ""))
        elif command == "cancel":
            self.cancel(argument, message)
        elif command == "new":
            self.manager.new_session(message.conversation_key)
            removed = self.projects.forget(message.conversation_key) if self.projects is not None else ""
            started = "已开始新的 CodeBuddy 会话，之前的对话不再作为上下文。"
            self.reply(message, f"{started}\n{removed}" if removed else started)

    def tasks_here(self, message: IncomingMessage, limit: int) -> list[Task]:
        """The sender's newest tasks this chat may list: in a group only that group's."""
        if not message.in_group:
            return self.manager.tasks_for(message.user_id, limit=limit)
        tasks = self.manager.tasks_for(message.user_id, limit=SCAN_FOR_CHAT)
        return [task for task in tasks if task.conversation_key == message.conversation_key][:limit]

    def shown_here(self, task: Task, message: IncomingMessage) -> bool:
        """Whether `task` may be shown in the message's chat: a group sees only its own tasks (an admin there
        too); a 1:1 chat sees the sender's tasks, or any task when the sender is an admin."""
        if message.in_group and task.conversation_key != message.conversation_key:
            return False
        return task.user_id == message.user_id or self.is_admin(message.user_id)

    def _find_task(self, task_id: str, message: IncomingMessage,
                   active_only: bool = False) -> tuple[Task | None, str]:
        """The task `task_id` if the sender owns it or is an admin, or their latest (active) task of this chat
        (of any chat, in a 1:1 chat); (task, error text)."""
        if task_id:
            task = self.manager.get_task(task_id)
            if task is None or (task.user_id != message.user_id and not self.is_admin(message.user_id)):
                return None, f"找不到任务 {task_id}"
            return task, ""
        for task in self.tasks_here(message, limit=20):
            if not active_only or task.status in ACTIVE_STATUSES:
                return task, ""
        return None, "你没有进行中的任务。" if active_only else "你还没有任务。"

    def describe_tasks(self, message: IncomingMessage) -> str:
        """The sender's recent tasks of this chat, one line each (`/tasks`)."""
        tasks = self.tasks_here(message, limit=10)
        if not tasks:
            return "你还没有任务。"
        now = self.clock()
        lines = ["最近的任务:"]
        for task in tasks:
            words = task.prompt[:20] + ("…" if len(task.prompt) > 20 else "")
            lines.append(f"- {task.id} {STATUS_LABELS.get(task.status, task.status)} "
                         f"{task.elapsed(now):.0f}秒 「{words}」")
        return "\n".join(lines)

    def describe_status(self, task_id: str, message: IncomingMessage) -> str:
        """One task's status, elapsed time, queue position and last step (`/status`), if this chat may see it."""
        task, error = self._find_task(task_id, message)
        if task is None:
            return error
        if not self.shown_here(task, message):
            return f"找不到任务 {task_id}"
        now = self.clock()
        lines = [f"任务 {task.id}: {STATUS_LABELS.get(task.status, task.status)}",
                 f"已用时: {task.elapsed(now):.0f} 秒",
                 f"内容: {task.prompt[:40]}{'…' if len(task.prompt) > 40 else ''}"]
        if task.status == QUEUED:
            hold = self.manager.board.hold_reason(task)
            lines.append(texts.waiting_status(hold, self.manager.queue_position(task.id),
                                                   self.config.max_tasks_per_user))
        if task.status == RUNNING and self.manager.workers.approvals.is_waiting(task):
            lines.append("等待你的确认: 回复「同意」或「拒绝」 (等待计入任务时限)")
        if task.status == RUNNING:
            if self.manager.cluster is not None:  # issue 16: several hosts share the tasks
                lines.append(f"执行主机: {self.manager.cluster.host_of(task.id) or '未知'}")
            lines.append(f"最近步骤: {task.last_step or '等待 CodeBuddy 输出'}")
            lines.append(f"预计剩余时间: {self.manager.expected_remaining(task, now)}")
        if task.error and task.status != QUEUED:
            lines.append(f"原因: {task.error}")
        if task.undeliverable:
            lines.append("结果无法送达 (多次推送失败，已放弃)")
        elif task.finished and not task.delivered:
            lines.append("结果尚未送达，稍后重试推送")
        return "\n".join(lines)

    def cancel(self, task_id: str, message: IncomingMessage) -> None:
        """Cancel the sender's task (or any, for admins); confirm once nothing of it runs (no thread waits)."""
        task, error = self._find_task(task_id, message, active_only=not task_id)
        if task is None:
            self.reply(message, error)
            return

        def confirm(ended: Task, stopped: bool) -> None:
            self.reply(message, texts.cancel_outcome(ended, stopped))

        cluster = self.manager.cluster  # issue 16: another host may hold it; that host confirms
        if cluster is not None and task.id not in self.manager.board.tasks:
            # None: not active; "": the DB cannot be reached. The holder confirms through this message's webhook.
            holder = cluster.request_cancel(task.id, reply_to=self.route_for(message))
            if not holder:
                self.reply(message, f"任务 {task.id} 已结束，无需取消。" if holder is None
                           else f"暂时无法取消任务 {task.id} (任务数据库不可用)，请稍后再试。")
        elif self.manager.cancel(task.id, on_ended=confirm) is None:
            self.reply(message, f"任务 {task.id} 已结束，无需取消。")
