"""The project chat commands — /project (list, bind, off), /pull, /diff, /push — who may send each, and their
answers; the git work runs off the intake thread, one command per conversation at a time, never during its run."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from projects.bindings import Bindings, Checkout, ConversationProjects
from projects.catalog import Project
from projects.changes import Asker, ProjectChanges, author_of
from projects.git import Git, GitError
from projects.workspace_repo import Refused, open_dir

log = logging.getLogger("projects")

COMMANDS = {
    "/project": "project", "项目": "project",
    "/pull": "pull", "拉取代码": "pull",
    "/diff": "diff", "查看改动": "diff",
    "/push": "push", "推送改动": "push",
}
HELP_LINES = """/project (项目) — 可用的项目和本会话绑定的项目；/project 名称 绑定，/project off 解除
/pull (拉取代码) — 把项目的工作副本快进到远端最新
/diff (查看改动) — 本会话对项目的改动 (附 .patch 文件)
/push (推送改动) — 提交改动并推送到新分支 codebuddy/…"""
OFF_WORDS = ("off", "关闭", "解除")
BUSY = "本会话有任务正在执行 (或另一个项目命令未完成)，请等它结束后再试。"


class ProjectCommands:
    """Answers the project commands of every chat; `handle` returns at once, the answer follows."""

    def __init__(self, projects: tuple[Project, ...], bindings: Bindings, git: Git, changes: ProjectChanges, *,
                 new_session: Callable[[str], object]) -> None:
        self.projects = {project.name: project for project in projects}
        self.bindings = bindings
        self.git = git
        self.changes = changes
        self.new_session = new_session
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="projects")
        self._pending = 0  # commands taken and not yet answered (the console waits for them at its end)
        self._pending_lock = threading.Lock()

    @property
    def pending(self) -> int:
        with self._pending_lock:
            return self._pending

    def handle(self, command: str, argument: str, asker: Asker, reply: Callable[[str], None]) -> None:
        """Answer one project command on the pool (never on the caller's thread)."""
        with self._pending_lock:
            self._pending += 1
        self.pool.submit(self._answer_counted, command, argument.strip(), asker, reply)

    def _answer_counted(self, command: str, argument: str, asker: Asker, reply: Callable[[str], None]) -> None:
        try:
            self._answer(command, argument, asker, reply)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _answer(self, command: str, argument: str, asker: Asker, reply: Callable[[str], None]) -> None:
        if command == "project" and not argument:
            reply(self.describe(asker))
            return
        lock = self.bindings.lock(asker.conversation_key)
        if not lock.acquire(blocking=False):
            reply(BUSY)
            return
        after = None
        try:
            if command == "project":
                text = self.unbind(asker) if argument.lower() in OFF_WORDS else self.bind(asker, argument)
            else:
                text, after = self.on_checkout(command, asker)
        except Refused as exc:
            log.warning("项目命令被拒绝: %s user=%s", exc, asker.user_id)
            text = f"已拒绝: {exc}"
        except GitError as exc:
            log.error("项目命令失败 (%s): %s user=%s", command, exc, asker.user_id)
            text = f"git 操作失败: {exc}"
        except Exception:
            log.exception("项目命令出错 (%s) user=%s", command, asker.user_id)
            text = "项目命令出错，请稍后再试 (详情见机器人日志)。"
        finally:
            lock.release()
        reply(text)
        if after is not None:  # the patch file, after the answer (the lock is not needed: it is the bot's file)
            try:
                note = after()
            except Exception:  # runs in a pool: an escaping exception would vanish unlogged
                log.exception("项目补丁文件发送出错 user=%s", asker.user_id)
                note = "补丁文件未能发送 (详情见机器人日志)。"
            if note:
                reply(note)

    # -- /project

    def describe(self, asker: Asker) -> str:
        """The projects the sender may use, and the chat's current one."""
        usable = [p for p in self.projects.values() if p.may_use(asker.user_id)]
        lines = ["可用的项目:" if usable else "你没有可用的项目。"]
        lines += [f"- {p.name} (分支 {p.branch or '远端默认'}{'，可 /push' if p.push else ''})" for p in usable]
        state = self.bindings.read(asker.conversation_key)
        checkout = state.checkout
        if checkout is not None:
            lines.append(f"本会话绑定: {state.current} (分支 {checkout.branch}，起点 {checkout.base[:10]})，"
                         f"工作目录 {state.current}/")
        else:
            lines.append("本会话未绑定项目。")
        if usable:
            lines.append("绑定: /project 名称；解除: /project off")
        return "\n".join(lines)

    def bind(self, asker: Asker, name: str) -> str:
        """Bind the chat to project `name`: a fresh checkout of its branch in the workspace, where runs start."""
        project = self.projects.get(name)
        if project is None or not project.may_use(asker.user_id):
            return f"没有你可用的项目 {name}。发送 /project 查看可用的项目。"
        if asker.in_group and not project.everyone and not asker.admin:
            return f"在群里绑定项目 {name} 需要管理员 (ADMIN_USERS)。"
        key = asker.conversation_key
        state = self.bindings.read(key)
        if state.current == name:
            return f"本会话已绑定项目 {name}。"
        workspace = self.bindings.workspace(key)
        kept = state.checkouts.get(name)
        if kept is not None and _is_dir(workspace, name):
            self._bound(key, name, kept, asker.user_id)
            return (f"已重新绑定项目 {name}，沿用工作区中的 {name}/ (起点 {kept.base[:10]})。"
                    "下一条消息在其中执行 (新的 CodeBuddy 会话)。")
        if os.path.lexists(os.path.join(workspace, name)):
            return f"工作区中已有 {name} (不是本机器人建立的工作副本)。请让 CodeBuddy 删除或改名它后再绑定。"
        mirror = self.bindings.mirror(key, name)
        if not os.path.isdir(mirror):
            self.git.init_bare(mirror)
        branch = project.branch or self.git.remote_head(project, mirror)
        commit = self.git.fetch_branch(project, mirror, branch)
        self.git.run(["symbolic-ref", "HEAD", f"refs/heads/{branch}"], git_dir=mirror)
        self._check_out(key, name, mirror, branch, author_of(asker).name, author_of(asker).email)
        self._bound(key, name, Checkout(branch=branch, base=commit), asker.user_id)
        log.info("会话已绑定项目 %s (%s %s) user=%s", name, branch, commit[:10], asker.user_id)
        return (f"已绑定项目 {name}: 分支 {branch}，提交 {commit[:10]}。工作副本在 {name}/，"
                "下一条消息在其中执行 (新的 CodeBuddy 会话)。")

    def _check_out(self, key: str, name: str, mirror: str, branch: str, user: str, email: str) -> None:
        """Clone the mirror into a staging directory the bot owns, then move it into the workspace in one rename
        (never through a link the workspace holds). The clone has no remote and no reflog naming a host path."""
        staging = tempfile.mkdtemp(prefix="staging-", dir=self.bindings.directory(key))
        try:
            self.git.run(["clone", "-q", "--no-local", "--template=", "--branch", branch, "--", mirror, name],
                         git_dir="", cwd=staging, scheme="file")
            checkout_git = os.path.join(staging, name, ".git")
            self.git.run(["remote", "remove", "origin"], git_dir=checkout_git)
            self.git.run(["config", "user.name", user], git_dir=checkout_git)
            self.git.run(["config", "user.email", email], git_dir=checkout_git)
            staging_fd, workspace_fd = open_dir(staging), open_dir(self.bindings.workspace(key))
            try:
                os.rename(name, name, src_dir_fd=staging_fd, dst_dir_fd=workspace_fd)
            except OSError as exc:
                raise Refused(f"无法把工作副本放进工作区 ({exc.strerror})。") from None
            finally:
                os.close(staging_fd)
                os.close(workspace_fd)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _bound(self, key: str, name: str, checkout: Checkout, user_id: str) -> None:
        def bind(state: ConversationProjects) -> None:
            state.current, state.bound_by, state.last_sender = name, user_id, ""
            state.checkouts[name] = checkout

        self.bindings.update(key, bind)
        self.new_session(key)  # the CLI keys its sessions by directory: the next run starts afresh in the checkout

    def unbind(self, asker: Asker) -> str:
        """`/project off`: runs start in the workspace again; the checkout stays (until /new)."""
        state = self.bindings.read(asker.conversation_key)
        if not state.current:
            return "本会话没有绑定项目。"
        if asker.in_group and asker.user_id != state.bound_by and not asker.admin:
            return f"只有绑定项目的人或管理员可以解除项目 {state.current} 的绑定。"
        name = state.current

        def off(current: ConversationProjects) -> None:
            current.current = ""

        self.bindings.update(asker.conversation_key, off)
        self.new_session(asker.conversation_key)
        return (f"已解除项目 {name} 的绑定。工作副本 {name}/ 仍在工作区 (/new 时移除)，"
                f"再次 /project {name} 可继续使用。")

    # -- /pull, /diff, /push

    def on_checkout(self, command: str, asker: Asker) -> tuple[str, Callable[[], str] | None]:
        """A command on the bound checkout, after checking who may send it."""
        state = self.bindings.read(asker.conversation_key)
        checkout = state.checkout
        project = self.projects.get(state.current)
        if checkout is None or project is None:
            return "本会话没有绑定项目。发送 /project 查看可用的项目。", None
        if not project.may_use(asker.user_id):
            return f"你不在项目 {project.name} 的 users 中。", None
        if command == "diff":
            return self.changes.diff(project, checkout, asker)
        if command == "pull":
            return self.changes.pull(project, checkout, asker), None
        if not project.push:
            return f"项目 {project.name} 不允许推送 (push = false)。", None
        if asker.user_id not in (state.bound_by, state.last_sender) and not asker.admin:
            return "只有绑定项目的人、最近一条任务的发送者或管理员可以 /push。", None
        return self.changes.push(project, checkout, asker), None

    # -- the rest of the chat

    def note_prompt(self, conversation_key: str, user_id: str) -> None:
        """A prompt was sent in the chat: its sender may /push what it leads to."""
        state = self.bindings.read(conversation_key)
        if state.current and state.last_sender != user_id:
            def sender(current: ConversationProjects) -> None:
                current.last_sender = user_id

            self.bindings.update(conversation_key, sender)

    def forget(self, conversation_key: str) -> str:
        """`/new`: unbind and remove every checkout the bot made (moved out at once, deleted on the pool); the
        line to add to /new's answer ("" when there was none)."""
        state = self.bindings.read(conversation_key)
        if not state.checkouts:
            return ""
        lock = self.bindings.lock(conversation_key)
        if not lock.acquire(blocking=False):
            return "项目工作副本未移除 (任务执行中)，稍后再 /new。"
        try:
            trash = tempfile.mkdtemp(prefix="removed-", dir=self.bindings.directory(conversation_key))
            workspace_fd, trash_fd = open_dir(self.bindings.workspace(conversation_key)), open_dir(trash)
            try:
                for name in state.checkouts:
                    try:
                        os.rename(name, name, src_dir_fd=workspace_fd, dst_dir_fd=trash_fd)
                    except FileNotFoundError:
                        pass
            finally:
                os.close(workspace_fd)
                os.close(trash_fd)
            self.bindings.update(conversation_key, _reset)
        finally:
            lock.release()
        self.pool.submit(shutil.rmtree, trash, True)
        return f"项目工作副本已移除: {'、'.join(name + '/' for name in state.checkouts)}"

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _reset(state: ConversationProjects) -> None:
    state.current, state.bound_by, state.last_sender = "", "", ""
    state.checkouts.clear()


def _is_dir(workspace: str, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(workspace, name)).st_mode)
    except OSError:
        return False
