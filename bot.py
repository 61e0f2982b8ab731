"""DingTalk ⇄ CodeBuddy bot: the entry point — the DingTalk Stream transport, the wiring and the command line.

Where a message goes:
  DingTalk Stream frame → `StreamConnection` (own connect/receive loop, here)
  → `BotStreamHandler.process` hands the frame to the intake thread (dingtalk/intake.py), ACKs once it is recorded (ms)
  → `incoming_from_callback` turns it into the neutral `IncomingMessage`
  → `ChatApp.handle` (chat/app.py): access checks, rate limit, dedup, chat commands
  → `AsyncTaskManager.submit` (async_task_manager.py): acknowledgement, queue, CLI run, delivery
  → `CodeBuddyClient.run` (codebuddy_client.py) and `DingTalkSender.send` (dingtalk_sender.py).

Run `python bot.py --help` for the commands; README.md's "How a message flows" has the whole house.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from urllib.parse import quote_plus

import ops.dependencies  # noqa: F401  (first: a missing package is one line saying to install, not a traceback)

import websockets
import websockets.exceptions  # the SDK uses websockets.exceptions without importing it (docs/wire-facts.md §1)

from async_task_manager import AsyncTaskManager
from cards.wiring import CARD_CALLBACK_TOPIC, attach_budget_and_cards, card_handler, card_topics
from chat import console
from chat.app import ChatApp, IncomingMessage
from cluster.hosts import host_name, join_cluster, open_task_store
from codebuddy_client import CodeBuddyClient
from common.logs import log_destination, output_handlers, setup_logging, stop_logging
from common.supervision import install_exception_hooks
from config import (
    HTTP_TIMEOUT,
    Config,
    ConfigError,
    load_config,
    read_config,
    setting_default,
)
from dingtalk.intake import Intake, settle
from dingtalk_sender import BOT_TOPIC, DingTalkSender, JsonHttp, describe_network_error, open_stream_connection
from files.attachments import attachment_refs
from files.wiring import with_file_transfer
from ops import (
    command_line,
    doctor,
    health,
    systemd_notify,
    task_table,
)
from ops.metrics import DurationHistogram, TimedClient
from ops.startup import config_failure, load_local_config, report_cli, sandbox_problem
from ops.status_server import StatusSources, start_status_server
from ops.store_admin import migrate_store
from store.task_store import StoreError

__all__ = ["main", "run_daemon", "setup_logging"]

log = logging.getLogger("bot")

INTAKE_ACK_WAIT = 2.0  # seconds a frame's ACK waits for the message to be recorded


def _sdk() -> ModuleType:
    """The DingTalk Stream SDK, imported on first use.

    The one import inside a function: the SDK reads DINGTALK_OPENAPI_ENDPOINT once, at import
    (docs/wire-facts.md §1), and `run_daemon` sets it from the settings first.
    """
    import dingtalk_stream

    return dingtalk_stream


# ---------------------------------------------------------------- the transport: frames in


def incoming_from_callback(data: dict) -> IncomingMessage:
    """Turn a bot-message callback's `data` into an `IncomingMessage` (raises ValueError if malformed)."""
    if not isinstance(data, dict):
        raise ValueError("callback data is not an object")
    try:
        message = _sdk().ChatbotMessage.from_dict(data)
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
        attachments=attachment_refs(data),  # from the raw data: the SDK parses only picture and richText
    )


# ---------------------------------------------------------------- the stream transport


def _stream_handler_class():
    """The SDK handler class, built lazily so the SDK is imported after the endpoint is set."""
    sdk = _sdk()

    class BotStreamHandler(sdk.ChatbotHandler):
        """Hands every bot message to the intake thread and ACKs it as soon as it is recorded."""

        def __init__(self, intake: Intake) -> None:
            super().__init__()
            self.intake = intake

        async def process(self, callback):
            # ACK once the message is recorded as a task (milliseconds), so a crash right after the ACK
            # loses nothing; a stuck intake must not hold the ACK back for long.
            loop = asyncio.get_running_loop()
            recorded = loop.create_future()
            timer = loop.call_later(INTAKE_ACK_WAIT, settle, recorded, False)
            self.intake.submit(callback.data, loop, recorded)
            if not await recorded:
                log.warning("消息处理较慢，先行确认 (ACK) 收到")
            timer.cancel()
            return sdk.AckMessage.STATUS_OK, "OK"

    return BotStreamHandler


class StreamConnection:
    """Our own connect/receive loop around the SDK's frame routing and ACKs.

    Owning the loop fixes the SDK's defects (docs/wire-facts.md §1): connection-open runs off the event loop with a
    timeout, reconnects back off with jitter, a watchdog reconnects a silent socket, and stop() works.
    """

    def __init__(self, config: Config, intake: Intake, *,
                 idle_timeout: float, backoff_max: float = 60.0, on_card: object = None) -> None:
        dingtalk_stream = _sdk()
        self.config = config
        self.idle_timeout = idle_timeout
        self.backoff_max = backoff_max
        self.client = dingtalk_stream.DingTalkStreamClient(
            dingtalk_stream.Credential(config.client_id, config.client_secret), logger=logging.getLogger("stream"))
        self.client.register_callback_handler(BOT_TOPIC, _stream_handler_class()(intake))
        if on_card is not None:  # the stop button of AI cards (cards/actions.py)
            self.client.register_callback_handler(CARD_CALLBACK_TOPIC, on_card)
        self.client.pre_start()
        self.connected = False
        self.reconnects = 0
        self._stop = asyncio.Event()
        self._opener = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-open")

    def stop(self) -> None:
        self._stop.set()

    def _open_connection(self) -> dict | None:
        http = JsonHttp(pool_size=1, transport_retries=0)
        try:
            connection, error = open_stream_connection(http, self.config.openapi_endpoint, self.config.client_id,
                                                       self.config.client_secret, topics=card_topics(self.config))
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
                except websockets.exceptions.ConnectionClosed as exc:
                    log.warning("钉钉 Stream 连接中断: the gateway closed the websocket (%s)", exc)
                except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
                    log.warning("钉钉 Stream 连接中断: %s", describe_network_error(connection["endpoint"], exc))
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
        AckMessage = _sdk().AckMessage  # noqa: N806 (the SDK's class)
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


def build_app(config: Config, durations: DurationHistogram | None = None
              ) -> tuple[DingTalkSender, TimedClient, AsyncTaskManager, ChatApp]:
    """Create the sender, client (its runs timed into `durations`), store, manager and chat app from `config`."""
    sender = DingTalkSender(config.openapi_endpoint, config.client_id, config.client_secret, config.robot_code,
                            retry_window=config.delivery_retry_window, secrets=config.secrets)
    client, after_result, attachments = with_file_transfer(config, sender, CodeBuddyClient.from_config(config))
    client = TimedClient(client, durations or DurationHistogram())
    manager = AsyncTaskManager.from_config(config, client, sender, open_task_store(config), after_result)
    attach_budget_and_cards(config, sender, manager)  # the monthly call budget; AI cards when a template is set
    return sender, client, manager, ChatApp(manager, config, attachments=attachments)


def run_daemon(config: Config) -> int:
    """Run the bot until SIGTERM/SIGINT."""
    os.environ["DINGTALK_OPENAPI_ENDPOINT"] = config.openapi_endpoint  # the SDK reads it at import
    durations = DurationHistogram()  # every run's duration feeds /metrics
    sender, client, manager, app = build_app(config, durations)
    print(log_destination(), file=sys.stderr, flush=True)  # after the store opened: a start-up fault stays one line
    log.info("启动 DingTalk CodeBuddy 机器人: workers=%d, sync_timeout=%.0fs, task_timeout=%.0fs, cli=%s",
             config.max_workers, config.sync_timeout, config.task_timeout, client.binary)
    client.start()  # kills CLI processes a crash of this bot left behind; ends idle warm ones from now on
    join_cluster(config, manager)  # recover this host's tasks; with PostgreSQL, share them with the other hosts
    client.files.resume(manager.get_task)  # files staged for answers delivered just before the bot stopped
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

    # One thread keeps message order; a batch's ACKs wait for its records to be written (or the store to be down).
    intake = Intake(on_data, lambda: manager.store.wait_written(INTAKE_ACK_WAIT), supervisor=manager.supervisor)
    stream = StreamConnection(config, intake, idle_timeout=config.stream_idle_timeout,
                              on_card=card_handler(config, manager))
    notifier = systemd_notify.SystemdNotifier.from_environ(os.environ)  # sd_notify; a no-op outside systemd
    status_server = start_status_server(config.status_port, StatusSources(
        manager=manager, sender=sender, client=client, stream=stream, store=manager.store,
        supervisor=manager.supervisor, intake=intake, durations=durations, host=host_name(config.host_name)))

    def core_alive() -> bool:  # a dead core thread stops the watchdog pings, and systemd restarts the bot
        return not health.core_problems(manager.supervisor, intake)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def stop() -> None:
            notifier.stopping()
            stream.stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        watchdog = asyncio.create_task(systemd_notify.notify_systemd(notifier, lambda: stream.connected,
                                                                     alive=core_alive))
        await stream.run()
        watchdog.cancel()

    asyncio.run(main())
    log.info("收到停止信号，停止接收新消息，等待运行中的任务 (最多 %.0f 秒)", config.shutdown_grace)
    manager.supervisor.stop()
    intake.shutdown()  # messages already ACKed become queued tasks, re-run after the restart
    manager.shutdown(config.shutdown_grace)
    sender.stop()
    if status_server is not None:
        status_server.stop()
    log.info("机器人已停止")
    stop_logging()
    logging.shutdown()
    return 0


# ---------------------------------------------------------------- the command line


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one command (the daemon when none is given); returns the exit code."""
    args = command_line.build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "check":
        return doctor.run_check(os.environ)
    if command == "tasks":  # reads the task DB only: a half-filled .env does not stop it
        config = read_config(os.environ)[0]
        try:
            return task_table.print_tasks(args.db or config.task_db, user=args.user, status=args.status,
                                          limit=args.limit)
        except StoreError as exc:
            return startup_failure(f"任务数据库无法打开: {exc}")
    if command == "migrate-store":  # needs the target only: a half-filled .env does not stop it
        return migrate_store(args.sqlite_path, args.to or read_config(os.environ)[0].task_db)
    try:
        config = load_config() if command == "run" else load_local_config(os.environ)
    except ConfigError as exc:
        if command == "run":  # the operator greps the log: the reason goes there too
            setup_logging(os.environ.get("LOG_FILE") or setting_default("LOG_FILE"), "INFO")
        return startup_failure(config_failure(exc))
    # On a terminal the log lines show there too; the console shows only warnings (lines would drown the chat).
    handler = setup_logging(config.log_file, config.log_level, config.secrets, echo=sys.stderr.isatty(),
                            writer_thread=command == "run",
                            echo_level="WARNING" if command == "console" else "DEBUG")
    install_exception_hooks()
    problem = sandbox_problem(config)
    if problem:
        return startup_failure(problem)
    report_cli(config)
    if command == "console":
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
        print(log_destination(), file=sys.stderr, flush=True)
        return console.run_console(config, user_id=args.user)
    try:
        return run_daemon(config)
    except StoreError as exc:
        return startup_failure(f"任务数据库无法打开: {exc}")


def startup_failure(message: str) -> int:
    """A start-up error: one message on stderr and one line in the log; exit code 2 (systemd does not restart)."""
    to_file = any(isinstance(handler, logging.FileHandler) for handler in output_handlers())
    if not (to_file and _logs_to_stderr()):  # a terminal that echoes the log shows the logged line instead
        print(message, file=sys.stderr)
    if to_file:
        log.error(message)
    return 2


def _logs_to_stderr() -> bool:
    return any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
               and getattr(h, "stream", None) is sys.stderr for h in output_handlers())


if __name__ == "__main__":
    code = main()
    stop_logging()  # the log writer thread's last lines reach the file before os._exit
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # leftover non-daemon pool threads must not delay a systemd stop
