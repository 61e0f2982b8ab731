"""The DingTalk AI card calls: create-and-deliver, stream a variable, update the card's data — each one metered.

Wire shapes in docs/wire-facts.md §5. Every call is one attempt (no transport retries: the next update carries the
latest text anyway), asked of the call budget first through `DingTalkSender.spend` (for the task's user), with the
sender's access token. An HTTP 200 can still be a failure: createAndDeliver's `result.deliverResults[].success` is
checked. Errors are values: each call returns "" when it worked, else one line saying why (`NOT_SPENT` first when the
budget refused the call: nothing was sent, and the card is not at fault).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from dingtalk.route import Route
from dingtalk_sender import DeliveryError, DingTalkSender, HttpError, JsonHttp, SpendRefused

CREATE_AND_DELIVER_PATH = "/v1.0/card/instances/createAndDeliver"
STREAMING_PATH = "/v1.0/card/streaming"
INSTANCES_PATH = "/v1.0/card/instances"
CARD_CALLBACK_TOPIC = "/v1.0/card/instances/callback"
NOT_SPENT = "not sent (call budget)"  # how a call the budget refused begins its error line
# flowStatus values of the AI card template (docs/wire-facts.md §5).
PROCESSING, INPUTTING, FINISHED, EXECUTING, FAILED = "1", "2", "3", "4", "5"


@dataclass(frozen=True)
class CardVariables:
    """The template's variable names: the streamed markdown, the status, the title, and the id of the tool request
    whose approve/deny buttons the card shows ("" hides them)."""

    content: str = "msgContent"
    status: str = "flowStatus"
    title: str = "msgTitle"
    approval: str = "pendingApproval"

    @classmethod
    def from_names(cls, names: tuple[str, ...]) -> CardVariables:
        """From DINGTALK_CARD_VARIABLES (content, status, title, approval; missing ones keep their defaults)."""
        defaults = [cls.content, cls.status, cls.title, cls.approval]
        return cls(*(list(names) + defaults[len(names):])[:4])


class CardApi:
    """Makes the card calls for one template, through the sender's token and call meter."""

    def __init__(self, sender: DingTalkSender, template_id: str, variables: CardVariables, *,
                 http: JsonHttp | None = None) -> None:
        self.sender = sender
        self.template_id = template_id
        self.variables = variables
        self._http = http or JsonHttp(pool_size=8, transport_retries=0)

    def _call(self, method: str, path: str, body: dict, kind: str, user_id: str) -> tuple[str, dict]:
        """One metered call for `user_id`'s task (a second one only after DingTalk refused the token): ("", body) or
        (why, body)."""
        body = self.sender.redact(body)  # every card text (the streamed answer, title, question) without secrets
        for attempt in (1, 2):
            try:
                token = self.sender.tokens.get()
            except DeliveryError as exc:
                return str(exc), {}
            try:
                self.sender.spend(kind, user_id)
            except SpendRefused as exc:
                return f"{NOT_SPENT}: {exc}", {}
            try:
                reply = self._http.post_json(self.sender.endpoint + path, body,
                                             {"x-acs-dingtalk-access-token": token}, method=method)
            except HttpError as exc:
                return f"{path} request failed: {exc}", {}
            code = str(reply.body.get("code") or "")
            if (reply.status == 401 or code == "InvalidAuthentication") and attempt == 1:
                self.sender.tokens.invalidate(token)
                continue
            if "ApiCountLimitForOrg" in code and self.sender.meter is not None:
                self.sender.meter.limit_hit()
            if reply.status != 200 or code:
                return f"{path} HTTP {reply.status} {code} {str(reply.body.get('message') or '')[:160]}".strip(), {}
            return "", reply.body
        return f"{path}: access token rejected twice", {}

    def create_and_deliver(self, out_track_id: str, route: Route, title: str, status: str = INPUTTING) -> str:
        """Create the card in the route's chat (1:1: the robot's chat with the user; group: the group)."""
        names = self.variables
        body: dict = {
            "cardTemplateId": self.template_id, "outTrackId": out_track_id, "callbackType": "STREAM",
            "cardData": {"cardParamMap": {names.content: "", names.status: status, names.title: title}},
            "imGroupOpenSpaceModel": {"supportForward": True}, "imRobotOpenSpaceModel": {"supportForward": True},
            "userIdType": 1,
        }
        if route.is_group:
            body["openSpaceId"] = f"dtv1.card//IM_GROUP.{route.conversation_id}"
            body["imGroupOpenDeliverModel"] = {"robotCode": self.sender.robot_code}
        else:
            body["openSpaceId"] = f"dtv1.card//IM_ROBOT.{route.user_id}"
            body["imRobotOpenDeliverModel"] = {"spaceType": "IM_ROBOT", "robotCode": self.sender.robot_code}
        error, answer = self._call("POST", CREATE_AND_DELIVER_PATH, body, "card_create", route.user_id)
        if error:
            return error
        results = (answer.get("result") or {}).get("deliverResults") if isinstance(answer.get("result"), dict) else None
        failed = [r for r in results or [] if not (isinstance(r, dict) and r.get("success"))]
        if not results or failed:  # an HTTP 200 that did not deliver (docs/wire-facts.md §5)
            why = "; ".join(str(r.get("errorMsg") or "?") for r in failed if isinstance(r, dict)) or "no deliverResults"
            return f"{CREATE_AND_DELIVER_PATH}: not delivered ({why[:160]})"
        return ""

    def stream(self, out_track_id: str, content: str, *, finalize: bool = False, error: bool = False,
               user_id: str = "") -> str:
        """Replace the streamed variable with `content` (whole text); `finalize` ends its streaming."""
        body = {"outTrackId": out_track_id, "guid": uuid.uuid4().hex, "key": self.variables.content,
                "content": content, "isFull": True, "isFinalize": finalize, "isError": error}
        return self._call("PUT", STREAMING_PATH, body, "card_stream", user_id)[0]

    def update(self, out_track_id: str, values: dict[str, str], *, user_id: str = "") -> str:
        """Set some of the card's variables (by key; the others stay)."""
        body = {"outTrackId": out_track_id, "cardData": {"cardParamMap": {k: str(v) for k, v in values.items()}},
                "cardUpdateOptions": {"updateCardDataByKey": True}}
        return self._call("PUT", INSTANCES_PATH, body, "card_update", user_id)[0]

    def end(self, out_track_id: str, content: str, status: str, *, hide_buttons: bool = False,
            user_id: str = "") -> str:
        """Finish a card: the full text with isFinalize first (a plain update is ignored while a key streams),
        then the status (and, if approve/deny buttons were shown, their variable emptied)."""
        error = self.stream(out_track_id, content, finalize=True, error=status == FAILED, user_id=user_id)
        values = {self.variables.status: status, **({self.variables.approval: ""} if hide_buttons else {})}
        return error or self.update(out_track_id, values, user_id=user_id)
