"""HTTP to DingTalk: a pooled JSON client with timeouts (`JsonHttp`), connection failures described in one line
(host:port and the cause), and the Stream gateway's connection-open call."""

from __future__ import annotations

import json
import re
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import urllib3
from urllib3.util.retry import Retry

from config import HTTP_TIMEOUT

OPEN_CONNECTION_PATH = "/v1.0/gateway/connections/open"
BOT_TOPIC = "/v1.0/im/bot/messages/get"



class HttpError(Exception):
    """The request got no HTTP answer; the message names the host and the cause (see `describe_network_error`)."""


# urllib3 starts its messages with the connection object ("HTTPConnection(host=…, port=…): "): the host is said once.
_OBJECT_REPR = re.compile(r"(?:<[\w.]+ object at 0x[0-9a-f]+>|\w*(?:Connection|Pool)\w*\(host=[^)]*\)):?\s*")
_URLLIB3_CAUSES = (  # most specific first: NewConnectionError is a ConnectTimeoutError, for compatibility
    (urllib3.exceptions.NameResolutionError, "DNS lookup failed"),
    (urllib3.exceptions.SSLError, "TLS handshake failed"),
    (urllib3.exceptions.ProxyError, "the proxy failed"),
    (urllib3.exceptions.NewConnectionError, "cannot connect"),
    (urllib3.exceptions.ConnectTimeoutError, "connect timed out"),
    (urllib3.exceptions.ReadTimeoutError, "no answer in time (read timeout)"),
    (urllib3.exceptions.ProtocolError, "the connection broke off"),
)


def describe_network_error(url: str, exc: BaseException) -> str:
    """Why `url` could not be reached, for a person: its host and port, then the cause (DNS, refused, TLS,
    timeout, HTTP status) with the underlying error. urllib3's MaxRetryError is unwrapped to its `.reason`."""
    parts = urlsplit(url)
    port = parts.port or {"https": 443, "wss": 443}.get(parts.scheme, 80)
    where = f"{parts.hostname or url}:{port}"
    cause: BaseException = exc
    if isinstance(cause, urllib3.exceptions.MaxRetryError) and cause.reason is not None:
        cause = cause.reason
    underlying = cause.__cause__ or cause.__context__
    status = getattr(getattr(cause, "response", None), "status_code", None)  # websockets' InvalidStatus
    what = next((text for kind, text in _URLLIB3_CAUSES if isinstance(cause, kind)), "")
    if status is not None:
        what = f"refused the connection: HTTP {status}"
    elif isinstance(cause, socket.gaierror) or isinstance(underlying, socket.gaierror):
        what = "DNS lookup failed"
    elif isinstance(cause, ConnectionRefusedError) or isinstance(underlying, ConnectionRefusedError):
        what = "connection refused"
    elif isinstance(cause, ssl.SSLError):
        what = "TLS handshake failed"
    elif isinstance(cause, TimeoutError) and not what:
        what = "timed out"
    detail = _OBJECT_REPR.sub("", str(cause)).strip() or str(underlying or "")
    return f"{where} {what or 'unreachable'} ({type(cause).__name__}{': ' + detail if detail else ''})"


@dataclass(frozen=True)
class HttpReply:
    """An HTTP answer: status, the JSON object it carried ({} if none), and its headers."""

    status: int
    body: dict
    headers: dict[str, str]
    text: str

    @property
    def retry_after(self) -> float | None:
        value = self.headers.get("retry-after")
        try:
            return max(0.0, float(value)) if value else None
        except ValueError:
            return None


class JsonHttp:
    """POSTs JSON through one urllib3 pool: timeouts on every call, and urllib3's `Retry` for POSTs on connection
    errors, 429 and 5xx (honouring Retry-After). No proxy from the environment: DingTalk is reached directly.

    urllib3 directly rather than `requests`: the same pool and Retry for about a millisecond less CPU per post,
    which is most of the bot's cost per acknowledgement (BENCHMARKS.md).
    """

    def __init__(self, pool_size: int = 48, transport_retries: int = 2,
                 timeout: tuple[float, float] = HTTP_TIMEOUT) -> None:
        retry = Retry(
            total=transport_retries, connect=transport_retries, read=transport_retries, status=transport_retries,
            backoff_factor=0.3, backoff_jitter=0.2, status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"POST", "PUT"}), respect_retry_after_header=True, raise_on_status=False,
        )
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=pool_size, retries=retry,
                                         timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))

    def post_json(self, url: str, body: dict, headers: dict[str, str] | None = None, *,
                  method: str = "POST") -> HttpReply:
        """POST (or `method`) `body` as JSON; raises HttpError when no answer came (after the transport retries)."""
        try:
            response = self._pool.request(
                method, url, body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                headers={"Content-Type": "application/json", "Accept": "application/json", **(headers or {})})
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise HttpError(describe_network_error(url, exc)) from None
        text = response.data.decode("utf-8", "replace")
        try:
            parsed = json.loads(text) if text else {}
        except ValueError:
            parsed = {}
        return HttpReply(status=response.status, body=parsed if isinstance(parsed, dict) else {},
                         headers={k.lower(): v for k, v in response.headers.items()}, text=text)

    def close(self) -> None:
        self._pool.clear()


def open_stream_connection(http: JsonHttp, endpoint: str, client_id: str, client_secret: str,
                           ua: str = "dingtalk-codebuddy-bot/1.0", topics: tuple[str, ...] = (BOT_TOPIC,)
                           ) -> tuple[dict | None, str]:
    """Ask the Stream gateway for a websocket endpoint and ticket: ({endpoint, ticket}, "") or (None, why not)."""
    body = {"clientId": client_id, "clientSecret": client_secret, "ua": ua, "localIp": "127.0.0.1",
            "subscriptions": [{"type": "CALLBACK", "topic": topic} for topic in topics]}
    url = endpoint.rstrip("/") + OPEN_CONNECTION_PATH
    try:
        reply = http.post_json(url, body)
    except HttpError as exc:
        return None, f"unreachable: {exc}"
    endpoint_url, ticket = reply.body.get("endpoint"), reply.body.get("ticket")
    if reply.status != 200 or not endpoint_url or not ticket:
        return None, f"HTTP {reply.status} {reply.body.get('code') or reply.text[:200]} from {urlsplit(url).netloc}"
    return {"endpoint": str(endpoint_url), "ticket": str(ticket)}, ""
