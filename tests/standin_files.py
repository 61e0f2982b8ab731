"""The stand-in's pictures and files: messageFiles/download, the download URLs it serves, and the oapi media upload.

Hooked into `DingTalkStandin` as `standin.files` (routes registered before its catch-all). Wire shapes follow
docs/wire-facts.md §6: `POST /v1.0/robot/messageFiles/download` {downloadCode, robotCode} → {downloadUrl} (a URL
this server serves itself), `POST /media/upload?access_token=…&type=image|file|video|voice` with the multipart field
`media` → {errcode: 0, media_id}, and the push message keys `sampleImageMsg` {photoURL} and `sampleFile`
{mediaId, fileName, fileType}, whose media id must be one this server issued. It refuses what DingTalk refuses:
an unknown or picture-only download code, a bad token, a missing `media` field, a file over 20 MB, a type DingTalk
does not carry (.html, executables, a non-image uploaded as an image).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from tests.standin import DingTalkStandin, SentMessage

DOWNLOAD_PATH = "/v1.0/robot/messageFiles/download"
FILES_PATH = "/files/"
UPLOAD_PATH = "/media/upload"
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_VOICE_BYTES = 2 * 1024 * 1024
UPLOAD_TYPES = ("image", "voice", "video", "file")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "bmp")
REFUSED_EXTENSIONS = ("html", "htm", "xhtml", "svg", "exe", "msi", "bat", "cmd", "com", "scr", "sh", "js", "jar",
                      "apk", "dll", "vbs", "ps1", "php")
FILE_MESSAGE_KEYS = {"sampleImageMsg": ("photoURL",), "sampleFile": ("mediaId", "fileName", "fileType")}


@dataclass
class Upload:
    """One accepted media upload."""

    media_id: str
    type: str
    filename: str
    data: bytes


@dataclass
class _Download:
    data: bytes
    announce_length: bool
    delay: float = 0.0


class FileRoutes:
    """State and handlers of the file routes of one stand-in."""

    def __init__(self, standin: DingTalkStandin) -> None:
        self.standin = standin
        self._lock = threading.Lock()
        self._codes: dict[str, _Download] = {}
        self._picture_codes: set[str] = set()  # pictureDownloadCode values: the download API fails on them
        self._urls: dict[str, _Download] = {}
        self.uploads: dict[str, Upload] = {}
        self.files_served = 0  # GETs of a download URL that were answered

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post(DOWNLOAD_PATH, self._download)
        app.router.add_get(FILES_PATH + "{token}", self._serve)
        app.router.add_post(UPLOAD_PATH, self._upload)

    # ---------------------------------------------------------------- test controls

    def add_download(self, data: bytes, *, announce_length: bool = True, delay: float = 0.0) -> tuple[str, str]:
        """Register `data` as an attachment: (downloadCode, pictureDownloadCode). Without `announce_length`
        the download is served chunked, with no Content-Length; `delay`: seconds before the answer starts."""
        code, picture_code = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        with self._lock:
            self._codes[code] = _Download(data, announce_length, delay)
            self._picture_codes.add(picture_code)
        return code, picture_code

    def file_messages(self) -> list[tuple[Any, Upload]]:
        """Accepted pushes (1:1 or group) carrying a picture or a file, with the upload each names."""
        found = []
        for record in self.standin.requests:
            if record.status != 200 or record.faulted or record.msg_key not in FILE_MESSAGE_KEYS:
                continue
            if record.user_ids and not record.delivered_user_ids:
                continue
            param = record.msg_param or {}
            upload = self.uploads.get(param.get("mediaId") or param.get("photoURL") or "")
            if upload is not None:
                found.append((record, upload))
        return found

    # ---------------------------------------------------------------- checks used by the push routes

    def check_push(self, msg_key: str, param: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        """A picture or file push must name media this server issued (an image for a picture)."""
        if msg_key == "sampleImageMsg":
            photo = param.get("photoURL")
            upload = self.uploads.get(photo) if isinstance(photo, str) else None
            if not (isinstance(photo, str) and photo.startswith(("http://", "https://"))) and \
                    (upload is None or upload.type != "image"):
                return 400, {"code": "invalidParameter.msgParam.invalid", "message": "photoURL 不是有效的图片"}
        if msg_key == "sampleFile":
            upload = self.uploads.get(param.get("mediaId")) if isinstance(param.get("mediaId"), str) else None
            if upload is None:
                return 400, {"code": "invalidParameter.mediaId.invalid", "message": "mediaId 不存在"}
            if not isinstance(param.get("fileName"), str) or not param["fileName"] or \
                    not isinstance(param.get("fileType"), str) or not param["fileType"]:
                return 400, {"code": "invalidParameter.msgParam.invalid", "message": "fileName/fileType 不能为空"}
        return None

    def _token_ok(self, token: str) -> bool:
        with self.standin._lock:
            expiry = self.standin._state.tokens.get(token)
        return expiry is not None and time.monotonic() < expiry

    # ---------------------------------------------------------------- handlers

    async def _download(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        raw = (await request.read()).decode("utf-8", "replace")
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        fault = self.standin._take_fault(request.path)
        if fault:
            self.standin._record(request, raw, body, arrived, fault.status, fault.body, faulted=True)
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        status, response = self._answer_download(request, body)
        self.standin._record(request, raw, body, arrived, status, response)
        return web.json_response(response, status=status)

    def _answer_download(self, request: web.Request, body: Any) -> tuple[int, dict[str, Any]]:
        if not self._token_ok(request.headers.get("x-acs-dingtalk-access-token", "")):
            return 401, {"code": "InvalidAuthentication", "message": "不合法的access_token"}
        if not isinstance(body, dict) or body.get("robotCode") != self.standin.robot_code:
            return 400, {"code": "invalidParameter.robotCode", "message": "robotCode 不合法"}
        code = body.get("downloadCode")
        with self._lock:
            download = self._codes.get(code) if isinstance(code, str) else None
            picture_code = isinstance(code, str) and code in self._picture_codes
        if picture_code:  # what DingTalk does with a pictureDownloadCode (docs/wire-facts.md §6)
            return 500, {"code": "unknownError", "message": "系统错误"}
        if download is None:
            return 400, {"code": "invalidParameter.downloadCode", "message": "downloadCode 不存在或已过期"}
        url_token = secrets.token_urlsafe(32)
        with self._lock:
            self._urls[url_token] = download
        return 200, {"downloadUrl": f"{self.standin.base_url}{FILES_PATH}{url_token}?Expires=300&Signature=x"}

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        with self._lock:
            download = self._urls.get(request.match_info["token"])
        if download is None:
            self.standin._record(request, "", None, arrived, 403, None)
            return web.Response(status=403, text="AccessDenied")
        self.standin._record(request, "", None, arrived, 200, {"size": len(download.data)})
        self.files_served += 1
        await asyncio.sleep(download.delay)
        if download.announce_length:
            return web.Response(body=download.data, content_type="application/octet-stream")
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(download.data), 64 * 1024):
            await response.write(download.data[start:start + 64 * 1024])
        await response.write_eof()
        return response

    async def _upload(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        raw = await request.read()
        fault = self.standin._take_fault(request.path)
        summary = {"type": request.query.get("type"), "bytes": len(raw)}
        if fault:
            self.standin._record(request, "", summary, arrived, fault.status, fault.body, faulted=True)
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        response = self._answer_upload(request, raw, summary)
        self.standin._record(request, "", summary, arrived, 200, response)
        return web.json_response(response, dumps=lambda o: json.dumps(o, ensure_ascii=False))

    def _answer_upload(self, request: web.Request, raw: bytes, summary: dict[str, Any]) -> dict[str, Any]:
        if not self._token_ok(request.query.get("access_token", "")):
            return {"errcode": 40014, "errmsg": "不合法的access_token"}
        kind = request.query.get("type", "")
        if kind not in UPLOAD_TYPES:
            return {"errcode": 40004, "errmsg": "不合法的媒体文件类型"}
        parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + request.headers.get("Content-Type", "").encode() + b"\r\n\r\n" + raw)
        media = next((part for part in parsed.iter_parts() if part.get_param("name", header="content-disposition")
                      == "media"), None) if parsed.is_multipart() else None
        if media is None:
            return {"errcode": 41005, "errmsg": "缺少多媒体文件数据 (media)"}
        filename = media.get_filename() or ""
        data = media.get_payload(decode=True) or b""
        summary.update(filename=filename, size=len(data))
        ext = filename.rpartition(".")[2].lower() if "." in filename else ""
        if len(data) > (MAX_VOICE_BYTES if kind == "voice" else MAX_UPLOAD_BYTES):
            return {"errcode": 40006, "errmsg": "不合法的文件大小"}
        if ext in REFUSED_EXTENSIONS or (kind == "image" and ext not in IMAGE_EXTENSIONS):
            return {"errcode": 40005, "errmsg": "不合法的文件类型"}
        media_id = "@lA" + secrets.token_urlsafe(24)
        with self._lock:
            self.uploads[media_id] = Upload(media_id, kind, filename, data)
        return {"errcode": 0, "errmsg": "ok", "media_id": media_id, "type": kind, "created_at": int(time.time() * 1000)}


# ---------------------------------------------------------------- bot messages carrying pictures and files


def send_picture(standin: DingTalkStandin, data: bytes, *, delay: float = 0.0, **message: Any) -> SentMessage:
    """A `picture` bot message whose picture is `data` (its download answered after `delay` seconds)."""
    code, picture_code = standin.files.add_download(data, delay=delay)
    return standin.send_bot_message(msgtype="picture", content={"downloadCode": code,
                                                                "pictureDownloadCode": picture_code}, **message)


def send_file(standin: DingTalkStandin, data: bytes, file_name: str, *, announce_length: bool = True,
              **message: Any) -> SentMessage:
    """A `file` bot message carrying `data` as `file_name`."""
    code, _ = standin.files.add_download(data, announce_length=announce_length)
    return standin.send_bot_message(msgtype="file", content={"downloadCode": code, "fileName": file_name,
                                                             "spaceId": "1234", "fileId": "5678"}, **message)


def send_rich_text(standin: DingTalkStandin, parts: list[str | bytes], **message: Any) -> SentMessage:
    """A `richText` bot message: each str a text item, each bytes a picture item."""
    items: list[dict[str, str]] = []
    for part in parts:
        if isinstance(part, bytes):
            code, picture_code = standin.files.add_download(part)
            items.append({"type": "picture", "downloadCode": code, "pictureDownloadCode": picture_code})
        else:
            items.append({"text": part})
    return standin.send_bot_message(msgtype="richText", content={"richText": items}, **message)
