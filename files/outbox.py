"""Files CodeBuddy writes into its workspace's `outbox/`: staged when the run ends, sent after the answer.

When a run succeeds, `OutboxClient` (a wrapper of the CLI client, like metrics.TimedClient) moves what the run
left in `outbox/` to a staging directory beside the workspace, out of the CLI's reach, and adds to the answer
what will be sent and what was refused. Once the answer is delivered, `OutboxFiles.send_staged` uploads each
file (`/media/upload` on DINGTALK_OAPI_ENDPOINT) and pushes it — pictures as `sampleImageMsg`, the rest as
`sampleFile` — through batchSend (1:1) or groupMessages (groups): the session webhook cannot carry files
(docs/wire-facts.md §6). Sent files end in `outbox/sent/`. Staging lives on disk, so a restart that re-delivers
an answer also sends its files.

Nothing outside the workspace is ever read: `outbox/` and each entry are opened without following symlinks,
a symlink (or a hard-linked file) is refused and moved to `outbox/refused/`, as is a file over the size cap.
"""

from __future__ import annotations

import glob
import json
import logging
import mimetypes
import os
import re
import stat
import threading
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import urllib3

from codebuddy.sandbox import Workspaces
from codebuddy_client import RunResult
from common.logs import TaskLogger
from common.redaction import replace_secrets
from config import HTTP_TIMEOUT
from dingtalk.incoming import display_name
from dingtalk.route import Route
from dingtalk_sender import (
    BATCH_SEND_PATH,
    GROUP_SEND_PATH,
    DeliveryError,
    DingTalkSender,
    SpendRefused,
    describe_network_error,
)
from files.attachments import human_size
from tasks.task import Task

log = logging.getLogger("outbox_files")

OUTBOX_DIR = "outbox"
SENT_DIR = "sent"
REFUSED_DIR = "refused"
STAGE_DIR = "outbox-sending"  # beside the workspace: the CLI's jail does not show it
UPLOAD_PATH = "/media/upload"
IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "gif", "bmp"})
# Types DingTalk refuses to carry as a file message: sent inside a .zip instead.
ZIPPED_EXTENSIONS = frozenset({"html", "htm", "xhtml", "shtml", "svg", "exe", "msi", "bat", "cmd", "com", "scr",
                               "sh", "bash", "ps1", "vbs", "js", "mjs", "jar", "apk", "dll", "so", "dmg", "app",
                               "php", "jsp", "asp", "aspx", "py", "pl", "rb"})
UPLOAD_ATTEMPTS = 3
FILE_CALLS = 2  # metered calls one file costs at least: its upload and its push
_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_TOKEN_ERRCODES = (40001, 40014, 42001)  # invalid or expired access token: fetch a new one and retry


def system_prompt(max_files: int, max_mb: int) -> str:
    """What CodeBuddy is told about `outbox/` and `attachments/` (passed as --append-system-prompt)."""
    return (f"To send files to the user, write them into the directory {OUTBOX_DIR}/ under the current working "
            f"directory (for example {OUTBOX_DIR}/report.xlsx). After your answer every file there is sent to the "
            f"chat (at most {max_files} per answer, {max_mb} MB each; .png/.jpg/.gif as pictures) and moved to "
            f"{OUTBOX_DIR}/{SENT_DIR}/. Say in your answer which files you put there. Files and pictures the user "
            f"sent are saved under attachments/ and named in the prompt.")


def _open_dir(name: str, dir_fd: int | None = None, create: bool = False) -> int:
    """Open (and make) a directory without following a symlink: OSError when `name` is one."""
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            pass
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


def _free_name(name: str, dir_fd: int) -> str:
    """`name`, or `name` with a number before its extension, not yet taken in the directory."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    candidate, number = name, 1
    while True:
        try:
            os.lstat(candidate, dir_fd=dir_fd)
        except FileNotFoundError:
            return candidate
        number += 1
        candidate = f"{stem}-{number}{dot}{ext}"


def _refuse(outbox_fd: int, name: str) -> None:
    """Move a refused entry (the link itself, never its target) to outbox/refused/."""
    refused_fd = _open_dir(REFUSED_DIR, outbox_fd, create=True)
    try:
        os.rename(name, _free_name(name, refused_fd), src_dir_fd=outbox_fd, dst_dir_fd=refused_fd)
    finally:
        os.close(refused_fd)


def _copy_to_stage(outbox_fd: int, name: str, shown: str, stage_dir: str, max_bytes: int) -> tuple[str, int]:
    """Copy one regular file (opened without following links) to staging, zipped if DingTalk refuses its type."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=outbox_fd)
    except OSError as exc:
        log.warning("outbox 文件无法打开: %s (%s)", shown, exc.strerror)
        return "", 0
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return "", 0
        data = source.read(max_bytes + 1)
    if len(data) > max_bytes:
        return "", 0
    ext = shown.rpartition(".")[2].lower() if "." in shown else ""
    stage_fd = _open_dir(stage_dir)
    try:
        target = _free_name(shown + ".zip" if ext in ZIPPED_EXTENSIONS else shown, stage_fd)
        out_fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=stage_fd)
    finally:
        os.close(stage_fd)
    with os.fdopen(out_fd, "wb") as out:
        if target.endswith(".zip") and ext in ZIPPED_EXTENSIONS:
            with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(shown, data)
        else:
            out.write(data)
        size = out.tell()
    return target, size


def has_room_for_a_file(sender: DingTalkSender, user_id: str) -> None:
    """SpendRefused unless `user_id` may still spend a file's two calls (upload, push) today: an upload whose push is
    then refused would be a call spent for nothing."""
    budget = sender.meter
    why = budget.short_of(user_id, FILE_CALLS) if budget is not None else ""
    if why:
        raise SpendRefused(why)


class FileSendError(Exception):
    """Uploading or sending one file failed."""


class OutboxFiles:
    """Stages the files a run left in `outbox/` and sends them to the task's chat after its answer."""

    def __init__(self, sender: DingTalkSender, workspaces: Workspaces, *, oapi_endpoint: str, max_bytes: int,
                 max_files: int, retry_window: float = 600.0, pool: urllib3.PoolManager | None = None,
                 sleep: Callable[[float], Any] = time.sleep) -> None:
        self.sender = sender
        self.workspaces = workspaces
        self.oapi_endpoint = oapi_endpoint.rstrip("/")
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.retry_window = retry_window
        self._pool = pool or urllib3.PoolManager(num_pools=2, maxsize=4, retries=False, timeout=urllib3.Timeout(
            connect=HTTP_TIMEOUT[0], read=HTTP_TIMEOUT[1] * 2))
        self._sleep = sleep
        self._senders = ThreadPoolExecutor(max_workers=2, thread_name_prefix="outbox-files")
        self._lock = threading.Lock()

    def _stage_dir(self, conversation_key: str, task_id: str) -> str:
        if not _TASK_ID.match(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return os.path.join(self.workspaces.base_for(conversation_key), STAGE_DIR, task_id)  # made when a file comes

    # -- when the run ends

    def collect(self, conversation_key: str, task_id: str) -> str:
        """Move what the run left in `outbox/` to staging; the lines to add to the answer ("" when none)."""
        workspace = self.workspaces.dirs_for(conversation_key).workspace
        ws_fd = _open_dir(workspace)
        try:
            try:
                outbox_fd = _open_dir(OUTBOX_DIR, ws_fd)
            except FileNotFoundError:
                return ""
            except OSError:  # outbox itself is a symlink (or a file): never follow it
                log.warning("outbox/ 不是目录 (可能是符号链接)，已拒绝 task=%s", task_id)
                return f"\n\n---\n{OUTBOX_DIR}/ 是符号链接或文件，未发送任何文件。"
        finally:
            os.close(ws_fd)
        try:
            with self._lock:
                staged, notes = self._stage(outbox_fd, conversation_key, task_id)
        finally:
            os.close(outbox_fd)
        lines = []
        if staged:
            lines.append("随后发送文件: " + "、".join(f"{name} ({human_size(size)})" for name, size in staged))
        lines += notes
        return ("\n\n---\n" + "\n".join(f"- {line}" for line in lines)) if lines else ""

    def _stage(self, outbox_fd: int, conversation_key: str, task_id: str) -> tuple[list[tuple[str, int]], list[str]]:
        entries = sorted(entry.name for entry in os.scandir(outbox_fd)
                         if entry.name not in (SENT_DIR, REFUSED_DIR) and not entry.name.startswith("."))
        staged: list[tuple[str, int]] = []
        notes: list[str] = []
        left = 0
        stage_dir = ""
        for name in entries:
            info = os.lstat(name, dir_fd=outbox_fd)
            shown = display_name(name, "file")
            if stat.S_ISDIR(info.st_mode):
                continue
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
                _refuse(outbox_fd, name)
                log.warning("outbox 中的 %s 是符号链接或链接文件，已拒绝 task=%s", shown, task_id)
                notes.append(f"{shown} 是链接，不是工作目录中的普通文件: 未发送 (已移到 {OUTBOX_DIR}/{REFUSED_DIR}/)")
                continue
            if info.st_size > self.max_bytes:
                _refuse(outbox_fd, name)
                notes.append(f"{shown} 超过 {self.max_bytes // (1024 * 1024)} MB ({human_size(info.st_size)}): "
                             f"未发送 (已移到 {OUTBOX_DIR}/{REFUSED_DIR}/)")
                continue
            if len(staged) >= self.max_files:
                left += 1
                continue
            if not stage_dir:
                stage_dir = self._stage_dir(conversation_key, task_id)
                os.makedirs(stage_dir, mode=0o700, exist_ok=True)
            sent_name, size = _copy_to_stage(outbox_fd, name, shown, stage_dir, self.max_bytes)
            if sent_name:
                os.unlink(name, dir_fd=outbox_fd)
                staged.append((sent_name, size))
        if left:
            notes.append(f"还有 {left} 个文件留在 {OUTBOX_DIR}/ (每次回答最多发送 {self.max_files} 个)")
        return staged, notes

    # -- after the answer

    def deliver_after(self, task: Task) -> Future | None:
        """Send the task's staged files on a thread of their own (called once its answer is delivered)."""
        if not _TASK_ID.match(task.id):
            return None
        return self._senders.submit(self.send_staged, task)

    def resume(self, task_for: Callable[[str], Task | None]) -> int:
        """At start: send the files still staged for answers delivered before the bot stopped; how many tasks.

        (An answer not yet delivered sends its files itself once the restart's recovery delivers it.)"""
        resumed = 0
        for path in sorted(glob.glob(os.path.join(self.workspaces.root, "conversations", "*", STAGE_DIR, "*"))):
            task = task_for(os.path.basename(path)) if _TASK_ID.match(os.path.basename(path)) else None
            if task is not None and task.delivered and os.path.dirname(path) == os.path.dirname(
                    self._stage_dir(task.conversation_key, task.id)):
                log.info("重新发送上次未发送的文件 task=%s user=%s", task.id, task.user_id)
                self.deliver_after(task)
                resumed += 1
        return resumed

    def send_staged(self, task: Task) -> int:
        """Upload and push each staged file of `task`, then move it to `outbox/sent/`; how many were sent."""
        stage_dir = self._stage_dir(task.conversation_key, task.id)
        try:
            names = sorted(os.listdir(stage_dir))
        except FileNotFoundError:
            return 0
        tlog = TaskLogger(log, task.id, task.user_id)
        sent, failed, refused, why = 0, [], [], ""
        for name in names:
            path = os.path.join(stage_dir, name)
            try:
                has_room_for_a_file(self.sender, task.user_id)
                media_id = self.upload(path, name, task.user_id)
                self.push_file(task.route, name, media_id)
            except SpendRefused as exc:  # the call budget: nothing was sent, the file stays staged
                tlog.warning("文件未发送 (钉钉接口调用额度): %s: %s", name, exc)
                refused.append(name)
                why = str(exc)
                continue
            except FileSendError as exc:
                tlog.error("文件发送失败: %s: %s", name, exc)
                failed.append(name)
                continue
            except Exception:  # runs in a pool: an escaping exception would vanish unlogged
                tlog.exception("文件发送出错: %s", name)
                failed.append(name)
                continue
            tlog.info("文件已发送: %s (%s)", name, task.route.push_path)
            self._archive(task.conversation_key, path, name)
            sent += 1
        lines = [f"以下文件未能发送: {'、'.join(failed)}。请稍后再让 CodeBuddy 发送一次。"] if failed else []
        if refused:  # told by the free path when it lives: a push would be refused for the same reason
            lines.append(f"以下文件未发送: {'、'.join(refused)}。{why}。")
        if lines:
            self.sender.send(task.route, "\n".join(lines), allow_webhook=bool(refused) or not task.background)
        else:
            try:
                os.rmdir(stage_dir)
            except OSError:
                pass
        return sent

    def upload(self, path: str, name: str, user_id: str = "") -> str:
        """Upload one staged file for `user_id`'s task; its media id. Retries connection errors, 5xx and an expired
        token; each attempt asked of the call budget (SpendRefused: not sent)."""
        image = name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS
        with open(path, "rb") as handle:
            data = handle.read()
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        error = "no attempt"
        for attempt in range(1, UPLOAD_ATTEMPTS + 1):
            self.sender.spend("media_upload", user_id)
            token = self.sender.tokens.get()
            url = f"{self.oapi_endpoint}{UPLOAD_PATH}?access_token={quote(token)}&type={'image' if image else 'file'}"
            try:
                response = self._pool.request("POST", url, fields={"media": (name, data, mime)})
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # the URL holds the token: name the host only
                error = replace_secrets(describe_network_error(self.oapi_endpoint, exc), (token,))
            else:
                try:
                    body = json.loads(response.data.decode("utf-8", "replace") or "{}")
                except ValueError:
                    body = {}
                body = body if isinstance(body, dict) else {}
                media_id = body.get("media_id")
                if response.status == 200 and body.get("errcode") == 0 and isinstance(media_id, str) and media_id:
                    return media_id
                errcode = body.get("errcode")
                error = f"upload HTTP {response.status} errcode={errcode} {str(body.get('errmsg') or '')[:100]}"
                if errcode in _TOKEN_ERRCODES:
                    self.sender.tokens.invalidate(token)
                elif response.status < 500 and response.status != 429:
                    raise FileSendError(error)
            if attempt < UPLOAD_ATTEMPTS:
                self._sleep(min(30.0, 2.0 ** attempt))
        raise FileSendError(f"gave up after {UPLOAD_ATTEMPTS} attempts: {error}")

    def push_file(self, route: Route, name: str, media_id: str) -> None:
        """Push one uploaded file to the chat of `route`: a picture message or a file message."""
        ext = name.rpartition(".")[2].lower() if "." in name else ""
        if ext in IMAGE_EXTENSIONS:
            msg_key, param = "sampleImageMsg", {"photoURL": media_id}
        else:
            msg_key, param = "sampleFile", {"mediaId": media_id, "fileName": name, "fileType": ext or "file"}
        body: dict = {"robotCode": self.sender.robot_code, "msgKey": msg_key,
                      "msgParam": json.dumps(param, ensure_ascii=False)}
        if route.is_group:
            body["openConversationId"] = route.conversation_id
        else:
            body["userIds"] = [route.user_id]
        try:  # each attempt is a metered call
            self.sender.call_openapi(GROUP_SEND_PATH if route.is_group else BATCH_SEND_PATH, body, kind="file_send",
                                     retry_window=self.retry_window, user_id=route.user_id)
        except SpendRefused:
            raise
        except DeliveryError as exc:
            raise FileSendError(f"{route.push_path}: {str(exc).replace(media_id, media_id[:6] + '…')}") from None

    def send_file(self, route: Route, path: str, name: str) -> str:
        """Upload the bot's own file `path` and push it to the chat of `route` as `name` (a project's patch, say);
        "" when sent, else why not. Both calls are metered, like every file the outbox sends."""
        try:
            has_room_for_a_file(self.sender, route.user_id)
            self.push_file(route, name, self.upload(path, name, route.user_id))
        except SpendRefused as exc:  # the call budget: nothing was sent
            log.warning("文件未发送 (钉钉接口调用额度): %s: %s", name, exc)
            return str(exc)
        except FileSendError as exc:
            log.error("文件发送失败: %s: %s", name, exc)
            return str(exc)
        log.info("文件已发送: %s (%s)", name, route.push_path)
        return ""

    def _archive(self, conversation_key: str, path: str, name: str) -> None:
        """Move a sent file to `outbox/sent/` (never through a symlink); dropped when that is not possible."""
        workspace = self.workspaces.dirs_for(conversation_key).workspace
        try:
            ws_fd = _open_dir(workspace)
            try:
                outbox_fd = _open_dir(OUTBOX_DIR, ws_fd, create=True)
            finally:
                os.close(ws_fd)
            try:
                sent_fd = _open_dir(SENT_DIR, outbox_fd, create=True)
            finally:
                os.close(outbox_fd)
            try:
                os.rename(path, _free_name(name, sent_fd), dst_dir_fd=sent_fd)
            finally:
                os.close(sent_fd)
        except OSError as exc:
            log.warning("已发送的文件无法移到 outbox/sent/ (%s)，已删除: %s", exc.strerror, name)
            os.unlink(path)

    def shutdown(self) -> None:
        """Stop taking new sends (staged files stay on disk for the next start)."""
        self._senders.shutdown(wait=False, cancel_futures=True)


class OutboxClient:
    """Wraps a CodeBuddy client: after a successful run, stages the run's `outbox/` and says so in the answer."""

    def __init__(self, client: Any, files: OutboxFiles) -> None:
        self.client = client
        self.files = files

    def run(self, prompt: str, **kwargs: Any) -> RunResult:
        """Run through the wrapped client; a successful answer gets the outbox lines added."""
        result = self.client.run(prompt, **kwargs)
        run_tag = str(kwargs.get("run_tag") or "")
        if result.ok and _TASK_ID.match(run_tag):
            try:
                note = self.files.collect(str(kwargs.get("conversation") or ""), run_tag)
            except OSError as exc:
                TaskLogger(log, run_tag, "-").error("outbox 文件整理失败: %s", exc)
                note = "\n\n---\n- outbox/ 中的文件未能整理，未发送"
            if note:
                result = replace(result, text=result.text + note)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)
