"""A fake OpenAI-compatible model server for the real CodeBuddy CLI, on 127.0.0.1 (random port).

Point the CLI at it with `CODEBUDDY_BASE_URL=<server.base_url>` (and any `CODEBUDDY_API_KEY`). What the
real CLI 2.163.0 asks (observed, see tests/real_cli/test_real_cli.py): only `POST {base}/chat/completions` with
`"stream": true` and `stream_options.include_usage`, one request per model turn, the whole conversation
in `messages` (system prompt first; user text wrapped in `<user_query>…</user_query>`; tool results as
`role: "tool"` messages). The answer is `chat.completion.chunk` SSE ending with `data: [DONE]`.

How it answers, from the conversation's latest user query and the tool results since:
- tool directives in the query, in order, one tool call per model turn: `[bash:COMMAND]` → `Bash`,
  `[read:PATH]` → `Read`, `[write:PATH:BASE64]` → `Write` (content base64-encoded, so it may hold `]`);
- once every directive has had its turn (or with none) → the text `回答: <latest user query> (turn N)`,
  N = user queries in the conversation (after tool results: `(turn N, tool done)`, then one line
  `工具结果: <result>` per tool result, so a test sees what the tool gave the agent), streamed in deltas.

Every request is recorded (`requests`, `chat_requests()`), so a test can check what the CLI sent. A
`GET {base}/models` gets a one-model list; any other request is recorded in `unanswered` and gets a 404.
Stdlib only.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

MODEL = "fake-model"
_TOOL = re.compile(r"\[(bash|read|write):(.+?)\]")
_USER_QUERY = re.compile(r"<user_query>(.*?)</user_query>", re.S)
_REMINDER = re.compile(r"<system-reminder>.*?(</system-reminder>|$)", re.S)


def message_text(message: dict[str, Any]) -> str:
    """The text of one chat message, whether `content` is a string or a list of parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def user_query(message: dict[str, Any]) -> str:
    """What the user typed: the text inside `<user_query>` when the CLI wrapped it, else the whole text less
    the CLI's own `<system-reminder>` blocks (which it also sends as user messages, between tool turns)."""
    text = message_text(message)
    found = _USER_QUERY.findall(text)
    return found[-1].strip() if found else _REMINDER.sub("", text).strip()


def tool_results_since_query(messages: list[dict[str, Any]]) -> list[str]:
    """Text of the tool results after the conversation's latest user query."""
    user_at = max((i for i, m in enumerate(messages) if m.get("role") == "user" and user_query(m)), default=-1)
    return [message_text(m) for m in messages[user_at + 1:] if m.get("role") == "tool"]


@dataclass
class ModelRequest:
    """One HTTP request the server received."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # decoded JSON, or None
    time: float  # time.monotonic() on arrival
    answer: dict[str, Any] = field(default_factory=dict)  # what the server answered (chat requests)

    @property
    def messages(self) -> list[dict[str, Any]]:
        body = self.body if isinstance(self.body, dict) else {}
        messages = body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def user_queries(self) -> list[str]:
        """Every user query in the conversation sent, oldest first (tool results are not queries)."""
        return [query for m in self.messages if m.get("role") == "user" and (query := user_query(m))]

    @property
    def tool_results(self) -> list[str]:
        """Text of every tool result since the latest user query (what the tools gave the agent this turn)."""
        return tool_results_since_query(self.messages)

    @property
    def assistant_texts(self) -> list[str]:
        """Text of every earlier assistant message in the conversation sent."""
        return [message_text(m) for m in self.messages if m.get("role") == "assistant" and message_text(m)]


class FakeModelServer:
    """OpenAI-compatible `chat/completions` on 127.0.0.1, answering by the rules in the module docstring."""

    def __init__(self, base_path: str = "/v1", chunk_delay: float = 0.0) -> None:
        self.base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        self.chunk_delay = chunk_delay
        # The usage each answer reports (tokens per model request); a test of the bot's accounting sets its own.
        self.usage: dict[str, Any] = {"prompt_tokens": 10, "completion_tokens": 5}
        self._lock = threading.Lock()
        self._requests: list[ModelRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def base_url(self) -> str:
        """The value for CODEBUDDY_BASE_URL."""
        if self._server is None:
            raise RuntimeError("fake model server not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.base_path}"

    def start(self) -> FakeModelServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> FakeModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ recording

    @property
    def requests(self) -> list[ModelRequest]:
        """Every request so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[ModelRequest]:
        """The `POST …/chat/completions` requests."""
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    @property
    def unanswered(self) -> list[ModelRequest]:
        """Requests the server did not understand (answered 404)."""
        return [r for r in self.requests if r.answer.get("status") == 404]

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30.0, message: str = "") -> T:
        """Poll `predicate()` until truthy; AssertionError with the recent requests on timeout."""
        from tests.standin import poll_until

        def describe() -> str:
            recent = [f"{r.method} {r.path} queries={r.user_queries[-2:]}" for r in self.requests[-5:]]
            return f"timed out after {timeout}s waiting for {message or 'predicate'}; model requests: {recent}"

        return poll_until(predicate, timeout, 0.05, describe)

    def _record(self, request: ModelRequest) -> None:
        with self._lock:
            self._requests.append(request)

    # ------------------------------------------------------------ answers

    def reply_for(self, body: dict[str, Any]) -> dict[str, Any]:
        """The assistant turn for a chat request: {"text": …} or {"tool": name, "arguments": {…}}."""
        messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
        queries = [user_query(m) for m in messages if m.get("role") == "user" and user_query(m)]
        latest = queries[-1] if queries else ""
        results = tool_results_since_query(messages)
        directives = _TOOL.findall(latest)
        if len(results) < len(directives):
            return _tool_call(*directives[len(results)])
        if not directives:
            return {"text": f"回答: {latest} (turn {len(queries)})"}
        shown = "".join(f"\n工具结果: {result}" for result in results)
        return {"text": f"回答: {latest} (turn {len(queries)}, tool done){shown}"}


def _tool_call(kind: str, argument: str) -> dict[str, Any]:
    if kind == "bash":
        return {"tool": "Bash", "arguments": {"command": argument, "description": "run a command"}}
    if kind == "read":
        return {"tool": "Read", "arguments": {"file_path": argument}}
    path, _, encoded = argument.rpartition(":")
    return {"tool": "Write", "arguments": {"file_path": path,
                                           "content": base64.b64decode(encoded).decode("utf-8", "replace")}}


def _chunk(delta: dict[str, Any], finish: str | None = None, completion_id: str = "") -> dict[str, Any]:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    return {**usage, "total_tokens": int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))}


def _stream_chunks(reply: dict[str, Any], include_usage: bool, usage: dict[str, Any]) -> list[dict[str, Any]]:
    completion_id = "chatcmpl-" + uuid.uuid4().hex[:12]
    if "tool" in reply:
        call_id = "call_" + uuid.uuid4().hex[:12]
        arguments = json.dumps(reply["arguments"], ensure_ascii=False)
        chunks = [
            _chunk({"role": "assistant", "content": None, "tool_calls": [{
                "index": 0, "id": call_id, "type": "function", "function": {"name": reply["tool"], "arguments": ""}}]},
                completion_id=completion_id),
            # Arguments arrive in pieces, as real servers send them.
            *(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": arguments[i:i + 16]}}]},
                     completion_id=completion_id) for i in range(0, len(arguments), 16)),
            _chunk({}, "tool_calls", completion_id),
        ]
    else:
        text = reply["text"]
        chunks = [_chunk({"role": "assistant", "content": ""}, completion_id=completion_id),
                  *(_chunk({"content": text[i:i + 8]}, completion_id=completion_id) for i in range(0, len(text), 8)),
                  _chunk({}, "stop", completion_id)]
    if include_usage:
        chunks.append({"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                       "model": MODEL, "choices": [],
                       "usage": _usage(usage)})
    return chunks


def _completion(reply: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    """A non-streaming `chat.completion` (the CLI was not seen asking for one; answered anyway)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("text")}
    if "tool" in reply:
        message["tool_calls"] = [{"id": "call_" + uuid.uuid4().hex[:12], "type": "function", "function": {
            "name": reply["tool"], "arguments": json.dumps(reply["arguments"], ensure_ascii=False)}}]
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion", "created": int(time.time()),
            "model": MODEL, "choices": [{"index": 0, "message": message,
                                         "finish_reason": "tool_calls" if "tool" in reply else "stop"}],
            "usage": _usage(usage)}


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_owner: FakeModelServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        pass

    def _request(self, body: Any) -> ModelRequest:
        return ModelRequest(method=self.command, path=self.path.split("?", 1)[0],
                            headers={k.lower(): v for k, v in self.headers.items()}, body=body, time=time.monotonic())

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        owner = self.server_owner
        request = self._request(None)
        if request.path == owner.base_path + "/models":
            request.answer = {"status": 200}
            owner._record(request)
            self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]})
            return
        request.answer = {"status": 404}
        owner._record(request)
        self._json(404, {"error": {"message": f"no route GET {request.path}", "type": "invalid_request_error"}})

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        owner = self.server_owner
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = self._request(body)
        if request.path != owner.base_path + "/chat/completions" or not isinstance(body, dict):
            request.answer = {"status": 404}
            owner._record(request)
            self._json(404, {"error": {"message": f"no route POST {request.path}", "type": "invalid_request_error"}})
            return
        reply = owner.reply_for(body)
        request.answer = {"status": 200, **reply}
        owner._record(request)
        if not body.get("stream"):
            self._json(200, _completion(reply, owner.usage))
            return
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for chunk in _stream_chunks(reply, include_usage, owner.usage):
                self.wfile.write(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode())
                self.wfile.flush()
                if owner.chunk_delay:
                    time.sleep(owner.chunk_delay)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CLI was stopped mid-answer
        self.close_connection = True
