"""What a bound conversation changed, seen and sent by the bot: /diff (a stat and a .patch file), /push (a new
codebuddy/… branch on the remote) and /pull (a fast-forward), each computed in the conversation's mirror."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dingtalk.route import Route
from projects.bindings import Bindings, Checkout, ConversationProjects, short_id
from projects.catalog import PUSH_BRANCH_PREFIX, Project
from projects.forges import merge_request_link
from projects.git import BOT_IDENTITY, Git, GitError, Identity
from projects.jailed import FAST_FORWARD
from projects.workspace_repo import Snapshot, fetch_snapshot, open_dir, snapshot

log = logging.getLogger("projects")

MAX_STAT_LINES = 40
DIFF_OPTIONS = ("--no-color", "--no-ext-diff", "--no-textconv", "-M")  # git's own diff only: nothing configured runs


@dataclass(frozen=True)
class Asker:
    """Who sent a project command, and where: the chat's conversation, the sender, and where answers go."""

    conversation_key: str
    user_id: str
    user_name: str = ""
    in_group: bool = False
    admin: bool = False
    route: Route | None = None


def author_of(asker: Asker) -> Identity:
    """The git identity of a DingTalk sender: their name and `<staff id>@dingtalk` (control characters and the
    characters git reserves removed)."""
    name = re.sub(r"[\x00-\x1f\x7f<>]", "", asker.user_name).strip()[:60] or asker.user_id
    return Identity(name=name, email=re.sub(r"[^A-Za-z0-9._+-]", "_", asker.user_id)[:64] + "@dingtalk")


def human_bytes(size: int) -> str:
    return f"{size} B" if size < 1024 else f"{size / 1024:.1f} KB" if size < 1024 * 1024 else f"{size / 1048576:.1f} MB"


class ProjectChanges:
    """/diff, /push and /pull of a conversation's bound project (callers hold the conversation's lock)."""

    def __init__(self, git: Git, bindings: Bindings, *, send_file: Callable[[Route, str, str], str] | None,
                 jail: Callable[[str, str, list[str]], tuple[int, str]] | None, max_patch_bytes: int,
                 quiesce: Callable[[str], object] = lambda key: None) -> None:
        self.git = git
        self.bindings = bindings
        self.quiesce = quiesce  # ends the conversation's warm CLI process: nothing of the agent runs while we read
        self.send_file = send_file
        self.jail = jail
        self.max_patch_bytes = max_patch_bytes

    @contextlib.contextmanager
    def _scratch(self, key: str) -> Iterator[str]:
        path = tempfile.mkdtemp(prefix="scratch-", dir=self.bindings.directory(key))
        try:
            yield os.path.join(path, "repo.git")
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _snapshot(self, key: str, name: str, author: Identity, message: str) -> Snapshot:
        """The checkout's HEAD and files as commits in the mirror (refs/conversation/…), read while no process of the
        agent can change them (the caller holds the conversation's lock, and its warm process is ended)."""
        self.quiesce(key)
        with self._scratch(key) as scratch:
            snap = snapshot(self.git, scratch, self.bindings.workspace(key), name, author, message)
            fetch_snapshot(self.git, self.bindings.mirror(key, name), scratch)
        return snap

    @staticmethod
    def _skipped(snap: Snapshot) -> str:
        return ("\n(未包含自带 .git 的子目录: " + "、".join(snap.skipped[:5]) + ")") if snap.skipped else ""

    # -- /diff

    def diff(self, project: Project, checkout: Checkout, asker: Asker) -> tuple[str, Callable[[], str] | None]:
        """The stat of the conversation's changes since its checkout's start, and the sending of the full patch."""
        key, name, mirror = asker.conversation_key, project.name, self.bindings.mirror(asker.conversation_key,
                                                                                       project.name)
        snap = self._snapshot(key, name, Identity(*BOT_IDENTITY), "uncommitted changes (/diff)")
        stat = self.git.text(["diff", "--stat=100", *DIFF_OPTIONS, checkout.base, snap.worktree], git_dir=mirror,
                             config=[("core.quotePath", "false")])  # names as they are (control characters quoted)
        if not stat:
            return f"项目 {name} 没有改动 (相对起点 {checkout.base[:10]})。" + self._skipped(snap), None
        commits = int(self.git.text(["rev-list", "--count", f"{checkout.base}..{snap.head}"], git_dir=mirror))
        lines = stat.splitlines()
        if len(lines) > MAX_STAT_LINES:
            lines = [*lines[:MAX_STAT_LINES - 1], f" … 另有 {len(lines) - MAX_STAT_LINES} 个文件", lines[-1]]
        what = f"{commits} 个提交" + ("，以及未提交的改动" if snap.uncommitted else "")
        patch = self.git.run(["diff", "--binary", "--full-index", *DIFF_OPTIONS, checkout.base, snap.worktree],
                             git_dir=mirror)
        filename = f"{name}-{short_id(key)}.patch"
        text = f"项目 {name} 的改动 (相对起点 {checkout.base[:10]}: {what}):\n```\n" + "\n".join(lines) + "\n```"
        if len(patch) > self.max_patch_bytes:
            return text + f"\n补丁 {human_bytes(len(patch))} 超过文件上限，未发送。" + self._skipped(snap), None
        if self.send_file is None or asker.route is None:
            return text + self._skipped(snap), None
        outgoing = tempfile.mkdtemp(prefix="outgoing-", dir=self.bindings.directory(key))
        path = os.path.join(outgoing, filename)
        with open(path, "wb") as handle:
            handle.write(patch)
        send, route = self.send_file, asker.route

        def send_patch() -> str:
            try:
                error = send(route, path, filename)
            finally:
                shutil.rmtree(outgoing, ignore_errors=True)
            return f"补丁文件 {filename} 未能发送: {error}" if error else ""

        return text + f"\n随后发送文件: {filename} ({human_bytes(len(patch))})" + self._skipped(snap), send_patch

    # -- /push

    def push(self, project: Project, checkout: Checkout, asker: Asker) -> str:
        """Commit what is uncommitted (the sender as author) and push it all as a new codebuddy/… branch."""
        key, name = asker.conversation_key, project.name
        mirror, author = self.bindings.mirror(key, name), author_of(asker)
        message = (f"CodeBuddy: changes from a DingTalk chat\n\nUncommitted changes committed by /push for "
                   f"{author.name} ({asker.user_id}).\n")
        snap = self._snapshot(key, name, author, message)
        if snap.worktree == checkout.base:
            return f"项目 {name} 没有可推送的改动 (相对起点 {checkout.base[:10]})。" + self._skipped(snap)
        prefix = f"{PUSH_BRANCH_PREFIX}{short_id(key)}-"
        taken = self.git.remote_branches(project, mirror, f"refs/heads/{prefix}*")
        number = checkout.pushes + 1
        while f"{prefix}{number}" in taken:
            number += 1
        branch = f"{prefix}{number}"
        self.git.push_branch(project, mirror, snap.worktree, branch)

        def counted(state: ConversationProjects) -> None:
            if name in state.checkouts:
                state.checkouts[name].pushes = number

        self.bindings.update(key, counted)
        log.info("项目 %s 已推送分支 %s (%s) user=%s", name, branch, snap.worktree[:10], asker.user_id)
        lines = [f"已推送到分支 {branch} (提交 {snap.worktree[:10]})"]
        if snap.uncommitted:
            lines.append(f"未提交的改动已提交，作者 {author.name} <{author.email}>")
        link = merge_request_link(project, branch, checkout.branch)
        if link:
            lines.append(f"创建合并请求: {link}")
        return "\n".join(lines) + self._skipped(snap)

    # -- /pull

    def pull(self, project: Project, checkout: Checkout, asker: Asker) -> str:
        """Fast-forward a clean checkout to the remote's branch (in the conversation's jail), or say why not."""
        key, name = asker.conversation_key, project.name
        mirror = self.bindings.mirror(key, name)
        snap = self._snapshot(key, name, Identity(*BOT_IDENTITY), "uncommitted changes (/pull)")
        if snap.uncommitted:
            return f"项目 {name} 有未提交的改动，不能快进。先 /push，或让 CodeBuddy 提交或还原后再 /pull。"
        new = self.git.fetch_branch(project, mirror, checkout.branch)
        if new == snap.head:
            return f"项目 {name} 已是最新 ({checkout.branch} {new[:10]})。"
        try:
            self.git.run(["merge-base", "--is-ancestor", snap.head, new], git_dir=mirror)
        except GitError:
            return (f"项目 {name} 有不在远端 {checkout.branch} 上的提交，不能快进。先 /push 这些提交，"
                    "或发送 /new 后重新绑定。")
        if self.jail is None:
            return "无法快进: 没有可用的沙箱。"
        code, output = self._fast_forward(key, name, mirror, snap.head, new)
        if code != 0:
            return f"项目 {name} 快进失败: {output or f'退出码 {code}'}"
        count = self.git.text(["rev-list", "--count", f"{snap.head}..{new}"], git_dir=mirror)

        def moved(state: ConversationProjects) -> None:
            if name in state.checkouts:
                state.checkouts[name].base = new

        self.bindings.update(key, moved)
        return f"项目 {name} 已快进到 {checkout.branch} {new[:10]} ({count} 个新提交)，/diff 从这里算起。"

    def _fast_forward(self, key: str, name: str, mirror: str, head: str, new: str) -> tuple[int, str]:
        """Write a bundle of head..new into the workspace (never through a link) and merge it in the jail."""
        self.git.run(["update-ref", "refs/pull/new", new], git_dir=mirror)
        with self._scratch(key) as scratch:
            self.git.run(["bundle", "create", "-q", scratch + ".bundle", "refs/pull/new", f"^{head}"],
                         git_dir=mirror)
            bundle = f".project-pull-{os.urandom(6).hex()}.bundle"
            workspace_fd = open_dir(self.bindings.workspace(key))
            try:
                target = os.open(bundle, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                                 dir_fd=workspace_fd)
                with os.fdopen(target, "wb") as out, open(scratch + ".bundle", "rb") as source:
                    shutil.copyfileobj(source, out)
                assert self.jail is not None
                return self.jail(key, name, ["sh", "-c", FAST_FORWARD, "sh", f"../{bundle}", new])
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(bundle, dir_fd=workspace_fd)
                os.close(workspace_fd)
