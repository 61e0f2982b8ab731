"""Pictures, files and videos people send the bot: fetched into the conversation's workspace and named in the prompt.

A message's attachments are read from the raw callback data (the SDK parses only picture and richText), fetched
through the robot message-file download API (docs/wire-facts.md §6) off the intake thread, streamed to disk with a
size cap checked before (Content-Length) and during the download and an overall deadline, and written under
`attachments/` in the conversation's workspace with a name of the bot's own making (nothing from the message
becomes a path). Sent without text, they wait (on disk, beside the workspace, out of the CLI's reach) for that
user's next prompt in that chat; sent with text (richText), they go into that prompt.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import urllib3

from codebuddy.sandbox import Workspaces
from config import HTTP_TIMEOUT
from dingtalk.incoming import KIND_LABELS, MAX_PER_MESSAGE, AttachmentRef, file_extension
from dingtalk_sender import DeliveryError, DingTalkSender, SpendRefused, describe_network_error

log = logging.getLogger("attachments")

DOWNLOAD_PATH = "/v1.0/robot/messageFiles/download"
ATTACHMENTS_DIR = "attachments"
PENDING_TTL = 24 * 3600.0  # seconds attachments sent without text wait for the next prompt
DOWNLOAD_TIMEOUT = 120.0  # seconds one download may take in all
_CHUNK = 64 * 1024
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"))


@dataclass(frozen=True)
class Saved:
    """An attachment on disk: `path` relative to the workspace (what the CLI sees from its cwd)."""

    kind: str
    name: str
    path: str
    size: int


class AttachmentError(Exception):
    """A download failed; the message says why, fit for the chat."""


class AttachmentRefused(AttachmentError):
    """The call budget refused the download (the org's month, or the sender's day): nothing was asked of DingTalk."""


def human_size(size: int) -> str:
    """`size` bytes for people: 512 B, 12.3 KB, 4.0 MB."""
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KB" if size < 1024 * 1024 else f"{size / 1024 / 1024:.1f} MB"


def prompt_with(saved: Iterable[Saved], text: str) -> str:
    """The prompt CodeBuddy gets: what arrived and where (relative to its cwd), then the user's text."""
    saved = list(saved)
    if not saved:
        return text
    lines = [f"[用户发来了 {len(saved)} 个附件，已保存在当前工作目录下:"]
    lines += [f"- {item.path} ({KIND_LABELS.get(item.kind, item.kind)} {item.name}, {human_size(item.size)})"
              for item in saved]
    if any(item.kind == "picture" for item in saved):
        lines.append("图片请用 Read 工具查看。")
    return "\n".join(lines) + "]\n\n" + text


def which_attachments(refs: tuple[AttachmentRef, ...], first: int) -> str:
    """Attachments `first` + 1 … of a message, for people: "第 6–10 个附件 (图片 3 张、文件 a.xlsx、文件 b.pdf)"."""
    numbers = f"第 {first + 1} 个" if len(refs) == 1 else f"第 {first + 1}–{first + len(refs)} 个"
    pictures = sum(ref.kind == "picture" for ref in refs)
    parts = [f"图片 {pictures} 张"] if pictures else []
    parts += [f"{KIND_LABELS.get(ref.kind, ref.kind)} {ref.name}" for ref in refs if ref.kind != "picture"]
    return f"{numbers}附件 ({'、'.join(parts)})"


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink (ELOOP/ENOTDIR when `name` is one)."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)


class AttachmentFetcher:
    """Downloads one attachment into `attachments/` of a conversation's workspace; never writes outside it."""

    def __init__(self, sender: DingTalkSender, workspaces: Workspaces, robot_code: str, *, max_bytes: int,
                 timeout: float = DOWNLOAD_TIMEOUT, clock: Callable[[], float] = time.monotonic,
                 pool: urllib3.PoolManager | None = None) -> None:
        self.sender = sender
        self.workspaces = workspaces
        self.robot_code = robot_code
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.clock = clock
        self._pool = pool or urllib3.PoolManager(num_pools=4, maxsize=4, retries=urllib3.Retry(2, redirect=3))

    def _limit_text(self) -> str:
        return f"{self.max_bytes // (1024 * 1024)} MB"

    def download_url(self, ref: AttachmentRef, user_id: str = "") -> str:
        """The short-lived URL of one attachment (a metered call made for `user_id`); AttachmentError when refused
        (AttachmentRefused: by the call budget)."""
        try:  # each attempt is a metered call, asked of the budget first
            body = self.sender.call_openapi(DOWNLOAD_PATH, {"downloadCode": ref.download_code,
                                                            "robotCode": self.robot_code}, kind="download",
                                            retry_window=30.0, user_id=user_id)
        except SpendRefused as exc:
            raise AttachmentRefused(str(exc)) from None
        except DeliveryError as exc:
            raise AttachmentError(f"无法获取下载地址 ({exc})") from None
        url = body.get("downloadUrl")
        if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
            raise AttachmentError("钉钉没有返回下载地址")
        return url

    def fetch(self, ref: AttachmentRef, conversation_key: str, user_id: str = "") -> Saved:
        """Download `ref` (sent by `user_id`) into the conversation's `attachments/`; AttachmentError (nothing left
        behind) on failure."""
        url = self.download_url(ref, user_id)
        where = f"{urlsplit(url).netloc}/…"  # the URL itself grants access: never logged in full
        deadline = self.clock() + self.timeout
        try:
            response = self._pool.request("GET", url, preload_content=False, timeout=urllib3.Timeout(
                connect=HTTP_TIMEOUT[0], read=HTTP_TIMEOUT[1]))
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise AttachmentError(f"下载失败: {describe_network_error(url.split('?')[0], exc)}") from None
        try:
            if response.status != 200:
                raise AttachmentError(f"下载失败: HTTP {response.status} from {where}")
            announced = response.headers.get("Content-Length")
            if announced and announced.isdigit() and int(announced) > self.max_bytes:
                raise AttachmentError(f"{ref.name} 超过 {self._limit_text()} 上限 ({human_size(int(announced))})，"
                                      "未接收")
            return self._write(ref, conversation_key, response, deadline)
        finally:
            response.release_conn()

    def _write(self, ref: AttachmentRef, conversation_key: str, response, deadline: float) -> Saved:
        workspace = self.workspaces.dirs_for(conversation_key).workspace
        token = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        partial = f".partial-{token}"
        ws_fd = open_dir(workspace)
        try:
            try:
                os.mkdir(ATTACHMENTS_DIR, 0o700, dir_fd=ws_fd)
            except FileExistsError:
                pass
            try:
                dir_fd = open_dir(ATTACHMENTS_DIR, ws_fd)
            except OSError as exc:  # attachments/ replaced by a symlink or a file: never follow it
                raise AttachmentError(f"工作目录中的 {ATTACHMENTS_DIR}/ 不是目录 ({errno.errorcode.get(exc.errno)})，"
                                      "未保存") from None
        finally:
            os.close(ws_fd)
        try:
            size, head = self._stream(response, partial, dir_fd, deadline)
            ext = file_extension(ref.name)
            if ref.kind == "picture":
                ext = next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)), ext or "png")
            final = token + (f".{ext}" if ext else "")
            os.rename(partial, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
        name = ref.name if ref.kind != "picture" else f"图片.{ext}"
        return Saved(ref.kind, name, f"{ATTACHMENTS_DIR}/{final}", size)

    def _stream(self, response, partial: str, dir_fd: int, deadline: float) -> tuple[int, bytes]:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        size, head, ok = 0, b"", False
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in response.stream(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise AttachmentError(f"文件超过 {self._limit_text()} 上限，未接收")
                    if self.clock() > deadline:
                        raise AttachmentError(f"下载超过 {self.timeout:.0f} 秒，已放弃")
                    head = head or chunk[:16]
                    out.write(chunk)
            ok = True
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise AttachmentError(f"下载中断: {type(exc).__name__}") from None
        finally:
            if not ok:
                os.unlink(partial, dir_fd=dir_fd)
        return size, head


class PendingAttachments:
    """Attachments sent without text, kept for the same user's next prompt in the same chat.

    Kept in a JSON file beside the conversation's workspace (never mounted into the CLI's jail, so a run cannot
    forge it): the files themselves survive a restart, and so does the promise "请告诉我要做什么".
    """

    def __init__(self, workspaces: Workspaces, *, clock: Callable[[], float] = time.time,
                 ttl: float = PENDING_TTL) -> None:
        self.workspaces = workspaces
        self.clock = clock
        self.ttl = ttl
        self._lock = threading.Lock()
        # The records on disk, so the look every prompt takes (`take`) touches no file when there is none: the ones
        # a restart finds, then the ones `add` writes.
        self._known = set(glob.glob(os.path.join(glob.escape(workspaces.root), "conversations", "*", "pending-*.json")))

    def _path(self, conversation_key: str, user_id: str, *, create: bool = False) -> str:
        """The user's record in this chat; `create` makes the conversation's directories (every prompt looks
        here, and only an attachment needs them: creating them on each look cost the intake thread most of a
        prompt's handling time)."""
        if create:
            self.workspaces.dirs_for(conversation_key)
        name = f"pending-{hashlib.sha256(user_id.encode()).hexdigest()[:24]}.json"
        return os.path.join(self.workspaces.base_for(conversation_key), name)

    def _read(self, path: str) -> list[dict]:
        try:
            with open(path, encoding="utf-8") as handle:
                entries = json.load(handle)
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("待处理附件记录无法读取，已忽略: %s", type(exc).__name__)
            return []
        now = self.clock()
        return [e for e in entries if isinstance(e, dict) and now - float(e.get("at", 0)) < self.ttl]

    def add(self, conversation_key: str, user_id: str, saved: Iterable[Saved]) -> None:
        """Keep `saved` for the user's next prompt in this chat."""
        path = self._path(conversation_key, user_id, create=True)
        with self._lock:
            entries = self._read(path) + [{**asdict(item), "at": self.clock()} for item in saved]
            temporary = f"{path}.{os.getpid()}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(entries[-MAX_PER_MESSAGE * 2:], handle, ensure_ascii=False)
            os.replace(temporary, path)
            self._known.add(path)

    def take(self, conversation_key: str, user_id: str) -> list[Saved]:
        """The attachments waiting for this user's prompt in this chat (forgotten once taken)."""
        path = self._path(conversation_key, user_id)
        with self._lock:
            if path not in self._known:
                return []
            self._known.discard(path)
            entries = self._read(path)
            if os.path.exists(path):  # an expired or unreadable record goes too
                os.unlink(path)
        return [Saved(str(e.get("kind")), str(e.get("name")), str(e.get("path")), int(e.get("size", 0)))
                for e in entries]


class AttachmentIntake:
    """Takes a message's attachments off the intake thread: downloads them, then keeps them or submits the prompt.

    One user's downloads in one chat run in arrival order, and a prompt that user sends meanwhile waits for them
    (off the intake thread): a picture followed at once by its question makes one prompt.
    """

    def __init__(self, fetcher: AttachmentFetcher, pending: PendingAttachments, *, workers: int = 2,
                 max_per_message: int = 5) -> None:
        self.fetcher = fetcher
        self.pending = pending
        self.max_per_message = max_per_message  # MAX_ATTACHMENTS_PER_MESSAGE: the rest are named, not fetched
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attachments")
        self._lock = threading.RLock()
        self._latest: dict[tuple[str, str], Future] = {}  # the last download job of (chat, user) not yet done
        self._waiting: dict[Future, list[Callable[[], object]]] = {}  # prompts waiting for a job, in order
        self._prompts_waiting: dict[tuple[str, str], int] = {}

    def receive(self, conversation_key: str, user_id: str, refs: Iterable[AttachmentRef], text: str, *,
                reply: Callable[[str], object], submit: Callable[[str], object], msg_id: str = "") -> None:
        """Fetch `refs` in the background; then submit `text` with them, or (no text) keep them and say so."""
        key = (conversation_key, user_id)
        with self._lock:
            job = self._pool.submit(self._receive, self._latest.get(key), key, tuple(refs), text, reply, submit,
                                    msg_id)
            self._latest[key] = job
        job.add_done_callback(lambda done: self._done(key, done))

    def _done(self, key: tuple[str, str], done: Future) -> None:
        # Under the lock, so a prompt arriving now cannot overtake the ones that waited for this job.
        with self._lock:
            if self._latest.get(key) is done:
                del self._latest[key]
            waiting = self._waiting.pop(done, [])
            if waiting:
                self._prompts_waiting[key] -= len(waiting)
                if not self._prompts_waiting[key]:
                    del self._prompts_waiting[key]
            for then in waiting:
                try:
                    then()
                except Exception:  # a pool's callback: an escaping exception would only be printed
                    log.exception("处理等待附件的消息失败 user=%s", key[1])

    def when_fetched(self, conversation_key: str, user_id: str, then: Callable[[], object]) -> None:
        """Call `then` once this user's downloads in this chat are done: at once when none are under way."""
        key = (conversation_key, user_id)
        with self._lock:
            job = self._latest.get(key)
            if job is None:
                then()
                return
            self._waiting.setdefault(job, []).append(then)
            self._prompts_waiting[key] = self._prompts_waiting.get(key, 0) + 1

    def _receive(self, previous: Future | None, key: tuple[str, str], refs: tuple[AttachmentRef, ...], text: str,
                 reply: Callable[[str], object], submit: Callable[[str], object], msg_id: str) -> None:
        if previous is not None:
            futures_wait([previous])  # submitted earlier, so never queued behind this job
        conversation_key, user_id = key
        taken, over = refs[:self.max_per_message], refs[self.max_per_message:]
        saved, problems, notes = [], [], []
        for index, ref in enumerate(taken):
            try:
                item = self.fetcher.fetch(ref, conversation_key, user_id)
            except AttachmentRefused as exc:  # the rest would be refused too: none of them is asked for
                log.warning("附件未下载 (钉钉接口调用额度) msgId=%s user=%s: %s", msg_id or "-", user_id, exc)
                notes.append(f"未下载{which_attachments(taken[index:], index)}: {exc}。")
                break
            except AttachmentError as exc:
                log.warning("附件下载失败 msgId=%s user=%s: %s", msg_id or "-", user_id, exc)
                label = KIND_LABELS.get(ref.kind, ref.kind)
                problems.append(f"{label if ref.name == label else f'{label} {ref.name}'}: {exc}")
                continue
            except Exception as exc:  # runs in a pool: an escaping exception would vanish unlogged
                log.exception("附件下载出错 msgId=%s user=%s", msg_id or "-", user_id)
                problems.append(f"{ref.name}: 内部错误 ({type(exc).__name__})")
                continue
            log.info("附件已保存: %s %s (%d 字节) msgId=%s user=%s", item.kind, item.path, item.size,
                     msg_id or "-", user_id)
            saved.append(item)
        if over:
            log.warning("附件过多: %d 个，只接收前 %d 个 msgId=%s user=%s", len(refs), len(taken), msg_id or "-",
                        user_id)
            notes.append(f"未下载{which_attachments(over, len(taken))}: "
                         f"每条消息最多接收 {self.max_per_message} 个附件，请分开发送。")
        failed = "\n".join(((["附件未能接收:"] + [f"- {p}" for p in problems]) if problems else []) + notes)
        if text:
            if failed:
                reply(failed)
            submit(prompt_with(saved, text))
        elif saved:
            self.pending.add(conversation_key, user_id, saved)
            names = "、".join(item.name for item in saved)
            with self._lock:  # the question already arrived: it takes these with it
                asked = key in self._prompts_waiting
            reply(f"已收到 {names}{'。' if asked else '，请告诉我要做什么。'}" + (f"\n{failed}" if failed else ""))
        else:
            reply(failed)

    def with_pending(self, conversation_key: str, user_id: str, text: str) -> str:
        """`text` with the attachments this user sent before it in this chat (taken: each is used once)."""
        return prompt_with(self.pending.take(conversation_key, user_id), text)
