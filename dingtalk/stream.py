"""The DingTalk Stream connection: our own connect/receive loop around the SDK's frame routing and ACKs.

Every bot message goes to the intake thread (dingtalk/intake.py) and is ACKed as soon as it is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from urllib.parse import quote_plus

import websockets
import websockets.exceptions  # the SDK uses websockets.exceptions without importing it (docs/wire-facts.md §1)

from config import HTTP_TIMEOUT, Config
from dingtalk.intake import Intake, settle
from dingtalk.json_http import BOT_TOPIC, JsonHttp, describe_network_error, open_stream_connection

log = logging.getLogger("bot")

INTAKE_ACK_WAIT = 2.0  # seconds a frame's ACK waits for the message to be recorded


def sdk() -> ModuleType:
    """The DingTalk Stream SDK, imported on first use.

    The one import inside a function: the SDK reads DINGTALK_OPENAPI_ENDPOINT once, at import
    (docs/wire-facts.md §1), and bot.py's `run_daemon` sets it from the settings first.
    """
    import dingtalk_stream

    return dingtalk_stream


def _stream_handler_class():
    """The SDK handler class, built lazily so the SDK is imported after the endpoint is set."""
    stream_sdk = sdk()

    class BotStreamHandler(stream_sdk.ChatbotHandler):
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
            return stream_sdk.AckMessage.STATUS_OK, "OK"

    return BotStreamHandler


class StreamConnection:
    """Our own connect/receive loop around the SDK's frame routing and ACKs.

    Owning the loop fixes the SDK's defects (docs/wire-facts.md §1): connection-open runs off the event loop with a
    timeout, reconnects back off with jitter, a watchdog reconnects a silent socket, and stop() works.
    """

    def __init__(self, config: Config, intake: Intake, *, idle_timeout: float, backoff_max: float = 60.0,
                 topics: tuple[str, ...] = (BOT_TOPIC,), callbacks: Mapping[str, object] | None = None) -> None:
        dingtalk_stream = sdk()
        self.config = config
        self.idle_timeout = idle_timeout
        self.backoff_max = backoff_max
        self.client = dingtalk_stream.DingTalkStreamClient(
            dingtalk_stream.Credential(config.client_id, config.client_secret), logger=logging.getLogger("stream"))
        self.client.register_callback_handler(BOT_TOPIC, _stream_handler_class()(intake))
        for topic, handler in (callbacks or {}).items():  # other topics' handlers (AI card clicks: cards/actions.py)
            self.client.register_callback_handler(topic, handler)
        self.topics = topics
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
                                                       self.config.client_secret, topics=self.topics)
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
        AckMessage = sdk().AckMessage  # noqa: N806 (the SDK's class)
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
