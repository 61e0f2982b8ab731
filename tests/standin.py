"""A local DingTalk stand-in: Stream gateway, OpenAPI and session webhooks on 127.0.0.1.

One `DingTalkStandin` runs an aiohttp server (HTTP and websocket on one random port) in a
background thread with its own event loop. Tests drive it from their own threads: they push bot
messages down the stream, inject faults, and assert on every HTTP request the bot made.
Wire shapes follow docs/wire-facts.md; values marked "unverified" there are best guesses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSMsgType, web

from tests.standin_files import DOWNLOAD_PATH, FILE_MESSAGE_KEYS, UPLOAD_PATH, FileRoutes

T = TypeVar("T")

BOT_TOPIC = "/v1.0/im/bot/messages/get"
OPEN_PATH = "/v1.0/gateway/connections/open"
CONNECT_PATH = "/connect"
TOKEN_PATH = "/v1.0/oauth2/accessToken"
BATCH_SEND_PATH = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND_PATH = "/v1.0/robot/groupMessages/send"
WEBHOOK_PATH = "/robot/sendBySession"
# Every call DingTalk meters (docs/wire-facts.md §7): pushes, card calls, and the file download and upload calls.
METERED_PATHS = frozenset({BATCH_SEND_PATH, GROUP_SEND_PATH, DOWNLOAD_PATH, UPLOAD_PATH,
                           "/v1.0/card/instances/createAndDeliver", "/v1.0/card/streaming", "/v1.0/card/instances"})

MAX_BATCH_USERS = 20
# msgParam limit documented for group pushes; applied to 1:1 pushes too, to be safe.
MAX_MSG_PARAM_BYTES = 15_000
# Webhook replies: real servers answer errcode 460101 "message too long, exceed 20000 bytes".
MAX_WEBHOOK_BYTES = 20_000
WEBHOOK_TOO_LONG = {"errcode": 460101, "errmsg": "message too long, exceed 20000 bytes"}
WEBHOOK_NO_SESSION = {"errcode": 300001, "errmsg": "session 不存在"}
REQUIRED_MSG_PARAM_KEYS = {
    "sampleText": ("content",),
    "sampleMarkdown": ("title", "text"),
    "sampleActionCard": ("title", "text", "singleTitle", "singleURL"),
    **FILE_MESSAGE_KEYS,
}


@dataclass
class Recorded:
    """One HTTP request the stand-in received, with the status it answered."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: Any  # decoded JSON (normally a dict), or None when absent or not JSON
    time: float  # time.monotonic() when the request arrived
    status: int
    faulted: bool = False
    response: Any = None  # decoded JSON response body, when there was one
    raw_body: str = ""

    @property
    def session(self) -> str | None:
        """Session id of a webhook post."""
        return self.query.get("session")

    @property
    def msg_param(self) -> dict[str, Any] | None:
        """Decoded `msgParam` of an OpenAPI push, or None."""
        if not isinstance(self.body, dict) or not isinstance(self.body.get("msgParam"), str):
            return None
        try:
            value = json.loads(self.body["msgParam"])
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    @property
    def msg_key(self) -> str | None:
        """`msgKey` of an OpenAPI push."""
        return self.body.get("msgKey") if isinstance(self.body, dict) else None

    @property
    def msgtype(self) -> str | None:
        """`msgtype` of a webhook post."""
        return self.body.get("msgtype") if isinstance(self.body, dict) else None

    @property
    def text(self) -> str | None:
        """The visible text: webhook text/markdown body, or push msgParam content/text."""
        body = self.body if isinstance(self.body, dict) else {}
        if body.get("msgtype") == "text":
            return (body.get("text") or {}).get("content")
        if body.get("msgtype") == "markdown":
            return (body.get("markdown") or {}).get("text")
        param = self.msg_param or {}
        return param.get("content", param.get("text"))

    @property
    def title(self) -> str | None:
        """Markdown title of a webhook post or push."""
        body = self.body if isinstance(self.body, dict) else {}
        if body.get("msgtype") == "markdown":
            return (body.get("markdown") or {}).get("title")
        return (self.msg_param or {}).get("title")

    @property
    def user_ids(self) -> list[str]:
        """`userIds` of a batchSend."""
        body = self.body if isinstance(self.body, dict) else {}
        return list(body.get("userIds") or [])

    @property
    def delivered_user_ids(self) -> list[str]:
        """Users of a batchSend that were neither flow-controlled nor invalid."""
        if self.status != 200 or self.faulted or not isinstance(self.response, dict):
            return []
        skipped = set(self.response.get("flowControlledStaffIdList") or [])
        skipped |= set(self.response.get("invalidStaffIdList") or [])
        return [u for u in self.user_ids if u not in skipped]

    @property
    def open_conversation_id(self) -> str | None:
        """`openConversationId` of a group push."""
        return self.body.get("openConversationId") if isinstance(self.body, dict) else None

    def summary(self) -> str:
        """One line for failure messages."""
        flag = " FAULTED" if self.faulted else ""
        shown = self.raw_body if len(self.raw_body) <= 160 else self.raw_body[:157] + "..."
        query = "?" + "&".join(f"{k}={v}" for k, v in self.query.items()) if self.query else ""
        return f"{self.time:.3f} {self.path}{query} -> {self.status}{flag} {shown}"


@dataclass
class SentMessage:
    """A bot message pushed down the stream."""

    msg_id: str
    frame_message_id: str
    session: str  # the session webhook's id
    webhook_url: str
    sent_at: float  # time.monotonic()
    payload: dict[str, Any]
    connection_id: str | None = None  # the connection it went down; None: dropped (no live connection)


@dataclass
class _Fault:
    status: int
    body: Any
    headers: dict[str, str]
    times: int


@dataclass
class _Session:
    expires_ms: int
    delay: float = 0.0


@dataclass
class _Stream:
    ws: web.WebSocketResponse
    request: web.Request
    connection_id: str
    closed: bool = False  # gets no more frames: told to leave, dropped, or silent
    silent: bool = False  # stopped without a word: the socket stays open, nothing (not even a ping) comes


@dataclass
class _State:
    """Everything shared between the server loop and test threads (guarded by one lock)."""

    tickets: set[str] = field(default_factory=set)
    tokens: dict[str, float] = field(default_factory=dict)  # token -> monotonic expiry
    sessions: dict[str, _Session] = field(default_factory=dict)
    faults: dict[str, list[_Fault]] = field(default_factory=dict)
    flow_controlled: dict[str, int] = field(default_factory=dict)
    invalid_staff: set[str] = field(default_factory=set)
    records: list[Recorded] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # paths of HTTP requests received and not yet answered
    acks: list[tuple[str | None, dict[str, Any], float]] = field(default_factory=list)
    ack_connections: dict[str, str] = field(default_factory=dict)  # frame message id -> connection its ACK came on


def poll_until(predicate: Callable[[], T], timeout: float, interval: float, describe: Callable[[], str]) -> T:
    """Poll `predicate()` until truthy and return its value; AssertionError(describe()) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(describe())
        time.sleep(interval)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _b64(seed: str, size: int = 16) -> str:
    return base64.b64encode(hashlib.sha256(seed.encode()).digest()[:size]).decode()


def _conversation_id(seed: str) -> str:
    """A stable DingTalk-looking conversation id, always with '+', '/' and '='."""
    raw = _b64(seed, 22)  # 32 chars, ends with "=="
    return f"cid{raw[:5]}+{raw[6:12]}/{raw[13:]}"


class DingTalkStandin:
    """Local DingTalk server: Stream gateway + OpenAPI + session webhooks, with recording."""

    def __init__(
        self,
        client_id: str = "test-client-id",
        client_secret: str = "test-client-secret",
        token_ttl: int = 7200,
        robot_code: str | None = None,
        webhook_max_bytes: int = MAX_WEBHOOK_BYTES,
        max_msg_param_bytes: int = MAX_MSG_PARAM_BYTES,
        fire_and_forget: bool = False,
        ping_interval: float | None = None,
        open_delay: float = 0.0,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.token_ttl = token_ttl
        self.robot_code = robot_code or client_id
        self.webhook_max_bytes = webhook_max_bytes
        self.max_msg_param_bytes = max_msg_param_bytes
        self.corp_id = "ding" + hashlib.sha256(client_id.encode()).hexdigest()[:16]
        self.chatbot_user_id = "$:LWCP_v1:$" + _b64("bot:" + client_id)
        self.connections_opened = 0  # successful connections/open calls (tickets issued)
        self.stream_connects = 0  # websockets accepted
        self.token_fetches = 0  # access tokens issued
        self.frames_sent = 0
        self._lock = threading.Lock()
        self._state = _State()
        self._global_webhook_delay = 0.0
        self._random_faults: dict[str, tuple[float, list[tuple[int, Any, dict[str, str]]], random.Random]] = {}
        self._streams: list[_Stream] = []
        # DingTalk with several connections on one app pushes each message to one of them at random (wire-facts §8);
        # False: only the newest live connection gets frames. `connection_id=` on send_bot_message picks one.
        self.several_connections = False
        # DingTalk as it is (wire-facts §8): a bot message goes to one live connection at random and is never
        # retried; with none live it is dropped (counted in `dropped`) instead of failing the test's send.
        self.fire_and_forget = fire_and_forget
        self.dropped: list[SentMessage] = []
        self.ping_interval = ping_interval  # seconds between SYSTEM pings to every live connection (None: none)
        self.open_delay = open_delay  # seconds connections/open takes to answer: the gap while a socket is replaced
        self.connection_rng = random.Random(16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._port = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.files = FileRoutes(self)  # pictures and files (tests/standin_files.py)
        # Hooks for stand-in extensions (tests/standin_cards.py): more routes by (method, path), and a gate every
        # OpenAPI request passes first (the monthly quota): it returns an error response, or None to go on.
        self.extra_routes: dict[tuple[str, str], Callable[..., Any]] = {}
        self.gate: Callable[[str], tuple[int, dict[str, Any]] | None] | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:PORT`, the value for DINGTALK_OPENAPI_ENDPOINT."""
        if not self._port:
            raise RuntimeError("stand-in not started")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> DingTalkStandin:
        """Start the server thread; returns self once it listens."""
        if self._thread:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve(sock))
            except BaseException as exc:  # surfaced to start()
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="dingtalk-standin", daemon=True)
        self._thread.start()
        if not ready.wait(10) or errors:
            raise RuntimeError(f"stand-in failed to start: {errors}")
        return self

    def stop(self) -> None:
        """Close every websocket, stop the server and its thread."""
        if not self._thread or not self._loop:
            return
        try:
            self._run(self._shutdown(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._thread = None

    def __enter__(self) -> DingTalkStandin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get(CONNECT_PATH, self._handle_connect)
        self.files.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self._handle_http)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()
        self._tasks.add(asyncio.get_running_loop().create_task(self._ping_forever()))

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for stream in list(self._streams):
            stream.closed = True
            await stream.ws.close()
        if self._runner:
            await self._runner.cleanup()

    def _run(self, coro: Any, timeout: float = 5.0) -> Any:
        if not self._loop or not self._thread:
            coro.close()
            raise RuntimeError("stand-in not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ---------------------------------------------------------------- recording

    @property
    def requests(self) -> list[Recorded]:
        """Snapshot of every HTTP request so far, in completion order."""
        with self._lock:
            return list(self._state.records)

    @property
    def acks(self) -> list[tuple[str | None, dict[str, Any], float]]:
        """Snapshot of ACK frames from clients: (frame message id, ack dict, monotonic time)."""
        with self._lock:
            return list(self._state.acks)

    def in_flight(self, path: str) -> int:
        """How many requests to `path` the stand-in has received and not answered yet (a delayed one, say)."""
        with self._lock:
            return self._state.in_flight.count(path)

    def webhook_posts(self, session: str | None = None) -> list[Recorded]:
        """Webhook replies that were accepted (errcode 0), optionally for one session."""
        return [
            r
            for r in self.requests
            if r.path == WEBHOOK_PATH
            and r.status == 200
            and not r.faulted
            and isinstance(r.response, dict)
            and r.response.get("errcode") == 0
            and (session is None or r.session == session)
        ]

    def metered_requests(self) -> list[Recorded]:
        """Every request to a metered path, refused ones too: what the org's monthly count sees."""
        return [r for r in self.requests if r.path in METERED_PATHS]

    def batch_sends(self) -> list[Recorded]:
        """Accepted 1:1 pushes that reached at least one user (see `delivered_user_ids`)."""
        return [
            r
            for r in self.requests
            if r.path == BATCH_SEND_PATH and r.status == 200 and not r.faulted and r.delivered_user_ids
        ]

    def group_sends(self) -> list[Recorded]:
        """Accepted group pushes."""
        return [r for r in self.requests if r.path == GROUP_SEND_PATH and r.status == 200 and not r.faulted]

    def describe_recent(self, count: int = 15) -> str:
        """Recent requests and acks, for failure messages."""
        records = self.requests[-count:]
        lines = [f"recent requests ({len(records)} of {len(self.requests)}):"]
        lines += ["  " + r.summary() for r in records] or ["  (none)"]
        lines.append(f"acks: {[a[0] for a in self.acks[-count:]]}; connected={self.connected}; "
                     f"live connections {len(self.live_connections())}; dropped {len(self.dropped)}")
        return "\n".join(lines)

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 10.0,
        interval: float = 0.05,
        message: str = "",
    ) -> T:
        """Poll `predicate()` until truthy and return its value; AssertionError on timeout."""
        what = message or getattr(predicate, "__name__", "predicate")
        return poll_until(predicate, timeout, interval,
                          lambda: f"timed out after {timeout}s waiting for {what}\n{self.describe_recent()}")

    # ---------------------------------------------------------------- test controls

    def fail_next(
        self,
        path: str,
        status: int = 503,
        body: Any = None,
        headers: dict[str, str] | None = None,
        times: int = 1,
    ) -> None:
        """Answer the next `times` requests to `path` with this response instead."""
        if body is None:
            body = {"code": "ServiceUnavailable", "message": "injected fault"}
        with self._lock:
            self._state.faults.setdefault(path, []).append(_Fault(status, body, dict(headers or {}), times))

    def fail_randomly(self, path: str, ratio: float, choices: list[tuple[int, Any, dict[str, str]]],
                      seed: int = 1) -> None:
        """From now on fail about `ratio` of the requests to `path` with a response picked from `choices`."""
        with self._lock:
            self._random_faults[path] = (ratio, list(choices), random.Random(seed))

    def clear_faults(self, path: str | None = None) -> None:
        """Forget injected faults, queued and random, for `path` (None: every path)."""
        with self._lock:
            if path is None:
                self._state.faults.clear()
                self._random_faults.clear()
            else:
                self._state.faults.pop(path, None)
                self._random_faults.pop(path, None)

    def flow_control_next(self, staff_id: str, times: int = 1) -> None:
        """The next `times` batchSends to `staff_id` report it flow-controlled (not delivered)."""
        with self._lock:
            self._state.flow_controlled[staff_id] = self._state.flow_controlled.get(staff_id, 0) + times

    def mark_invalid_staff(self, staff_id: str) -> None:
        """batchSend reports this user in `invalidStaffIdList` from now on."""
        with self._lock:
            self._state.invalid_staff.add(staff_id)

    def invalidate_tokens(self) -> None:
        """Every access token issued so far stops working."""
        with self._lock:
            self._state.tokens.clear()

    def expire_webhook(self, session: str) -> None:
        """Expire one session webhook now."""
        with self._lock:
            if session in self._state.sessions:
                self._state.sessions[session].expires_ms = _now_ms() - 1

    def add_session(self, ttl_ms: int = 90 * 60 * 1000, delay: float = 0.0) -> str:
        """Register a session webhook without a stream message; returns its id (see `webhook_url`)."""
        session = secrets.token_urlsafe(18)
        with self._lock:
            self._state.sessions[session] = _Session(expires_ms=_now_ms() + ttl_ms, delay=delay)
        return session

    def webhook_url(self, session: str) -> str:
        """The session webhook URL for a session id."""
        return f"{self.base_url}{WEBHOOK_PATH}?session={session}"

    def set_webhook_delay(self, session: str | None, seconds: float) -> None:
        """Delay webhook answers for one session, or for all sessions (None)."""
        with self._lock:
            if session is None:
                self._global_webhook_delay = seconds
            else:
                self._state.sessions.setdefault(session, _Session(expires_ms=0)).delay = seconds

    # ---------------------------------------------------------------- stream side

    @property
    def connected(self) -> bool:
        """True while a stream connection is live and eligible for frames."""
        return self._current is not None

    @property
    def _current(self) -> _Stream | None:
        """The newest live connection: the one frames go to unless `several_connections`."""
        live = self._live_streams()
        return live[-1] if live else None

    def _live_streams(self) -> list[_Stream]:
        return [s for s in list(self._streams) if not s.closed and not s.ws.closed]

    def wait_connected(self, timeout: float = 10.0, connects_at_least: int = 1) -> int:
        """Wait for a live stream (and at least `connects_at_least` accepted); returns stream_connects."""
        self.wait_for(
            lambda: self.connected and self.stream_connects >= connects_at_least,
            timeout=timeout,
            message=f"a stream connection (#{connects_at_least})",
        )
        return self.stream_connects

    def wait_ack(self, frame_message_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for the client's ACK of one frame; returns the ack dict."""

        def find() -> dict[str, Any] | None:
            return next((ack for mid, ack, _ in self.acks if mid == frame_message_id), None)

        return self.wait_for(find, timeout=timeout, message=f"ACK of frame {frame_message_id}")

    def ack_connection(self, frame_message_id: str) -> str | None:
        """The connection the first ACK of a frame came back on, or None."""
        with self._lock:
            return self._state.ack_connections.get(frame_message_id)

    def ack_time(self, frame_message_id: str) -> float | None:
        """Monotonic time the first ACK of a frame arrived, or None."""
        return next((t for mid, _, t in self.acks if mid == frame_message_id), None)

    def send_bot_message(
        self,
        text: str = "",
        sender_staff_id: str = "user1",
        sender_nick: str = "Alice",
        conversation_type: str = "1",
        conversation_id: str | None = None,
        msg_id: str | None = None,
        msgtype: str = "text",
        content: dict[str, Any] | None = None,
        webhook_ttl_ms: int = 90 * 60 * 1000,
        webhook_delay: float = 0.0,
        extra: dict[str, Any] | None = None,
        connection_id: str | None = None,
    ) -> SentMessage:
        """Push a bot message down the stream, shaped like DingTalk's, with a fresh session webhook (down the
        connection `connection_id` when given, see `live_connections`)."""
        now = _now_ms()
        session = self.add_session(webhook_ttl_ms, webhook_delay)
        webhook_url = self.webhook_url(session)
        group = conversation_type == "2"
        if conversation_id is None:
            seed = f"group:{self.client_id}" if group else f"single:{self.client_id}:{sender_staff_id}"
            conversation_id = _conversation_id(seed)
        payload: dict[str, Any] = {
            "conversationId": conversation_id,
            "chatbotCorpId": self.corp_id,
            "chatbotUserId": self.chatbot_user_id,
            "msgId": msg_id or "msg" + base64.b64encode(secrets.token_bytes(16)).decode(),
            "senderNick": sender_nick,
            "isAdmin": False,
            "senderStaffId": sender_staff_id,
            "sessionWebhookExpiredTime": now + webhook_ttl_ms,
            "createAt": now,
            "senderCorpId": self.corp_id,
            "conversationType": conversation_type,
            "senderId": "$:LWCP_v1:$" + _b64("user:" + sender_staff_id),
            "sessionWebhook": webhook_url,
            "robotCode": self.robot_code,
            "msgtype": msgtype,
            "isInAtList": True,
        }
        if group:
            payload["conversationTitle"] = "测试群"
            payload["atUsers"] = [{"dingtalkId": self.chatbot_user_id}]
        if msgtype == "text":
            # DingTalk leaves a space where the @mention was in groups.
            payload["text"] = {"content": (" " + text) if group else text}
        else:
            payload["content"] = content if content is not None else {}
        payload.update(extra or {})
        return self._push_bot_message(SentMessage(payload["msgId"], "", session, webhook_url, 0.0, payload),
                                      connection_id)

    def redeliver(self, sent: SentMessage, connection_id: str | None = None) -> SentMessage:
        """Send the same bot message again in a new frame (DingTalk's duplicate delivery), down the connection
        `connection_id` when given."""
        return self._push_bot_message(SentMessage(sent.msg_id, "", sent.session, sent.webhook_url, 0.0,
                                                  sent.payload), connection_id)

    def _push_bot_message(self, sent: SentMessage, connection_id: str | None) -> SentMessage:
        """Send `sent` down a connection (filling in its frame id, time and connection); with `fire_and_forget`
        and no live connection (or one that closed under it) the message is dropped and counted instead."""
        stream = self._pick_stream(connection_id)
        sent.sent_at = time.monotonic()
        if stream is not None:
            try:
                sent.frame_message_id = self._send_frame_on(stream, "CALLBACK", BOT_TOPIC, sent.payload)
                sent.connection_id = stream.connection_id
                return sent
            except (RuntimeError, ConnectionError):
                if not self.fire_and_forget:
                    raise
        elif not self.fire_and_forget or connection_id is not None:
            raise RuntimeError(f"no live stream connection\n{self.describe_recent()}")
        with self._lock:
            self.dropped.append(sent)
        return sent

    def send_ping(self) -> str:
        """SYSTEM ping frame; returns its frame message id (the client should ACK it)."""
        return self._send_frame("SYSTEM", "ping", {"opaque": uuid.uuid4().hex})

    def send_disconnect(self, close_after: float = 0.5, connection_id: str | None = None) -> str:
        """SYSTEM disconnect frame (to the connection frames go to, or the one named): nothing more is delivered
        on it, and the socket is closed `close_after` seconds later (DingTalk: ~10 s)."""
        stream = self._pick_stream(connection_id)
        if stream is None:
            raise RuntimeError(f"no live stream connection\n{self.describe_recent()}")
        stream.closed = True  # no further frames go to a connection told to leave
        frame_id = self._send_frame_on(stream, "SYSTEM", "disconnect", {"reason": "server restarting"})
        self._run(self._close_later(stream, close_after))
        return frame_id

    def go_silent(self, connection_id: str | None = None) -> str:
        """Stop a connection without a word (the one frames go to, or the one named): the socket stays open but
        gets no frame any more, not even a ping, and messages go elsewhere or are dropped. Returns its id."""
        stream = self._pick_stream(connection_id)
        if stream is None:
            raise RuntimeError(f"no live stream connection\n{self.describe_recent()}")
        stream.closed = stream.silent = True
        return stream.connection_id

    def send_raw_frame(self, frame: dict[str, Any] | str) -> None:
        """Send a frame as-is (a str is not re-encoded: use it for malformed frames)."""
        text = frame if isinstance(frame, str) else json.dumps(frame, ensure_ascii=False)
        self._run(self._send_text(text))

    def drop_stream(self) -> None:
        """Kill the current websocket abruptly (no close frame)."""
        stream = self._current
        if stream is None:
            return
        stream.closed = True
        self._run(self._abort(stream))

    def live_connections(self) -> list[str]:
        """The ids of the live stream connections, oldest first."""
        return [s.connection_id for s in self._live_streams()]

    def open_sockets(self) -> int:
        """Websockets still open, live or not (told to leave, silent): what the client holds."""
        return len([s for s in list(self._streams) if not s.ws.closed])

    def _pick_stream(self, connection_id: str | None) -> _Stream | None:
        if connection_id is None and not (self.several_connections or self.fire_and_forget):
            return self._current
        live = [s for s in self._live_streams() if connection_id in (None, s.connection_id)]
        return self.connection_rng.choice(live) if live else None

    def _send_frame(self, frame_type: str, topic: str, data: dict[str, Any], connection_id: str | None = None) -> str:
        stream = self._pick_stream(connection_id)
        if stream is None:
            raise RuntimeError(f"no live stream connection\n{self.describe_recent()}")
        return self._send_frame_on(stream, frame_type, topic, data)

    def _send_frame_on(self, stream: _Stream, frame_type: str, topic: str, data: dict[str, Any]) -> str:
        frame_id = uuid.uuid4().hex
        frame = {
            "specVersion": "1.0",
            "type": frame_type,
            "headers": {
                "appId": self.client_id,
                "connectionId": stream.connection_id,
                "contentType": "application/json",
                "messageId": frame_id,
                "time": str(_now_ms()),
                "topic": topic,
            },
            "data": json.dumps(data, ensure_ascii=False),
        }
        self._run(self._send_text(json.dumps(frame, ensure_ascii=False), stream))
        return frame_id

    async def _send_text(self, text: str, stream: _Stream | None = None) -> None:
        stream = stream or self._current
        if stream is None or stream.ws.closed:
            raise RuntimeError("no live stream connection")
        await stream.ws.send_str(text)
        self.frames_sent += 1

    async def _ping_forever(self) -> None:
        """DingTalk's keepalive: a SYSTEM ping to every live connection each `ping_interval` seconds (when set)."""
        while True:
            await asyncio.sleep(self.ping_interval or 0.1)
            if not self.ping_interval:
                continue
            for stream in self._live_streams():
                frame = {"specVersion": "1.0", "type": "SYSTEM",
                         "headers": {"appId": self.client_id, "connectionId": stream.connection_id,
                                     "contentType": "application/json", "messageId": uuid.uuid4().hex,
                                     "time": str(_now_ms()), "topic": "ping"},
                         "data": json.dumps({"opaque": uuid.uuid4().hex})}
                try:
                    await self._send_text(json.dumps(frame), stream)
                except (RuntimeError, ConnectionError):
                    pass  # it closed meanwhile

    async def _close_later(self, stream: _Stream, delay: float) -> None:
        async def close() -> None:
            await asyncio.sleep(delay)
            await stream.ws.close()

        task = asyncio.get_running_loop().create_task(close())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _abort(self, stream: _Stream) -> None:
        transport = stream.request.transport
        if transport is not None:
            transport.abort()
        else:
            await stream.ws.close()

    # ---------------------------------------------------------------- handlers

    def _take_fault(self, path: str) -> _Fault | None:
        with self._lock:
            queue = self._state.faults.get(path) or []
            if not queue:
                random_faults = self._random_faults.get(path)
                if random_faults is not None:
                    ratio, choices, rng = random_faults
                    if rng.random() < ratio:
                        status, body, headers = rng.choice(choices)
                        return _Fault(status, body, dict(headers), 1)
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def _record(self, request: web.Request, raw: str, body: Any, arrived: float, status: int,
                response: Any, faulted: bool = False) -> None:
        record = Recorded(
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            time=arrived,
            status=status,
            faulted=faulted,
            response=response,
            raw_body=raw,
        )
        with self._lock:
            self._state.records.append(record)

    async def _handle_connect(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        fault = self._take_fault(request.path)
        if fault:
            self._record(request, "", None, arrived, fault.status, fault.body, faulted=True)
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        ticket = request.query.get("ticket", "")
        with self._lock:
            known = ticket in self._state.tickets
            self._state.tickets.discard(ticket)  # tickets are single-use
        if not known:
            body = {"code": "InvalidTicket", "message": "ticket 不存在或已失效"}
            self._record(request, "", None, arrived, 403, body)
            return web.json_response(body, status=403)
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._record(request, "", None, arrived, 101, None)
        stream = _Stream(ws=ws, request=request, connection_id=uuid.uuid4().hex)
        self._streams.append(stream)  # the newest connection gets the frames (unless several_connections)
        self.stream_connects += 1
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self._record_ack(msg.data, stream.connection_id)
        finally:
            stream.closed = True
            self._streams.remove(stream)
        return ws

    def _record_ack(self, text: str, connection_id: str) -> None:
        try:
            ack = json.loads(text)
        except ValueError:
            ack = {"raw": text}
        frame_id = None
        if isinstance(ack, dict) and isinstance(ack.get("headers"), dict):
            frame_id = ack["headers"].get("messageId")
        else:
            ack = {"raw": ack}
        with self._lock:
            self._state.acks.append((frame_id, ack, time.monotonic()))
            if isinstance(frame_id, str):
                self._state.ack_connections.setdefault(frame_id, connection_id)

    async def _handle_http(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self._state.in_flight.append(request.path)
        try:
            return await self._answer_http(request)
        finally:
            with self._lock:
                self._state.in_flight.remove(request.path)

    async def _answer_http(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        raw = (await request.read()).decode("utf-8", errors="replace")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        fault = self._take_fault(request.path)
        if fault:
            self._record(request, raw, body, arrived, fault.status, fault.body, faulted=True)
            if isinstance(fault.body, (str, bytes)):
                return web.Response(body=fault.body, status=fault.status, headers=fault.headers)
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        routes = {
            OPEN_PATH: self._open_connection,
            TOKEN_PATH: self._access_token,
            BATCH_SEND_PATH: self._batch_send,
            GROUP_SEND_PATH: self._group_send,
            WEBHOOK_PATH: self._webhook,
        }
        route = self.extra_routes.get((request.method, request.path)) or (
            routes.get(request.path) if request.method == "POST" else None)
        refused = self.gate(request.path) if self.gate is not None and route is not None else None
        if refused is not None:
            status, response = refused
        elif route is None:
            status, response = 404, {"code": "NotFound", "message": f"no route {request.method} {request.path}"}
        elif not isinstance(body, dict):
            status, response = 400, {"code": "InvalidParameter", "message": "body must be a JSON object"}
        else:
            status, response = await route(request, body)
        self._record(request, raw, body, arrived, status, response)
        return web.json_response(response, status=status, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    async def _open_connection(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if self.open_delay:
            waiting = asyncio.current_task()
            assert waiting is not None
            self._tasks.add(waiting)  # stop() cancels the wait
            try:
                await asyncio.sleep(self.open_delay)
            finally:
                self._tasks.discard(waiting)
        if body.get("clientId") != self.client_id or body.get("clientSecret") != self.client_secret:
            return 401, {"code": "InvalidAuthentication", "message": "clientId 或 clientSecret 不正确"}
        ticket = secrets.token_urlsafe(24)
        with self._lock:
            self._state.tickets.add(ticket)
            self.connections_opened += 1
        return 200, {"endpoint": f"ws://127.0.0.1:{self._port}{CONNECT_PATH}", "ticket": ticket}

    async def _access_token(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if body.get("appKey") != self.client_id or body.get("appSecret") != self.client_secret:
            return 400, {"code": "InvalidAuthentication", "message": "appKey 或 appSecret 不正确"}
        token = secrets.token_hex(16)
        with self._lock:
            self._state.tokens[token] = time.monotonic() + self.token_ttl
            self.token_fetches += 1
        return 200, {"accessToken": token, "expireIn": self.token_ttl}

    def _check_push(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """Shared checks of both push APIs; an error response, or None when fine."""
        token = request.headers.get("x-acs-dingtalk-access-token", "")
        with self._lock:
            expiry = self._state.tokens.get(token)
        if expiry is None or time.monotonic() >= expiry:
            return 401, {"code": "InvalidAuthentication", "message": "不合法的access_token"}
        if body.get("robotCode") != self.robot_code:
            return 400, {"code": "invalidParameter.robotCode", "message": f"robotCode 不存在: {body.get('robotCode')}"}
        msg_key, msg_param = body.get("msgKey"), body.get("msgParam")
        if not isinstance(msg_key, str) or not msg_key:
            return 400, {"code": "invalidParameter.msgKey.invalid", "message": "msgKey 不合法"}
        if not isinstance(msg_param, str):
            return 400, {"code": "invalidParameter.msgParam.invalid", "message": "msgParam 必须是 JSON 字符串"}
        try:
            param = json.loads(msg_param)
        except ValueError:
            return 400, {"code": "invalidParameter.msgParam.invalid", "message": "msgParam 不是合法 JSON"}
        missing = [k for k in REQUIRED_MSG_PARAM_KEYS.get(msg_key, ()) if not isinstance(param, dict) or k not in param]
        if not isinstance(param, dict) or missing:
            return 400, {"code": "invalidParameter.msgParam.invalid", "message": f"msgParam 缺少 {missing}"}
        file_error = self.files.check_push(msg_key, param)
        if file_error:
            return file_error
        if len(msg_param.encode("utf-8")) > self.max_msg_param_bytes:
            return 400, {"code": "invalidParameter.msgParam.tooLong",
                         "message": f"msgParam 超过 {self.max_msg_param_bytes} 字节"}
        return None

    async def _batch_send(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        error = self._check_push(request, body)
        if error:
            return error
        user_ids = body.get("userIds")
        if not isinstance(user_ids, list) or not user_ids or not all(isinstance(u, str) for u in user_ids):
            return 400, {"code": "invalidParameter.userIds.invalid", "message": "userIds 必须是非空字符串列表"}
        if len(user_ids) > MAX_BATCH_USERS:
            return 400, {"code": "invalidParameter.userIds.overMax", "message": "userIds 最多 20 个"}
        flow, invalid = [], []
        with self._lock:
            for user in user_ids:
                if user in self._state.invalid_staff:
                    invalid.append(user)
                elif self._state.flow_controlled.get(user, 0) > 0:
                    self._state.flow_controlled[user] -= 1
                    flow.append(user)
        return 200, {
            "processQueryKey": secrets.token_urlsafe(24),
            "invalidStaffIdList": invalid,
            "flowControlledStaffIdList": flow,
        }

    async def _group_send(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        error = self._check_push(request, body)
        if error:
            return error
        if not isinstance(body.get("openConversationId"), str) or not body["openConversationId"]:
            return 400, {"code": "invalidParameter.openConversationId.invalid",
                         "message": "openConversationId 不能为空"}
        return 200, {"processQueryKey": secrets.token_urlsafe(24)}

    async def _webhook(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        session_id = request.query.get("session", "")
        with self._lock:
            session = self._state.sessions.get(session_id)
            alive = session is not None and session.expires_ms > _now_ms()
            delay = max(session.delay if session else 0.0, self._global_webhook_delay)
        if delay > 0:
            await asyncio.sleep(delay)
        if not alive:
            return 200, dict(WEBHOOK_NO_SESSION)
        msgtype = body.get("msgtype")
        if msgtype == "text":
            part = body.get("text")
            ok = isinstance(part, dict) and isinstance(part.get("content"), str)
            shown = part.get("content", "") if ok else ""
        elif msgtype == "markdown":
            part = body.get("markdown")
            ok = isinstance(part, dict) and isinstance(part.get("title"), str) and isinstance(part.get("text"), str)
            shown = (part.get("title", "") + part.get("text", "")) if ok else ""
        else:
            ok, shown = False, ""
        if not ok:
            return 200, {"errcode": 40035, "errmsg": "缺少参数 json"}
        if len(shown.encode("utf-8")) > self.webhook_max_bytes:
            return 200, dict(WEBHOOK_TOO_LONG)
        return 200, {"errcode": 0, "errmsg": "ok"}
