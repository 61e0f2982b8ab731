"""DingTalk ⇄ CodeBuddy bot: the entry point.

Where a message goes:
  DingTalk Stream frame → `StreamConnection` (own connect/receive loop)
  → `BotStreamHandler.process` hands the frame to the intake thread, ACKs once it is recorded (ms)
  → `ChatApp.handle(IncomingMessage)`: access checks, rate limit, dedup, chat commands
  → `AsyncTaskManager.submit` (async_task_manager.py): acknowledgement, queue, CLI run, delivery
  → `CodeBuddyClient.run` (codebuddy_client.py) and `DingTalkSender.send` (dingtalk_sender.py).

Run `python bot.py --help` for the commands.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import logging.handlers
import os
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import quote_plus

from config import HTTP_TIMEOUT, MAX_PROMPT_CHARS, Config, ConfigError, load_config

log = logging.getLogger("bot")

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"
BOT_TOPIC = "/v1.0/im/bot/messages/get"
INTAKE_ACK_WAIT = 2.0  # seconds a frame's ACK waits for the message to be recorded

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


# ---------------------------------------------------------------- logging


class RedactingFilter(logging.Filter):
    """Removes the client secret and anything token-like from every log line."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        from codebuddy_client import redact_secrets

        message = record.getMessage()
        if record.levelno >= logging.WARNING or record.exc_info:
            cleaned = redact_secrets(message, self._secrets)  # errors may quote text from outside
        else:
            # INFO lines are the bot's own phrases and ids: only the exact secrets are checked (cheap).
            cleaned = message
            for secret in self._secrets:
                if secret in cleaned:
                    cleaned = cleaned.replace(secret, "***")
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True


def setup_logging(log_file: str, level: str, secrets: tuple[str, ...] = ()) -> logging.Handler:
    """Log to `log_file` (WatchedFileHandler, so logrotate works); fall back to stderr and say so once."""
    formatter = logging.Formatter(LOG_FORMAT, LOG_DATEFMT)
    fallback_reason = ""
    try:
        directory = os.path.dirname(os.path.abspath(log_file))
        os.makedirs(directory, exist_ok=True)
        os.close(os.open(log_file, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))  # a new log is the bot's alone
        handler: logging.Handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
    except OSError as exc:
        handler = logging.StreamHandler(sys.stderr)
        fallback_reason = f"cannot open LOG_FILE {log_file} ({exc.strerror or exc}); logging to stderr"
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if fallback_reason:
        log.warning(fallback_reason)
    return handler


# ---------------------------------------------------------------- the neutral request


@dataclass(frozen=True)
class IncomingMessage:
    """A chat message as the app sees it, whatever transport it came from."""

    msg_id: str
    user_id: str
    user_name: str
    conversation_type: str
    conversation_id: str
    text: str  # the prompt; "" when the message had none
    msgtype: str = "text"
    session_webhook: str = ""
    webhook_expires_ms: int = 0

    @property
    def conversation_key(self) -> str:
        return self.conversation_id or self.user_id


def incoming_from_callback(data: dict) -> IncomingMessage:
    """Turn a bot-message callback's `data` into an `IncomingMessage` (raises ValueError if malformed)."""
    from dingtalk_stream import ChatbotMessage

    if not isinstance(data, dict):
        raise ValueError("callback data is not an object")
    try:
        message = ChatbotMessage.from_dict(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot parse bot message: {type(exc).__name__}: {exc}") from None
    msgtype = message.message_type or ""
    text = ""
    if msgtype == "text" and message.text is not None:
        text = message.text.content or ""
    elif msgtype == "richText" and message.rich_text_content is not None:
        text = "".join(str(item.get("text", "")) for item in message.rich_text_content.rich_text_list
                       if isinstance(item, dict))
    elif msgtype == "audio":
        content = message.extensions.get("content")
        if isinstance(content, dict):
            text = str(content.get("recognition") or "")
    return IncomingMessage(
        msg_id=str(message.message_id or ""),
        user_id=str(message.sender_staff_id or message.sender_id or ""),
        user_name=str(message.sender_nick or ""),
        conversation_type=str(message.conversation_type or "1"),
        conversation_id=str(message.conversation_id or ""),
        text=text.strip(),
        msgtype=msgtype,
        session_webhook=str(message.session_webhook or ""),
        webhook_expires_ms=int(message.session_webhook_expired_time or 0),
    )


# ---------------------------------------------------------------- the chat app


class ChatApp:
    """Decides what to do with one message: refuse, answer a command, or submit a task."""

    def __init__(self, manager, config: Config, *, clock: Callable[[], float] = time.time) -> None:
        self.manager = manager
        self.config = config
        self.clock = clock
        self._recent_prompts: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._last_refusal: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def route_for(self, message: IncomingMessage):
        from dingtalk_sender import Route

        return Route(conversation_type=message.conversation_type, user_id=message.user_id,
                     conversation_id=message.conversation_id, session_webhook=message.session_webhook,
                     webhook_expires_ms=message.webhook_expires_ms)

    def reply(self, message: IncomingMessage, text: str) -> None:
        """Answer in the message's chat, off this thread."""
        self.manager.notify(self.route_for(message), text)

    def _once_per(self, user_id: str, kind: str, seconds: float) -> bool:
        now = self.clock()
        with self._lock:
            last = self._last_refusal.get((user_id, kind))
            if last is not None and now - last < seconds:
                return False
            self._last_refusal[(user_id, kind)] = now
            return True

    def _rate_limited(self, user_id: str) -> bool:
        now = self.clock()
        with self._lock:
            window = self._recent_prompts[user_id]
            while window and now - window[0] >= 60:
                window.popleft()
            if len(window) >= self.config.user_rate_limit:
                return True
            window.append(now)
            return False

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.config.admin_users

    def handle(self, message: IncomingMessage) -> None:
        """Handle one message; never raises for bad input."""
        if not message.user_id or not (message.session_webhook or message.conversation_id):
            log.warning("忽略缺少发送者或会话信息的消息 msgId=%s", message.msg_id or "-")
            return
        if not self.manager.accept_message(message.msg_id):
            log.info("重复消息已忽略: msgId=%s user=%s", message.msg_id, message.user_id)
            return
        if self.config.allowed_users and message.user_id not in self.config.allowed_users:
            log.warning("拒绝未授权用户 user=%s", message.user_id)
            if self._once_per(message.user_id, "refusal", 3600):
                self.reply(message, "抱歉，你没有使用此机器人的权限。如需开通，请联系管理员。")
            return
        if message.msgtype in UNSUPPORTED_TYPES and not message.text:
            kind = UNSUPPORTED_TYPES[message.msgtype]
            self.reply(message, f"暂不支持{kind}消息 (语音需开启钉钉的语音转文字)。请发送文字，或发送 /help 查看命令。")
            return
        if not message.text:
            if message.msgtype not in ("text", "richText", "audio", ""):
                self.reply(message, f"暂不支持 {message.msgtype} 类型的消息，请发送文字。")
            else:
                self.reply(message, "消息为空。请直接输入想让 CodeBuddy 处理的问题，或发送 /help 查看命令。")
            return
        words = message.text.split(maxsplit=1)
        command = COMMANDS.get(words[0].lower())
        if command is not None:
            self.run_command(command, words[1].strip() if len(words) > 1 else "", message)
            return
        if len(message.text) > MAX_PROMPT_CHARS:
            self.reply(message, f"消息过长 ({len(message.text)} 字)，请控制在 {MAX_PROMPT_CHARS} 字以内。")
            return
        if self._rate_limited(message.user_id):
            log.warning("请求过于频繁 user=%s", message.user_id)
            if self._once_per(message.user_id, "rate", 60):
                self.reply(message, f"请求过于频繁，请稍后再试 (每分钟最多 {self.config.user_rate_limit} 个任务)。")
            return
        task = self.manager.submit(message.text, self.route_for(message), user_id=message.user_id,
                                   user_name=message.user_name, conversation_key=message.conversation_key,
                                   msg_id=message.msg_id)
        if task is None:
            self.reply(message, "机器人正在重启，请稍后重新发送。")

    # ------------------------------------------------------------ commands

    def run_command(self, command: str, argument: str, message: IncomingMessage) -> None:
        """Answer one chat command at once (commands never wait behind tasks)."""
        if command == "help":
            self.reply(message, HELP_TEXT)
        elif command == "tasks":
            self.reply(message, self.describe_tasks(message.user_id))
        elif command == "status":
            self.reply(message, self.describe_status(argument, message.user_id))
        elif command == "cancel":
            threading.Thread(target=self.cancel, args=(argument, message), daemon=True).start()
        elif command == "new":
            self.manager.new_session(message.conversation_key)
            self.reply(message, "已开始新的 CodeBuddy 会话，之前的对话不再作为上下文。")

    def _find_task(self, task_id: str, user_id: str, active_only: bool = False):
        """The task `task_id` if the user may see it, or their latest (active) task; (task, error text)."""
        from async_task_manager import ACTIVE_STATUSES

        if task_id:
            task = self.manager.get_task(task_id)
            if task is None or (task.user_id != user_id and not self.is_admin(user_id)):
                return None, f"找不到任务 {task_id}"
            return task, ""
        for task in self.manager.tasks_for(user_id, limit=20):
            if not active_only or task.status in ACTIVE_STATUSES:
                return task, ""
        return None, "你没有进行中的任务。" if active_only else "你还没有任务。"

    def describe_tasks(self, user_id: str) -> str:
        from async_task_manager import STATUS_LABELS

        tasks = self.manager.tasks_for(user_id, limit=10)
        if not tasks:
            return "你还没有任务。"
        now = self.clock()
        lines = ["最近的任务:"]
        for task in tasks:
            words = task.prompt[:20] + ("…" if len(task.prompt) > 20 else "")
            lines.append(f"- {task.id} {STATUS_LABELS.get(task.status, task.status)} "
                         f"{task.elapsed(now):.0f}秒 「{words}」")
        return "\n".join(lines)

    def describe_status(self, task_id: str, user_id: str) -> str:
        from async_task_manager import QUEUED, RUNNING, STATUS_LABELS

        task, error = self._find_task(task_id, user_id)
        if task is None:
            return error
        now = self.clock()
        lines = [f"任务 {task.id}: {STATUS_LABELS.get(task.status, task.status)}",
                 f"已用时: {task.elapsed(now):.0f} 秒",
                 f"内容: {task.prompt[:40]}{'…' if len(task.prompt) > 40 else ''}"]
        if task.status == QUEUED:
            lines.append(f"排队位置: 第 {self.manager.queue_position(task.id)} 位")
        if task.status == RUNNING:
            lines.append(f"最近步骤: {task.last_step or '等待 CodeBuddy 输出'}")
            lines.append(f"预计剩余时间: {self.manager.expected_remaining(task, now)}")
        if task.error and task.status != QUEUED:
            lines.append(f"原因: {task.error}")
        return "\n".join(lines)

    def cancel(self, task_id: str, message: IncomingMessage) -> None:
        """Cancel the sender's task (or any, for admins) and confirm once its process is gone."""
        task, error = self._find_task(task_id, message.user_id, active_only=not task_id)
        if task is None:
            self.reply(message, error)
            return
        cancelled = self.manager.cancel(task.id)
        if cancelled is None:
            self.reply(message, f"任务 {task.id} 已结束，无需取消。")
            return
        stopped = self.manager.wait_finished(task.id, timeout=15)
        suffix = "" if stopped else " (进程仍在退出中)"
        self.reply(message, f"已取消任务 {task.id}{suffix}")


# ---------------------------------------------------------------- the stream transport


def _settle(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _settle_all(futures: list[asyncio.Future]) -> None:
    for future in futures:
        _settle(future, True)


class Intake:
    """One thread that handles bot messages in arrival order and tells the event loop when they are recorded.

    It takes every message waiting at once and wakes the loop once per batch, not once per message: in a
    burst that wake-up was a large part of the cost of an acknowledgement (BENCHMARKS.md).
    """

    def __init__(self, handle: Callable[[dict], None],
                 batch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self._handle = handle
        self._batch = batch  # the store's one-transaction context: a batch is committed before its ACKs
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="intake", daemon=True)
        self._thread.start()

    def submit(self, data: dict, loop: asyncio.AbstractEventLoop | None = None,
               recorded: asyncio.Future | None = None) -> None:
        """Queue one message; `recorded` (a future of `loop`) is set to True once it has been handled."""
        self._queue.put((data, loop, recorded))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Handle what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
            stopping = False
            with self._batch():
                for item in batch:
                    if item is None:
                        stopping = True
                        continue
                    data, loop, recorded = item
                    try:
                        self._handle(data)
                    except Exception:
                        log.exception("处理消息失败")
                    if loop is not None and recorded is not None:
                        waiting.setdefault(loop, []).append(recorded)
            for loop, futures in waiting.items():
                try:
                    loop.call_soon_threadsafe(_settle_all, futures)
                except RuntimeError:
                    pass  # the loop has closed (shutdown): nothing is waiting for these ACKs any more
            if stopping:
                return


def _stream_handler_class():
    """The SDK handler class, built lazily so the SDK is imported after the endpoint is set."""
    from dingtalk_stream import AckMessage, ChatbotHandler

    class BotStreamHandler(ChatbotHandler):
        """Hands every bot message to the intake thread and ACKs it as soon as it is recorded."""

        def __init__(self, intake: Intake) -> None:
            super().__init__()
            self.intake = intake

        async def process(self, callback):
            # ACK once the message is recorded as a task (milliseconds), so a crash right after the ACK
            # loses nothing; a stuck intake must not hold the ACK back for long.
            loop = asyncio.get_running_loop()
            recorded = loop.create_future()
            timer = loop.call_later(INTAKE_ACK_WAIT, _settle, recorded, False)
            self.intake.submit(callback.data, loop, recorded)
            if not await recorded:
                log.warning("消息处理较慢，先行确认 (ACK) 收到")
            timer.cancel()
            return AckMessage.STATUS_OK, "OK"

    return BotStreamHandler


class StreamConnection:
    """Our own connect/receive loop around the SDK's frame routing and ACKs.

    Owning the loop fixes the SDK's defects (docs/wire-facts.md §1): connection-open runs off the event loop with a
    timeout, reconnects back off with jitter, a watchdog reconnects a silent socket, and stop() works.
    """

    def __init__(self, config: Config, intake: Intake, *,
                 idle_timeout: float, backoff_max: float = 60.0) -> None:
        import dingtalk_stream
        import websockets.exceptions  # noqa: F401  (the SDK's lazy-import defect)

        self.config = config
        self.idle_timeout = idle_timeout
        self.backoff_max = backoff_max
        self.client = dingtalk_stream.DingTalkStreamClient(
            dingtalk_stream.Credential(config.client_id, config.client_secret), logger=logging.getLogger("stream"))
        self.client.register_callback_handler(BOT_TOPIC, _stream_handler_class()(intake))
        self.client.pre_start()
        self.connected = False
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-open")

    def stop(self) -> None:
        self._stop.set()

    def _open_connection(self) -> dict | None:
        from dingtalk_sender import JsonHttp, open_stream_connection

        http = JsonHttp(pool_size=1, transport_retries=0)
        try:
            connection, error = open_stream_connection(http, self.config.openapi_endpoint, self.config.client_id,
                                                       self.config.client_secret)
        finally:
            http.close()
        if connection is None:
            log.error("连接钉钉 Stream 失败: %s", error)
        return connection

    async def _unless_stopped(self, coroutine):
        """Await `coroutine`, or give up on it (None) as soon as stop() is called."""
        work = asyncio.ensure_future(coroutine)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({work, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        return work.result() if work.done() else None

    async def _sleep_or_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    async def run(self) -> None:
        """Connect, receive and route frames until stop(); reconnect with backoff on any failure."""
        import websockets

        attempt = 0
        while not self._stop.is_set():
            # Not asyncio.to_thread: asyncio.run() joins the default executor, so a hung request would
            # hold up the shutdown; this executor is left behind (the process ends with os._exit).
            opening = asyncio.get_running_loop().run_in_executor(self._opener, self._open_connection)
            connection = await self._unless_stopped(opening)
            if self._stop.is_set():
                break
            if connection is not None:
                uri = f"{connection['endpoint']}?ticket={quote_plus(connection['ticket'])}"
                try:
                    async with websockets.connect(uri, open_timeout=HTTP_TIMEOUT[1], close_timeout=2,
                                                  max_size=16 * 1024 * 1024) as websocket:
                        self.client.websocket = websocket
                        self.connected = True
                        attempt = 0
                        log.info("钉钉 Stream 已连接")
                        await self._receive(websocket)
                except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
                    log.warning("钉钉 Stream 连接中断: %s", type(exc).__name__)
                finally:
                    self.connected = False
            if self._stop.is_set():
                break
            attempt += 1
            self.reconnects += 1
            delay = min(self.backoff_max, 2 ** min(attempt - 1, 10)) * random.uniform(0.5, 1.0)
            log.info("%.1f 秒后重新连接钉钉 Stream (第 %d 次)", delay, attempt)
            await self._sleep_or_stop(delay)

    async def _receive(self, websocket) -> None:
        """Route frames until the socket closes, stop() is called, or no frame came for `idle_timeout` s."""
        last_frame = time.monotonic()

        async def close_when_stopped_or_idle() -> None:
            while not self._stop.is_set():
                idle = time.monotonic() - last_frame
                if idle >= self.idle_timeout:
                    log.warning("钉钉 Stream %.0f 秒没有任何消息，重新连接", self.idle_timeout)
                    break
                await self._sleep_or_stop(self.idle_timeout - idle)
            await websocket.close()

        guard = asyncio.create_task(close_when_stopped_or_idle())
        try:
            async for raw in websocket:
                last_frame = time.monotonic()
                try:
                    frame = json.loads(raw)
                    if not isinstance(frame, dict):
                        raise ValueError("frame is not an object")
                except ValueError:
                    log.warning("忽略无法解析的 Stream 消息 (%d 字节)", len(raw))
                    continue
                asyncio.create_task(self._route(frame, websocket))
        finally:
            guard.cancel()

    async def _route(self, frame: dict, websocket) -> None:
        from dingtalk_stream import AckMessage

        try:
            result = await self.client.route_message(frame)
            if result == self.client.TAG_DISCONNECT:
                log.info("钉钉 Stream 要求断开，重新连接")
                await websocket.close()
        except Exception as exc:
            log.warning("无法处理的 Stream 消息: %s: %s", type(exc).__name__, str(exc)[:200])
            message_id = (frame.get("headers") or {}).get("messageId") if isinstance(frame.get("headers"),
                                                                                     dict) else None
            if message_id:
                ack = AckMessage()
                ack.code = AckMessage.STATUS_BAD_REQUEST
                ack.headers.message_id = message_id
                ack.message = "bad frame"
                try:
                    await websocket.send(json.dumps(ack.to_dict()))
                except Exception:
                    pass  # the socket is gone; the reconnect loop handles it


# ---------------------------------------------------------------- wiring


def build_app(config: Config):
    """Create the sender, client, store, manager and chat app from `config`."""
    from async_task_manager import AsyncTaskManager, SQLiteTaskStore
    from codebuddy_client import CodeBuddyClient
    from dingtalk_sender import DingTalkSender

    sender = DingTalkSender(config.openapi_endpoint, config.client_id, config.client_secret, config.robot_code,
                            retry_window=config.delivery_retry_window, secrets=config.secrets)
    client = CodeBuddyClient.from_config(config)
    manager = AsyncTaskManager.from_config(config, client, sender, SQLiteTaskStore(config.task_db))
    return sender, client, manager, ChatApp(manager, config)


def run_daemon(config: Config) -> int:
    """Run the bot until SIGTERM/SIGINT."""
    import ops

    os.environ["DINGTALK_OPENAPI_ENDPOINT"] = config.openapi_endpoint  # the SDK reads it at import
    sender, client, manager, app = build_app(config)
    durations = ops.DurationHistogram()
    manager.client = ops.TimedClient(client, durations)  # every run's duration feeds /metrics
    log.info("启动 DingTalk CodeBuddy 机器人: workers=%d, sync_timeout=%.0fs, task_timeout=%.0fs, cli=%s",
             config.max_workers, config.sync_timeout, config.task_timeout, config.codebuddy_bin)
    manager.recover()
    manager.start()
    def on_data(data: dict) -> None:
        try:
            message = incoming_from_callback(data)
        except ValueError as exc:
            log.warning("忽略无法解析的机器人消息: %s", exc)
            return
        try:
            app.handle(message)
        except Exception:
            log.exception("处理消息失败 msgId=%s user=%s", message.msg_id, message.user_id)

    intake = Intake(on_data, manager.store.batch)  # one thread keeps message order
    stream = StreamConnection(config, intake, idle_timeout=config.stream_idle_timeout)
    notifier = ops.SystemdNotifier.from_environ(os.environ)  # sd_notify; a no-op outside systemd
    status_server = ops.start_status_server(config.status_port, ops.StatusSources(
        manager=manager, sender=sender, client=client, stream=stream, task_db=config.task_db, durations=durations))

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            notifier.stopping()
            stream.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        supervisor = asyncio.create_task(ops.notify_systemd(notifier, lambda: stream.connected))
        await stream.run()
        supervisor.cancel()

    asyncio.run(main())
    log.info("收到停止信号，停止接收新消息，等待运行中的任务 (最多 %.0f 秒)", config.shutdown_grace)
    intake.shutdown()  # messages already ACKed become queued tasks, re-run after the restart
    manager.shutdown(config.shutdown_grace)
    sender.stop()
    if status_server is not None:
        status_server.stop()
    log.info("机器人已停止")
    logging.shutdown()
    return 0


def sandbox_ready(config: Config) -> bool:
    """Probe the sandbox every run starts in, once; False (after saying why on stderr and in the log) if it fails."""
    from codebuddy_client import sandbox_from_config

    sandbox = sandbox_from_config(config, config.codebuddy_bin)
    problem = sandbox.probe()
    if problem:
        message = f"配置错误: CodeBuddy 沙箱不可用 (CODEBUDDY_SANDBOX={sandbox.name}): {problem}"
        print(message, file=sys.stderr)
        log.error(message)
        return False
    if sandbox.name == "none":
        log.warning("CODEBUDDY_SANDBOX=none: CodeBuddy 运行未隔离 (runs are not isolated): every chat user can make "
                    "the agent read and write whatever this Unix user can, .env included")
    else:
        log.info("CodeBuddy 沙箱: %s (每个会话独立的工作区，系统目录只读)", sandbox.name)
    return True


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command (the daemon when none is given); returns the exit code."""
    import ops
    from async_task_manager import STATUS_LABELS

    parser = argparse.ArgumentParser(
        prog="bot.py", description="DingTalk ⇄ CodeBuddy bot. Settings come from .env and the environment "
        "(the environment wins); README.md lists them all.")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    commands.add_parser("run", help="run the daemon: connect to DingTalk Stream and answer messages (default)",
                        description="Run the daemon until SIGTERM/SIGINT. Under systemd (Type=notify) it sends "
                        "READY=1, WATCHDOG=1 and STOPPING=1; STATUS_PORT serves /healthz and /metrics.")
    commands.add_parser("check", help="doctor: show the settings, test the DingTalk credentials, the CLI and "
                        "the writable paths (exit 0 only if all pass)",
                        description="Print every setting (secrets masked) and one ✓/✗ line per check: "
                        "configuration, DingTalk access token, Stream gateway, CODEBUDDY_BIN --version, "
                        "workspace, task DB and log file writable. Exit 0 only if every check passes.")
    tasks = commands.add_parser("tasks", help="table of tasks from the task DB (TASK_DB)",
                                description="Print the newest tasks from the SQLite task DB, newest first.")
    tasks.add_argument("--user", metavar="ID", help="only this user's tasks (staff id)")
    tasks.add_argument("--status", choices=list(STATUS_LABELS), help="only tasks with this status")
    tasks.add_argument("--limit", metavar="N", type=ops.positive_int, default=20, help="at most N rows (20)")
    tasks.add_argument("--db", metavar="PATH", help="task DB file (default: TASK_DB)")
    console = commands.add_parser("console", help="chat with the bot in this terminal, no DingTalk needed",
                                  description="Each line of stdin goes through the same commands, routing, task "
                                  "manager and CodeBuddy CLI (CODEBUDDY_BIN) as a DingTalk 1:1 message; what the "
                                  "chat would show is printed. Tasks are kept in memory only. End of input "
                                  "waits for running tasks, then exits.")
    console.add_argument("--user", metavar="ID", default="console",
                         help="the staff id you chat as (default: console; must be in ALLOWED_USERS if set)")
    args = parser.parse_args(argv)
    command = args.command or "run"
    if command == "check":
        return ops.run_check(os.environ)
    try:
        config = load_config() if command == "run" else ops.load_local_config(os.environ)
    except ConfigError as exc:
        print(f"配置错误: {exc}", file=sys.stderr)
        return 2
    if command == "tasks":
        return ops.print_tasks(args.db or config.task_db, user=args.user, status=args.status, limit=args.limit)
    handler = setup_logging(config.log_file, config.log_level, config.secrets)
    if not sandbox_ready(config):
        return 2
    if command == "console":
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)  # log lines on the terminal would drown the chat
        return ops.run_console(config, ChatApp, IncomingMessage, user_id=args.user)
    return run_daemon(config)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leftover non-daemon pool threads must not delay a systemd stop
