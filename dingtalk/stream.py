"""The DingTalk Stream connections: our own connect/receive loops around the SDK's frame routing and ACKs.

DingTalk pushes a bot message once, to one live connection of the app chosen at random, and drops it when there
is none (docs/wire-facts.md §8). So the process holds `STREAM_CONNECTIONS` connections, each with its own loop
and backoff: on a `disconnect` frame, or after `STREAM_IDLE_TIMEOUT` without any frame, a connection opens its
replacement at once and only then lets the old socket go; meanwhile the other connection still receives.
Every bot message goes to the one intake thread (dingtalk/intake.py), which drops a msgId it has seen, and is
ACKed on the socket it came in on as soon as it is recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import quote_plus

import websockets
import websockets.exceptions  # the SDK uses websockets.exceptions without importing it (docs/wire-facts.md §1)

from config import HTTP_TIMEOUT, Config
from dingtalk.intake import Intake, settle
from dingtalk.json_http import BOT_TOPIC, JsonHttp, describe_network_error, open_stream_connection

log = logging.getLogger("bot")
sdk_log = logging.getLogger("stream")  # the SDK's own lines (route_message)

INTAKE_ACK_WAIT = 2.0  # seconds a frame's ACK waits for the message to be recorded
# A socket told `disconnect` may still deliver for a moment; the gateway drops it ~10 s later (wire-facts §1).
DRAIN_SECONDS = 10.0


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


class _QuietPings(logging.Filter):
    """The SDK logs every keepalive ping as an "unknown message topic" warning: one line per ping and connection."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.args, tuple) and record.args[:1] == ("ping",))


sdk_log.addFilter(_QuietPings())


@dataclass(eq=False)
class _Socket:
    """One websocket of connection `number`, with an SDK client of its own: the SDK sends each ACK on
    `client.websocket`, so an ACK goes back on the socket its frame came in on."""

    number: int
    websocket: Any
    client: Any
    opened: float
    last_frame: float
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # told `disconnect`, or replaced
    frames_after_leaving: int = 0
    reader: asyncio.Task | None = None


class StreamConnections:
    """The process's DingTalk Stream connections: `count` connect/receive loops sharing one intake.

    Owning the loops works around the SDK's defects (docs/wire-facts.md §1): connection-open runs off the
    event loop with a timeout, reconnects back off with jitter, a watchdog replaces a silent socket, and
    stop() works.
    """

    def __init__(self, config: Config, intake: Intake, *, count: int = 2, idle_timeout: float,
                 drain_seconds: float = DRAIN_SECONDS, backoff_max: float = 60.0,
                 topics: tuple[str, ...] = (BOT_TOPIC,), callbacks: Mapping[str, object] | None = None) -> None:
        stream_sdk = sdk()
        self.config = config
        self.idle_timeout = idle_timeout
        self.drain_seconds = drain_seconds
        self.backoff_max = backoff_max
        self.topics = topics
        self._credential = stream_sdk.Credential(config.client_id, config.client_secret)
        # other topics' handlers: AI card clicks (cards/actions.py)
        self._handlers = {BOT_TOPIC: _stream_handler_class()(intake), **(callbacks or {})}
        self._sdk_client(None).pre_start()  # the handlers' one-time set-up
        self._stop = asyncio.Event()
        self._opener = ThreadPoolExecutor(max_workers=count, thread_name_prefix="stream-open")
        self._background: set[asyncio.Task] = set()  # frames being routed, sockets being let go
        self.connections = [_Connection(self, number) for number in range(1, count + 1)]

    # ---------------------------------------------------------------- state, read by /healthz and /metrics

    @property
    def wanted(self) -> int:
        """How many connections this process keeps (STREAM_CONNECTIONS)."""
        return len(self.connections)

    @property
    def live(self) -> int:
        """How many connections can receive a message now (open, not told to leave)."""
        return sum(connection.live for connection in self.connections)

    @property
    def connected(self) -> bool:
        return self.live > 0

    @property
    def reconnects(self) -> int:
        return sum(connection.reconnects for connection in self.connections)

    # ---------------------------------------------------------------- running

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """Run every connection until stop(); then close the sockets still being let go."""
        await asyncio.gather(*(connection.run() for connection in self.connections))
        if self._background:
            await asyncio.wait(set(self._background), timeout=5)

    def _sdk_client(self, websocket: Any):
        stream_sdk = sdk()
        client = stream_sdk.DingTalkStreamClient(self._credential, logger=sdk_log)
        for topic, handler in self._handlers.items():
            client.register_callback_handler(topic, handler)
        client.websocket = websocket
        return client

    def _open_connection(self, number: int) -> dict | None:
        http = JsonHttp(pool_size=1, transport_retries=0)
        try:
            connection, error = open_stream_connection(http, self.config.openapi_endpoint, self.config.client_id,
                                                       self.config.client_secret, topics=self.topics)
        finally:
            http.close()
        if connection is None:
            log.error("连接钉钉 Stream 失败: %s [连接 %d]", error, number)
        return connection

    async def _open(self, number: int) -> _Socket | None:
        """A new socket for connection `number`, reading frames; None when it failed (logged) or stop() came."""
        # Not asyncio.to_thread: asyncio.run() joins the default executor, so a hung request would
        # hold up the shutdown; this executor is left behind (the process ends with os._exit).
        opening = asyncio.get_running_loop().run_in_executor(self._opener, self._open_connection, number)
        connection = await self._unless_stopped(opening)
        if connection is None:
            return None
        uri = f"{connection['endpoint']}?ticket={quote_plus(connection['ticket'])}"
        try:
            websocket = await self._unless_stopped(websockets.connect(
                uri, open_timeout=HTTP_TIMEOUT[1], close_timeout=2, max_size=16 * 1024 * 1024))
        except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
            log.warning("钉钉 Stream 连接中断: %s [连接 %d]", describe_network_error(connection["endpoint"], exc),
                        number)
            return None
        if websocket is None:
            return None
        now = time.monotonic()
        sock = _Socket(number, websocket, self._sdk_client(websocket), opened=now, last_frame=now)
        sock.reader = asyncio.create_task(self._read(sock))
        return sock

    async def _unless_stopped(self, awaitable):
        """Await `awaitable`, or give up on it (None) as soon as stop() is called."""
        work = asyncio.ensure_future(awaitable)
        stop_wait = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({work, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if not work.done():
            work.cancel()
            return None
        return work.result()

    async def _sleep_or_stop(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds)
        except TimeoutError:
            pass

    # ---------------------------------------------------------------- frames

    async def _read(self, sock: _Socket) -> str:
        """Route frames until the socket closes; returns how it ended, for the log."""
        try:
            async for raw in sock.websocket:
                sock.last_frame = time.monotonic()
                if sock.leaving.is_set():
                    sock.frames_after_leaving += 1
                try:
                    frame = json.loads(raw)
                    if not isinstance(frame, dict):
                        raise ValueError("frame is not an object")
                except ValueError:
                    log.warning("忽略无法解析的 Stream 消息 (%d 字节)", len(raw))
                    continue
                self._in_background(self._route(frame, sock))
        except websockets.exceptions.ConnectionClosed as exc:
            return f"the gateway closed the websocket ({exc})"
        except (TimeoutError, OSError, websockets.exceptions.WebSocketException) as exc:
            return f"{type(exc).__name__}: {exc}"
        return f"the gateway closed the websocket ({sock.websocket.close_code} {sock.websocket.close_reason or ''})"

    def _in_background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _route(self, frame: dict, sock: _Socket) -> None:
        AckMessage = sdk().AckMessage  # noqa: N806 (the SDK's class)
        try:
            result = await sock.client.route_message(frame)
            if result == sock.client.TAG_DISCONNECT:
                sock.leaving.set()  # its connection opens the replacement now (_Connection._serve)
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
                    await sock.websocket.send(json.dumps(ack.to_dict()))
                except Exception:
                    pass  # the socket is gone; its connection opens another

    # ---------------------------------------------------------------- letting a socket go

    def _let_go(self, sock: _Socket) -> None:
        """Keep reading `sock` until it closes or `drain_seconds` pass (a message may still come), then close it."""
        sock.leaving.set()
        self._in_background(self._drain(sock))

    async def _drain(self, sock: _Socket) -> None:
        stop_wait = asyncio.ensure_future(self._stop.wait())
        assert sock.reader is not None
        try:
            await asyncio.wait({sock.reader, stop_wait}, timeout=self.drain_seconds,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            how = ("网关已关闭" if sock.reader.done() else "停止时关闭" if self.stopping
                   else f"等了 {self.drain_seconds:.0f} 秒后关闭")
            await sock.websocket.close()
            await asyncio.wait({sock.reader}, timeout=5)
        log.info("钉钉 Stream 旧连接已放开 [连接 %d] (%s；离开后又收到 %d 帧)", sock.number, how,
                 sock.frames_after_leaving)


def _ending(reader: asyncio.Task) -> str:
    """Why a finished reader stopped, for the log."""
    if reader.cancelled():
        return "cancelled"
    error = reader.exception()
    return reader.result() if error is None else f"{type(error).__name__}: {error}"


class _Connection:
    """Connection number `number` of the process: open a socket, receive, replace it; one live socket at a time."""

    def __init__(self, streams: StreamConnections, number: int) -> None:
        self.streams = streams
        self.number = number
        self.socket: _Socket | None = None
        self.reconnects = 0

    @property
    def live(self) -> bool:
        sock = self.socket
        return sock is not None and not sock.leaving.is_set() and sock.reader is not None and not sock.reader.done()

    async def run(self) -> None:
        """Connect and receive until stop(); a replacement opens at once, a failure backs off with jitter."""
        streams = self.streams
        attempt = 0
        while not streams.stopping:
            try:
                sock = await streams._open(self.number)
                if sock is not None:
                    attempt = 0
                    self.socket = sock
                    log.info("钉钉 Stream 已连接 [连接 %d] (在线 %d/%d)", self.number, streams.live, streams.wanted)
                    if await self._serve(sock) == "replaced":
                        self.reconnects += 1
                        continue
            except Exception:  # a bug here must not end this connection's loop, nor the others'
                log.exception("钉钉 Stream 连接出错 [连接 %d]", self.number)
            if streams.stopping:
                break
            attempt += 1
            self.reconnects += 1
            delay = min(streams.backoff_max, 2 ** min(attempt - 1, 10)) * random.uniform(0.5, 1.0)
            log.info("%.1f 秒后重新连接钉钉 Stream [连接 %d] (第 %d 次)", delay, self.number, attempt)
            await streams._sleep_or_stop(delay)

    async def _serve(self, sock: _Socket) -> str:
        """Wait until `sock` is told to leave or is silent for `idle_timeout` ("replaced": the old socket is let go,
        still read for a moment), closes ("dropped") or stop() is called ("stopped")."""
        streams = self.streams
        assert sock.reader is not None
        stop_wait = asyncio.ensure_future(streams._stop.wait())
        leave_wait = asyncio.ensure_future(sock.leaving.wait())
        try:
            while True:
                if stop_wait.done():
                    await sock.websocket.close()
                    return "stopped"
                if leave_wait.done():
                    log.info("钉钉 Stream 要求断开 [连接 %d]，立即打开新连接 (旧连接最多再收 %.0f 秒)", self.number,
                             streams.drain_seconds)
                    streams._let_go(sock)
                    return "replaced"
                if sock.reader.done():
                    log.warning("钉钉 Stream 连接中断: %s [连接 %d，连了 %.1f 秒，在线 %d/%d]", _ending(sock.reader),
                                self.number, time.monotonic() - sock.opened, streams.live, streams.wanted)
                    return "dropped"
                quiet = time.monotonic() - sock.last_frame
                if quiet >= streams.idle_timeout:
                    log.warning("钉钉 Stream [连接 %d] %.0f 秒没有任何消息，重新连接 (先连新的，再放开旧的)",
                                self.number, quiet)
                    streams._let_go(sock)
                    return "replaced"
                await asyncio.wait({sock.reader, stop_wait, leave_wait}, timeout=streams.idle_timeout - quiet,
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            leave_wait.cancel()
            if self.socket is sock:
                self.socket = None
