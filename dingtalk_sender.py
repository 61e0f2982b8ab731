"""Deliver text to DingTalk: the message's session webhook, or a push through the OpenAPI.

This is the only module that sends HTTP to DingTalk. `DingTalkSender.send(route, text)` is its one seam:
it picks the path (webhook while alive, else batchSend for 1:1 or groupMessages/send for groups), splits
long answers, retries what is worth retrying within a deadline and returns a `Delivery` value.
The wire format it relies on is in docs/wire-facts.md §2 (session webhook) and §3 (OpenAPI).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from common.redaction import replace_secrets, replace_secrets_in
from config import HTTP_TIMEOUT, PUSH_MAX_BYTES, TOKEN_REFRESH_MARGIN, WEBHOOK_MAX_BYTES

# The HTTP layer, re-exported: callers import every DingTalk wire name from here.
from dingtalk.json_http import (  # noqa: F401
    BOT_TOPIC,
    OPEN_CONNECTION_PATH,
    HttpError,
    HttpReply,
    JsonHttp,
    describe_network_error,
    open_stream_connection,
)
from dingtalk.message_parts import split_message, utf8_json_cost
from dingtalk.route import Route

log = logging.getLogger("dingtalk_sender")

# Every DingTalk API path and topic the bot uses, written once (docs/wire-facts.md §1, §3).
BATCH_SEND_PATH = "/v1.0/robot/oToMessages/batchSend"
GROUP_SEND_PATH = "/v1.0/robot/groupMessages/send"
TOKEN_PATH = "/v1.0/oauth2/accessToken"
# What each metered OpenAPI call counts as in the monthly budget (dingtalk/api_budget.py; docs/wire-facts.md §7).
METERED_KINDS = {BATCH_SEND_PATH: "batchSend", GROUP_SEND_PATH: "groupMessages"}

# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class Delivery:
    """The outcome of one `send`: delivered or not, by which path, and why not."""

    ok: bool
    path: str = ""  # "webhook", "batchSend" or "group"
    error: str = ""
    permanent: bool = False  # retrying later will not help
    out_of_time: bool = False  # the retry window ended before the next retry: sending again may still work


class DeliveryError(Exception):
    """A send failed. `retryable`: worth retrying within this send; `permanent`: it can never succeed."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 permanent: bool | None = None, out_of_time: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.permanent = (not retryable) if permanent is None else permanent
        self.out_of_time = out_of_time  # gave up because the retry window ended


class SpendRefused(DeliveryError):
    """The call budget refused a metered call (the org's month, or the user's day): nothing was sent. Not retried
    now; a result tries again later (the month or the day turns). The message is fit for the user."""

    def __init__(self, why: str) -> None:
        super().__init__(why, retryable=False, permanent=False)


class _InvalidToken(Exception):
    pass


# ---------------------------------------------------------------- token


class AccessTokenProvider:
    """Fetches the app's access token once, caches it and refreshes it before it expires.

    One lock: when many threads need a token at once, one fetches and the others wait for its answer.
    """

    def __init__(self, http: JsonHttp, endpoint: str, app_key: str, app_secret: str, *,
                 clock: Callable[[], float] = time.monotonic, refresh_margin: float = TOKEN_REFRESH_MARGIN) -> None:
        self._http = http
        self._url = endpoint.rstrip("/") + TOKEN_PATH
        self._app_key = app_key
        self._app_secret = app_secret
        self._clock = clock
        self._margin = refresh_margin
        self._lock = threading.Lock()
        self._token = ""
        self._expires_at = 0.0
        self.fetches = 0

    def get(self) -> str:
        """A valid access token, fetched only when the cached one is missing or near expiry."""
        with self._lock:
            if self._token and self._clock() < self._expires_at:
                return self._token
            self._token, self._expires_at = self._fetch()
            return self._token

    def invalidate(self, token: str) -> None:
        """Forget `token` (DingTalk rejected it); the next `get` fetches a new one."""
        with self._lock:
            if self._token == token:
                self._token, self._expires_at = "", 0.0

    def _fetch(self) -> tuple[str, float]:
        self.fetches += 1
        try:
            reply = self._http.post_json(self._url, {"appKey": self._app_key, "appSecret": self._app_secret})
        except HttpError as exc:
            raise DeliveryError(f"access token request failed: {exc}", retryable=True) from None
        body = reply.body
        token = body.get("accessToken")
        if reply.status != 200 or not token:
            code = body.get("code") or reply.status
            retryable = reply.status == 429 or reply.status >= 500
            raise DeliveryError(f"access token refused: HTTP {reply.status} {code} from {urlsplit(self._url).netloc}",
                                retryable=retryable)
        expire_in = float(body.get("expireIn") or 7200)
        log.info("access token fetched, expires in %.0f s", expire_in)
        return str(token), self._clock() + max(expire_in - self._margin, expire_in / 2)


class DingTalkSender:
    """Sends text to a `Route`. Thread-safe; every call has timeouts and a bounded retry window."""

    def __init__(self, endpoint: str, client_id: str, client_secret: str, robot_code: str, *,
                 http: JsonHttp | None = None, retry_window: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 timeout: tuple[float, float] = HTTP_TIMEOUT, stop_event: threading.Event | None = None,
                 secrets: tuple[str, ...] = ()) -> None:
        self.endpoint = endpoint.rstrip("/")
        # Exact secret values (app secret, CLI key, task DB password) replaced by *** in every text sent (`redact`).
        self._secrets = tuple(s for s in secrets if s)
        self.robot_code = robot_code
        self.retry_window = retry_window
        self._http = http or JsonHttp(timeout=timeout)
        self._clock = clock
        self._wall_clock = wall_clock
        self._stop = stop_event or threading.Event()
        self.tokens = AccessTokenProvider(self._http, self.endpoint, client_id, client_secret, clock=clock)
        self._stats_lock = threading.Lock()
        self.stats: dict[str, int] = {}
        # The monthly call budget (api_budget.ApiBudget: record, limit_hit, push_allowed, take_limit_notice), if any.
        self.meter: Any = None

    def stop(self) -> None:
        """Make retry waits give up at once (shutdown); undelivered results stay in the store."""
        self._stop.set()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] = self.stats.get(key, 0) + 1

    def spend(self, kind: str, user_id: str = "") -> None:
        """Ask the call budget for one attempt of a metered OpenAPI call (push, card call, file up/download) made for
        `user_id`, and count it; SpendRefused when the budget says no (then nothing may be sent)."""
        why = self.meter.spend(kind, user_id) if self.meter is not None else ""
        if why:
            self._count(f"refused_{kind}")
            raise SpendRefused(why)
        self._count(f"metered_{kind}")

    def redact(self, value: Any) -> Any:
        """`value` (a text, or a JSON body) with every secret the bot holds replaced by ***. Everything this bot sends
        to DingTalk passes here: webhook replies, pushes, other OpenAPI bodies and card calls (cards/api.py)."""
        return replace_secrets_in(value, self._secrets)

    def call_openapi(self, path: str, body: dict, *, kind: str = "", retry_window: float | None = None,
                     user_id: str = "") -> dict:
        """POST `body` to an OpenAPI `path` with the pushes' retries, each attempt a metered call of `kind` made for
        `user_id` (asked of the budget first): the response body, or DeliveryError (SpendRefused: not sent)."""
        window = self.retry_window if retry_window is None else min(self.retry_window, retry_window)
        return self._push_with_retry(path, self.redact(body), self._clock() + window, kind, user_id)

    # -- the seam

    def send(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             allow_webhook: bool = True, retry_window: float | None = None) -> Delivery:
        """Deliver `text` to `route`: the session webhook while alive, else an OpenAPI push."""
        if route.path_for(allow_webhook, self._wall_clock() * 1000) == "webhook":
            delivery = self.reply_webhook(route, text, markdown=markdown, title=title)
            if delivery.ok:
                return delivery
            log.warning("会话 webhook 发送失败 (%s)，改用主动推送, user=%s", delivery.error, route.user_id)
        return self.push(route, text, markdown=markdown, title=title, retry_window=retry_window)

    def reply_webhook(self, route: Route, text: str, *, markdown: bool = False,
                      title: str = "CodeBuddy") -> Delivery:
        """POST `text` to the route's session webhook; a non-zero errcode is a failure (docs/wire-facts.md §2)."""
        text, title = self.redact(text), self.redact(title)  # before the split: a secret cut in two would pass
        why = self.meter.take_limit_notice(route.user_id) if self.meter is not None else ""
        text = f"{text}\n\n{why}" if why else text  # once, after a metered call was refused (the month, the user's day)
        log.info("准备发送消息，长度: %d 字符 user=%s", len(text), route.user_id)
        for part in split_message(text, WEBHOOK_MAX_BYTES - 64, utf8_json_cost):
            if markdown:
                body = {"msgtype": "markdown", "markdown": {"title": title, "text": part}}
            else:
                body = {"msgtype": "text", "text": {"content": part}}
            try:
                reply = self._http.post_json(route.session_webhook, body)
            except HttpError as exc:
                self._count("webhook_failed")
                return Delivery(ok=False, path="webhook", error=f"webhook request failed: {exc}")
            if reply.status != 200 or reply.body.get("errcode", 0) != 0:
                self._count("webhook_failed")
                return Delivery(ok=False, path="webhook",
                                error=f"webhook HTTP {reply.status} errcode={reply.body.get('errcode')} "
                                      f"{reply.body.get('errmsg', '')}".strip())
            log.info("回复消息发送成功，钉钉响应: %s user=%s", self._one_line_json(reply.body), route.user_id)
        self._count("webhook_ok")
        return Delivery(ok=True, path="webhook")

    def push(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             retry_window: float | None = None) -> Delivery:
        """Push `text` through the OpenAPI (batchSend for 1:1, groupMessages/send for groups)."""
        text, title = self.redact(text), self.redact(title)  # before the split: a secret cut in two would pass
        path_name = route.push_path
        if route.is_group and not route.conversation_id:
            return Delivery(ok=False, path=path_name, error="group route without conversation id", permanent=True)
        if not route.is_group and not route.user_id:
            return Delivery(ok=False, path=path_name, error="1:1 route without staff id", permanent=True)
        if self.meter is not None and self.meter.limited():
            return Delivery(ok=False, path=path_name, error="monthly API quota used up (ApiCountLimitForOrg): "
                            "webhook only until the month turns")
        msg_key = "sampleMarkdown" if markdown else "sampleText"
        overhead = utf8_json_cost(json.dumps({"title": title, "text": "", "content": ""}, ensure_ascii=False))
        # A caller's window (a notice's short one) never exceeds DELIVERY_RETRY_WINDOW.
        deadline = self._clock() + min(self.retry_window, self.retry_window if retry_window is None else retry_window)
        if route.is_group:
            log.info("发送消息到群 %s, 内容长度: %d user=%s", route.conversation_id, len(text), route.user_id)
        else:
            log.info("发送消息到用户 %s, 内容长度: %d user=%s", route.user_id, len(text), route.user_id)
        for part in split_message(text, PUSH_MAX_BYTES - overhead - 64, utf8_json_cost):
            param = {"title": title, "text": part} if markdown else {"content": part}
            body: dict = {"robotCode": self.robot_code, "msgKey": msg_key,
                          "msgParam": json.dumps(param, ensure_ascii=False)}
            if route.is_group:
                body["openConversationId"] = route.conversation_id
            else:
                body["userIds"] = [route.user_id]
            try:
                response = self._push_with_retry(GROUP_SEND_PATH if route.is_group else BATCH_SEND_PATH, body,
                                                 deadline, user_id=route.user_id)
            except DeliveryError as exc:
                self._count(f"{path_name}_failed")
                return Delivery(ok=False, path=path_name, error=str(exc), permanent=exc.permanent,
                                out_of_time=exc.out_of_time)
            log.info("消息发送响应: %s user=%s", self._one_line_json(response), route.user_id)
        self._count(f"{path_name}_ok")
        return Delivery(ok=True, path=path_name)

    def _one_line_json(self, body: dict) -> str:
        """A DingTalk response body for the log: compact JSON on one line, exact secrets replaced."""
        return replace_secrets(json.dumps(body, ensure_ascii=False, separators=(",", ":")), self._secrets)

    # -- OpenAPI with retries

    def _push_with_retry(self, path: str, body: dict, deadline: float, kind: str = "", user_id: str = "") -> dict:
        """POST until delivered (the response body) or DeliveryError once retrying is over."""
        attempt = 0
        refreshed = False
        while True:
            attempt += 1
            try:
                pending, response = self._post_openapi(path, body, kind, user_id)
                if pending is None:
                    return response
                body = {**body, "userIds": pending}  # only the throttled users are retried
                error = DeliveryError(f"flow-controlled: {len(pending)} user(s)", retryable=True, retry_after=1.0)
            except _InvalidToken:
                if refreshed:
                    raise DeliveryError("access token rejected twice", retryable=True) from None
                refreshed = True
                continue
            except DeliveryError as exc:
                if not exc.retryable:
                    raise
                error = exc
            delay = error.retry_after if error.retry_after is not None else min(30.0, 0.5 * 2 ** (attempt - 1))
            delay += random.uniform(0, delay * 0.25)
            if self._clock() + delay > deadline:
                raise DeliveryError(f"gave up after {attempt} attempts: {error}", retryable=True, out_of_time=True)
            log.warning("推送失败，%.1f 秒后重试 (第 %d 次): %s", delay, attempt, error)
            if self._stop.wait(delay):
                raise DeliveryError(f"stopping: {error}", retryable=True)

    def _post_openapi(self, path: str, body: dict, kind: str = "", user_id: str = "") -> tuple[list[str] | None, dict]:
        """One POST, asked of the budget first: (None, the response body) when delivered, (the throttled user ids, …)
        when some must be retried (docs/wire-facts.md §3)."""
        token = self.tokens.get()
        self.spend(kind or METERED_KINDS.get(path, path), user_id)
        try:
            reply = self._http.post_json(self.endpoint + path, body, {"x-acs-dingtalk-access-token": token})
        except HttpError as exc:
            raise DeliveryError(f"{path} request failed: {exc}", retryable=True) from None
        code = str(reply.body.get("code") or "")
        status = reply.status
        if status == 200 and not code:
            flow_controlled = [str(u) for u in reply.body.get("flowControlledStaffIdList") or []]
            invalid = [str(u) for u in reply.body.get("invalidStaffIdList") or []]
            if invalid and len(invalid) == len(body.get("userIds", [])):
                raise DeliveryError(f"invalid staff id(s): {','.join(invalid)}", retryable=False)
            return flow_controlled or None, reply.body
        if status in (400, 401) and code == "InvalidAuthentication" or status == 401:
            self.tokens.invalidate(token)
            raise _InvalidToken()
        detail = f"{path} HTTP {status} {code} {str(reply.body.get('message') or '')[:200]}".strip()
        if "ApiCountLimitForOrg" in code:
            # Not now, but not never: the quota resets monthly, so the outbox tries again later (with backoff).
            log.error("钉钉 API 月度调用额度已用完 (%s)，本次不再重试", code)
            if self.meter is not None:
                self.meter.limit_hit()
            raise DeliveryError(detail, retryable=False, permanent=False)
        if "QpsLimit" in code:
            raise DeliveryError(detail, retryable=True, retry_after=max(1.0, reply.retry_after or 1.0))
        if status == 429 or status >= 500:
            raise DeliveryError(detail, retryable=True, retry_after=reply.retry_after)
        raise DeliveryError(detail, retryable=False)
