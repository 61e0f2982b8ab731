"""A bot message as the rest of the bot sees it: the neutral `IncomingMessage` made from the Stream's raw callback.

The attachments are read from the raw data (the SDK parses only picture and richText: docs/wire-facts.md §6); names
shown to people are sanitised here, at the edge, and never become paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dingtalk.stream import sdk

KIND_LABELS = {"picture": "图片", "file": "文件", "video": "视频"}
# Attachments read from one message (a richText may carry many pictures): MAX_ATTACHMENTS_PER_MESSAGE of them are
# fetched and the rest named to the sender as skipped; past this many a message is not even read further.
MAX_PER_MESSAGE = 50
_EXTENSION = re.compile(r"^[A-Za-z0-9]{1,8}$")
# Path separators and control characters, and the brackets that frame a name in the prompt ("(图片 name, size)"
# inside "[…]"): a name cannot close that frame and pass its text off as the bot's.
_UNSAFE_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\:*?\"<>|\[\](){}]+")


@dataclass(frozen=True)
class AttachmentRef:
    """One attachment a message announced: its kind, its download code and the name to show (sanitised)."""

    kind: str  # picture, file or video
    download_code: str
    name: str


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
    attachments: tuple[AttachmentRef, ...] = ()  # pictures, files, videos to fetch (files/attachments.py)

    @property
    def conversation_key(self) -> str:
        return self.conversation_id or self.user_id

    @property
    def in_group(self) -> bool:
        return self.conversation_type == "2"


def display_name(raw: object, fallback: str, limit: int = 80) -> str:
    """A file name fit to show: no path separators or control characters, not hidden, at most `limit` chars."""
    name = _UNSAFE_NAME_CHARS.sub("_", raw if isinstance(raw, str) else "").strip(" .")
    if len(name) > limit:
        stem, dot, ext = name.rpartition(".")
        name = (stem[:limit - len(ext) - 2] + "…." + ext) if dot and len(ext) <= 8 else name[:limit]
    return name or fallback


def file_extension(name: str) -> str:
    """A name's extension, lower case, when it is a plain one (1-8 letters or digits); else ""."""
    ext = name.rpartition(".")[2] if "." in name else ""
    return ext.lower() if _EXTENSION.match(ext) else ""


def attachment_refs(data: dict) -> tuple[AttachmentRef, ...]:
    """The attachments of a bot-message callback's raw `data` (picture, file, video, pictures in a richText)."""
    msgtype, content = data.get("msgtype"), data.get("content")
    if not isinstance(content, dict):
        return ()
    refs: list[AttachmentRef] = []
    if msgtype in KIND_LABELS and isinstance(content.get("downloadCode"), str) and content["downloadCode"]:
        video_ext = content.get("videoType") if isinstance(content.get("videoType"), str) else ""
        fallback = {"picture": "图片", "file": "文件", "video": f"视频.{file_extension('v.' + video_ext) or 'mp4'}"}
        refs.append(AttachmentRef(msgtype, content["downloadCode"], display_name(content.get("fileName"),
                                                                                 fallback[msgtype])))
    elif msgtype == "richText" and isinstance(content.get("richText"), list):
        for item in content["richText"]:
            # downloadCode, never pictureDownloadCode (which can give HTTP 500: docs/wire-facts.md §6)
            if isinstance(item, dict) and item.get("type") == "picture" and isinstance(item.get("downloadCode"), str) \
                    and item["downloadCode"]:
                refs.append(AttachmentRef("picture", item["downloadCode"], "图片"))
    return tuple(refs[:MAX_PER_MESSAGE])


def incoming_from_callback(data: dict) -> IncomingMessage:
    """Turn a bot-message callback's `data` into an `IncomingMessage` (raises ValueError if malformed)."""
    if not isinstance(data, dict):
        raise ValueError("callback data is not an object")
    try:
        message = sdk().ChatbotMessage.from_dict(data)
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
