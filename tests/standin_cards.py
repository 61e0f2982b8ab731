"""The stand-in's AI card APIs and the org's monthly call quota, attached to a `DingTalkStandin`.

`CardStandin(standin)` adds createAndDeliver, card streaming and card data updates (docs/wire-facts.md §5), the card
callback frame, and a quota: every metered request (pushes and card calls) counts, and past `quota` DingTalk answers
403 `Forbidden.AccessDenied.ApiCountLimitForOrg`. It rejects what DingTalk rejects: a missing outTrackId, an unknown
(unpublished) template, non-string cardParamMap values, a space the robot cannot deliver to (HTTP 200 with a failed
deliverResults entry). Error codes not confirmed against DingTalk are marked "unverified".
A plain data update of a variable that is still streaming is ignored, as DingTalk does (the finalize trap).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.standin import BATCH_SEND_PATH, GROUP_SEND_PATH, OPEN_PATH, DingTalkStandin

CREATE_AND_DELIVER_PATH = "/v1.0/card/instances/createAndDeliver"
STREAMING_PATH = "/v1.0/card/streaming"
INSTANCES_PATH = "/v1.0/card/instances"
CARD_TOPIC = "/v1.0/card/instances/callback"
METERED_PATHS = {BATCH_SEND_PATH, GROUP_SEND_PATH, CREATE_AND_DELIVER_PATH, STREAMING_PATH, INSTANCES_PATH}
TEMPLATE_ID = "standin-ai-card.schema"
QUOTA_ERROR = {"code": "Forbidden.AccessDenied.ApiCountLimitForOrg",
               "message": "The API call count of your organization exceeds the limit.", "errcode": 90020}


@dataclass
class Streamed:
    """One card streaming call."""

    key: str
    content: str
    full: bool
    finalize: bool
    error: bool
    time: float


@dataclass
class Card:
    """A card instance as DingTalk holds it: where it went, its data and what was streamed into it."""

    track: str
    template: str
    space: str  # openSpaceId
    params: dict[str, str]
    created: float
    streams: list[Streamed] = field(default_factory=list)
    streaming_keys: set[str] = field(default_factory=set)  # keys streamed and not yet finalized
    streamed_text: dict[str, str] = field(default_factory=dict)
    ignored_updates: list[dict[str, str]] = field(default_factory=list)

    def shown(self, key: str = "msgContent") -> str:
        """The text the card shows for `key`: the streamed text, else the card data."""
        return self.streamed_text.get(key, self.params.get(key, ""))

    @property
    def status(self) -> str:
        return self.params.get("flowStatus", "")

    def distinct_updates(self, key: str = "msgContent") -> list[str]:
        """The distinct texts streamed into `key` before it was finalized, in order."""
        seen: list[str] = []
        for call in self.streams:
            if call.key == key and not call.finalize and (not seen or seen[-1] != call.content):
                seen.append(call.content)
        return seen


class CardStandin:
    """Card routes, the call quota and card callbacks on a running `DingTalkStandin`."""

    def __init__(self, standin: DingTalkStandin, *, templates: tuple[str, ...] = (TEMPLATE_ID,),
                 quota: int | None = None) -> None:
        self.standin = standin
        self.templates = set(templates)
        self.quota = quota
        self.metered = 0  # metered requests received (refused ones too)
        self.cards: dict[str, Card] = {}
        self.missing_permission = False  # the app lacks Card.Instance.Write / Card.Streaming.Write
        self._undelivered = 0  # the next createAndDeliver calls answer 200 with a failed delivery
        self._lock = threading.Lock()
        standin.extra_routes.update({
            ("POST", CREATE_AND_DELIVER_PATH): self._create_and_deliver,
            ("PUT", STREAMING_PATH): self._streaming,
            ("PUT", INSTANCES_PATH): self._update,
        })
        standin.gate = self._gate

    # -- test controls and views

    def fail_delivery_next(self, times: int = 1) -> None:
        """The next `times` createAndDeliver calls answer HTTP 200 with `deliverResults[].success: false`."""
        with self._lock:
            self._undelivered += times

    def card_list(self) -> list[Card]:
        with self._lock:
            return sorted(self.cards.values(), key=lambda card: card.created)

    def card_for(self, task_id: str) -> Card | None:
        """The newest card whose outTrackId names the task (the bot's ids are "cb-<task>-<run>")."""
        return next((c for c in reversed(self.card_list()) if f"-{task_id}-" in f"-{c.track}-"), None)

    def send_card_callback(self, track: str, user_id: str, action: str = "stop", connection_id: str | None = None
                           ) -> str:
        """A button click on a card, as a Stream CALLBACK frame (to one connection at random, or the one named);
        the bot must have subscribed the topic."""
        opened = [r for r in self.standin.requests if r.path == OPEN_PATH and r.status == 200]
        topics = [s.get("topic") for s in (opened[-1].body or {}).get("subscriptions", [])] if opened else []
        if CARD_TOPIC not in topics:
            raise AssertionError(f"the bot did not subscribe to {CARD_TOPIC}: {topics}")
        card = self.cards.get(track)
        data = {"outTrackId": track, "userId": user_id, "corpId": self.standin.corp_id, "type": "actionCallback",
                "spaceType": "IM", "spaceId": card.space if card else "", "extension": "{}",
                "content": json.dumps({"cardPrivateData": {"actionIds": [action], "params": {}}})}
        return self.standin._send_frame("CALLBACK", CARD_TOPIC, data, connection_id)

    # -- the quota

    def _gate(self, path: str) -> tuple[int, dict[str, Any]] | None:
        if path not in METERED_PATHS:
            return None
        with self._lock:
            self.metered += 1
            over = self.quota is not None and self.metered > self.quota
        return (403, dict(QUOTA_ERROR)) if over else None

    # -- the routes

    def _token_error(self, request: web.Request) -> tuple[int, dict[str, Any]] | None:
        token = request.headers.get("x-acs-dingtalk-access-token", "")
        with self.standin._lock:
            expiry = self.standin._state.tokens.get(token)
        if expiry is None or time.monotonic() >= expiry:
            return 401, {"code": "InvalidAuthentication", "message": "不合法的access_token"}
        if self.missing_permission:  # what a missing Card.* permission looks like (docs/wire-facts.md §5)
            return 500, {"code": "unknownError", "message": "unknown error"}
        return None

    @staticmethod
    def _param_map_error(params: Any) -> tuple[int, dict[str, Any]] | None:
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            return 400, {"code": "invalidParameter.cardData.cardParamMap",  # unverified code
                         "message": "cardParamMap values must all be strings"}
        return None

    async def _create_and_deliver(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        error = self._token_error(request)
        if error:
            return error
        track = body.get("outTrackId")
        if not isinstance(track, str) or not track:
            return 400, {"code": "MissingoutTrackId", "message": "outTrackId is mandatory for this action."}
        if body.get("cardTemplateId") not in self.templates:
            return 400, {"code": "param.templateUnpublished", "message": "card template not found or unpublished"}
        params = (body.get("cardData") or {}).get("cardParamMap") if isinstance(body.get("cardData"), dict) else None
        error = self._param_map_error(params if params is not None else {})
        if error:
            return error
        if track in self.cards:
            return 400, {"code": "param.outTrackIdExists", "message": "outTrackId already used"}  # unverified
        space = str(body.get("openSpaceId") or "")
        robot = self.standin.robot_code
        if space.startswith("dtv1.card//IM_ROBOT."):
            model = body.get("imRobotOpenDeliverModel") or {}
            ok = model.get("spaceType") == "IM_ROBOT" and model.get("robotCode", robot) == robot
        elif space.startswith("dtv1.card//IM_GROUP.cid"):
            ok = (body.get("imGroupOpenDeliverModel") or {}).get("robotCode") == robot
        else:
            return 400, {"code": "invalidParameter.openSpaceId", "message": f"openSpaceId 不合法: {space[:60]}"}
        with self._lock:
            if self._undelivered > 0:
                self._undelivered -= 1
                ok = False
            if ok:
                self.cards[track] = Card(track, body["cardTemplateId"], space, dict(params or {}), time.monotonic())
        result = {"spaceType": space.split("//")[1].split(".")[0], "spaceId": space.split(".", 1)[-1],
                  "success": ok, **({} if ok else {"errorMsg": "spaceId is illegal"})}
        return 200, {"success": True, "result": {"outTrackId": track, "deliverResults": [result]}}

    def _card(self, body: dict[str, Any]) -> Card | tuple[int, dict[str, Any]]:
        track = body.get("outTrackId")
        if not isinstance(track, str) or not track:
            return 400, {"code": "MissingoutTrackId", "message": "outTrackId is mandatory for this action."}
        card = self.cards.get(track)
        if card is None:
            return 400, {"code": "param.cardInstanceNotExist", "message": "card instance not found"}  # unverified
        return card

    def _authorized_card(self, request: web.Request, body: dict[str, Any]) -> Card | tuple[int, dict[str, Any]]:
        """The card a streaming or update call names, or the error DingTalk answers (token first, then the card)."""
        return self._token_error(request) or self._card(body)

    async def _streaming(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        card = self._authorized_card(request, body)
        if isinstance(card, tuple):
            return card
        key, content = body.get("key"), body.get("content")
        if not isinstance(key, str) or not key or not isinstance(content, str) or not body.get("guid"):
            return 400, {"code": "invalidParameter", "message": "key, content and guid are required"}
        with self._lock:
            full, final = bool(body.get("isFull")), bool(body.get("isFinalize"))
            card.streams.append(Streamed(key, content, full, final, bool(body.get("isError")), time.monotonic()))
            card.streamed_text[key] = content if full else card.streamed_text.get(key, "") + content
            if final:
                card.streaming_keys.discard(key)
            else:
                card.streaming_keys.add(key)
        return 200, {"success": True, "result": True}

    async def _update(self, request: web.Request, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        card = self._authorized_card(request, body)
        if isinstance(card, tuple):
            return card
        params = (body.get("cardData") or {}).get("cardParamMap") if isinstance(body.get("cardData"), dict) else None
        error = self._param_map_error(params)
        if error:
            return error
        with self._lock:
            by_key = bool((body.get("cardUpdateOptions") or {}).get("updateCardDataByKey"))
            ignored = {k: v for k, v in params.items() if k in card.streaming_keys}
            if ignored:
                card.ignored_updates.append(ignored)
            kept = {k: v for k, v in params.items() if k not in card.streaming_keys}
            card.params = {**card.params, **kept} if by_key else kept
        return 200, {"success": True, "result": True, "requestId": uuid.uuid4().hex}
