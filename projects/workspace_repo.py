"""Reading a project checkout the agent controls without trusting it: its commits and files copied into a scratch
repository the bot owns, then fetched (checked) into the conversation's mirror; no git ever runs on its `.git`.

Everything of the workspace is opened relative to directory descriptors, without following a symlink: a `.git`
that is a symlink or a `gitdir:` file, alternates and a worktree's `commondir` are refused with one line. Of the
`.git` directory only HEAD, the branch it names and the object files are read — never its config, hooks, info/ or
index — so nothing the agent wrote there can make the bot's git run a command or read another path
(docs/projects.md).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from dataclasses import dataclass

from projects.git import BOT_IDENTITY, Git, GitError, Identity

SHA = re.compile(r"^[0-9a-f]{40}$")
HEAD_REF = re.compile(r"^ref: (refs/heads/[A-Za-z0-9_.+/-]{1,200})$")
LOOSE_DIR, LOOSE_FILE = re.compile(r"^[0-9a-f]{2}$"), re.compile(r"^[0-9a-f]{38}$")
PACK_FILE = re.compile(r"^pack-[0-9a-f]{40}\.(pack|idx)$")
SMALL_FILE = 64 * 1024
PACKED_REFS_MAX = 32 * 1024 * 1024
MAX_WALK_ENTRIES = 1_000_000
WORKTREE_REF, HEAD_REF_NAME = "refs/conversation/worktree", "refs/conversation/head"


class Refused(Exception):
    """The workspace's repository cannot be read safely: `str()` is the line the chat reads."""


@dataclass(frozen=True)
class Snapshot:
    """A checkout's state, now in the mirror: its HEAD commit and a commit of its files as they are."""

    head: str
    worktree: str  # == head when nothing is uncommitted
    skipped: tuple[str, ...] = ()  # nested repositories left out (their directories)

    @property
    def uncommitted(self) -> bool:
        return self.worktree != self.head


def open_dir(name: str, dir_fd: int | None = None) -> int:
    """Open a directory without following a symlink (OSError when `name` is one, or no directory)."""
    return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def read_small(dir_fd: int, name: str, limit: int = SMALL_FILE) -> bytes:
    """A regular file of at most `limit` bytes, opened without following a symlink."""
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise Refused(f"{name} 不是普通文件，拒绝读取。")
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{name} 过大，拒绝读取。")
    return data


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def open_checkout(workspace: str, name: str) -> int:
    """The checkout directory `<workspace>/<name>`, never through a symlink."""
    workspace_fd = open_dir(workspace)
    try:
        return open_dir(name, workspace_fd)
    except FileNotFoundError:
        raise Refused(f"工作区中没有 {name}/ 目录了。发送 /new 后重新绑定项目。") from None
    except OSError:
        raise Refused(f"{name}/ 已不是目录 (可能被换成了符号链接)，拒绝读取。") from None
    finally:
        os.close(workspace_fd)


def open_git_dir(checkout_fd: int, name: str) -> int:
    """The checkout's `.git` directory, after refusing every shape that would make git read elsewhere."""
    try:
        info = os.lstat(".git", dir_fd=checkout_fd)
    except FileNotFoundError:
        raise Refused(f"{name}/.git 不存在，无法读取提交。") from None
    if stat.S_ISLNK(info.st_mode):
        raise Refused(f"{name}/.git 是符号链接，拒绝读取 (它可能指向本工作区之外的仓库)。")
    if stat.S_ISREG(info.st_mode):
        raise Refused(f"{name}/.git 是文件 (gitdir: 指向别处)，拒绝读取。")
    if not stat.S_ISDIR(info.st_mode):
        raise Refused(f"{name}/.git 不是目录，拒绝读取。")
    git_fd = open_dir(".git", checkout_fd)
    try:
        if _exists(git_fd, "commondir"):
            raise Refused(f"{name}/.git 含 commondir (指向别的仓库)，拒绝读取。")
        try:
            objects_fd = open_dir("objects", git_fd)
        except OSError:
            raise Refused(f"{name}/.git/objects 不是目录 (或是符号链接)，拒绝读取。") from None
        try:
            for alternates in ("info/alternates", "info/http-alternates"):
                if _exists(objects_fd, alternates):
                    raise Refused(f"{name}/.git/objects/{alternates} 存在 (借用别处的对象)，拒绝读取。"
                                  "请删除它后再试。")
        except NotADirectoryError:
            pass  # info is a file: no alternates there
        finally:
            os.close(objects_fd)
    except BaseException:
        os.close(git_fd)
        raise
    return git_fd


def _read_ref(git_fd: int, ref: str) -> str:
    """The commit a loose ref file holds ("" when there is none), every directory opened without following links."""
    parts = ref.split("/")
    fds = [git_fd]
    try:
        for part in parts[:-1]:
            fds.append(open_dir(part, fds[-1]))
        value = read_small(fds[-1], parts[-1]).decode("ascii", "replace").strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    except OSError:
        raise Refused(f"{ref} 无法读取 (符号链接?)，拒绝。") from None
    finally:
        for fd in fds[1:]:
            os.close(fd)
    if not SHA.match(value):
        raise Refused(f"{ref} 不是提交 ID，拒绝读取。")
    return value


def resolve_head(git_fd: int) -> str:
    """The commit HEAD names: a commit id, or refs/heads/… loose or in packed-refs."""
    try:
        head = read_small(git_fd, "HEAD").decode("ascii", "replace").strip()
    except (FileNotFoundError, OSError):
        raise Refused("HEAD 无法读取，拒绝。") from None
    if SHA.match(head):
        return head
    match = HEAD_REF.match(head)
    if match is None or ".." in head or "//" in head:
        raise Refused("HEAD 不是分支也不是提交，拒绝读取。")
    ref = match.group(1)
    commit = _read_ref(git_fd, ref)
    if commit:
        return commit
    if _exists(git_fd, "packed-refs"):
        for line in read_small(git_fd, "packed-refs", PACKED_REFS_MAX).decode("utf-8", "replace").splitlines():
            sha, _, name = line.partition(" ")
            if name == ref and SHA.match(sha):
                return sha
    raise Refused(f"当前分支 {ref.removeprefix('refs/heads/')} 还没有提交。")


def _take(src_fd: int, name: str, dst_fd: int) -> None:
    """Put one object file in the scratch repository: a hard link of the entry itself (never a symlink's target),
    kept only if what was linked is a regular file; a copy where links cannot be made."""
    try:
        os.link(name, name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        try:
            source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_fd)
        except OSError:
            return
        with os.fdopen(source, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return
            target = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400, dir_fd=dst_fd)
            with os.fdopen(target, "wb") as out:
                shutil.copyfileobj(handle, out)
        return
    if not stat.S_ISREG(os.stat(name, dir_fd=dst_fd, follow_symlinks=False).st_mode):
        os.unlink(name, dir_fd=dst_fd)


def link_objects(git_fd: int, scratch_objects: str) -> None:
    """The checkout's loose objects and packs, into `scratch_objects` (objects/info is never read)."""
    objects_fd = open_dir("objects", git_fd)
    scratch_fd = open_dir(scratch_objects)
    try:
        for entry in os.scandir(objects_fd):
            pattern = LOOSE_FILE if LOOSE_DIR.match(entry.name) else PACK_FILE if entry.name == "pack" else None
            if pattern is None or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                src_fd = open_dir(entry.name, objects_fd)
            except OSError:
                continue
            os.makedirs(os.path.join(scratch_objects, entry.name), mode=0o700, exist_ok=True)
            dst_fd = open_dir(entry.name, scratch_fd)
            try:
                for item in os.scandir(src_fd):
                    if pattern.match(item.name):
                        _take(src_fd, item.name, dst_fd)
            finally:
                os.close(src_fd)
                os.close(dst_fd)
    finally:
        os.close(objects_fd)
        os.close(scratch_fd)


def nested_git_dirs(checkout_fd: int) -> list[str]:
    """Directories below the checkout holding their own `.git` (of any kind): git would read those repositories,
    so they are left out of what the bot adds."""
    found, seen = [], 0
    for path, dirnames, filenames, _ in os.fwalk(".", dir_fd=checkout_fd, follow_symlinks=False):
        seen += len(dirnames) + len(filenames)
        if seen > MAX_WALK_ENTRIES:
            raise Refused(f"项目目录中的文件超过 {MAX_WALK_ENTRIES} 个，拒绝读取。")
        if path == ".":
            dirnames[:] = [name for name in dirnames if name != ".git"]
            continue
        if ".git" in dirnames or ".git" in filenames:
            found.append(path[2:])
            dirnames[:] = []
    return sorted(found)


def _exclude_pattern(path: str) -> str:
    """A gitignore line matching exactly the directory `path` (wildcards escaped)."""
    if "\n" in path or "\r" in path:
        raise Refused("项目中有名字带换行的目录，拒绝读取。")
    return "/" + "".join("\\" + ch if ch in "\\*?[ " else ch for ch in path) + "/"


def _gitlinks(git: Git, scratch: str, commit: str) -> list[tuple[str, str]]:
    """The submodule entries (path, commit) of `commit`'s tree."""
    out = git.run(["ls-tree", "-r", "-z", commit], git_dir=scratch).decode("utf-8", "surrogateescape")
    links = []
    for record in filter(None, out.split("\0")):
        meta, _, path = record.partition("\t")
        mode, _, rest = meta.partition(" ")
        if mode == "160000":
            links.append((path, rest.split(" ")[-1]))
    return links


def snapshot(git: Git, scratch: str, workspace: str, name: str, author: Identity, message: str) -> Snapshot:
    """The checkout `<workspace>/<name>` as commits in the new scratch repository `scratch`: refs/heads/ws its HEAD,
    refs/heads/wt its files as they are (a commit by `author` on top of HEAD when anything is uncommitted)."""
    checkout_fd = open_checkout(workspace, name)
    try:
        git_fd = open_git_dir(checkout_fd, name)
        try:
            head = resolve_head(git_fd)
            git.init_bare(scratch)
            link_objects(git_fd, os.path.join(scratch, "objects"))
        finally:
            os.close(git_fd)
        nested = nested_git_dirs(checkout_fd)
    finally:
        os.close(checkout_fd)
    try:
        git.run(["cat-file", "-e", f"{head}^{{commit}}"], git_dir=scratch)
    except GitError:
        raise Refused(f"{name}/.git 中缺少 HEAD 提交的对象，无法读取。") from None
    links = _gitlinks(git, scratch, head)
    skipped = [path for path in nested if path not in {link for link, _ in links}]
    os.makedirs(os.path.join(scratch, "info"), mode=0o700, exist_ok=True)
    with open(os.path.join(scratch, "info", "exclude"), "w", encoding="utf-8", errors="surrogateescape") as out:
        out.writelines(_exclude_pattern(path) + "\n" for path in [*nested, *(link for link, _ in links)])
    index = {"GIT_INDEX_FILE": os.path.join(scratch, "index")}
    git.run(["read-tree", head], git_dir=scratch, env=index)
    if links:  # a submodule's pointer stays as committed: its directory is another repository, never read
        git.run(["update-index", "-z", "--force-remove", "--stdin"], git_dir=scratch, env=index,
                input_data=b"".join(path.encode("utf-8", "surrogateescape") + b"\0" for path, _ in links))
    git.run(["add", "-A"], git_dir=scratch, work_tree=os.path.join(workspace, name), env=index)
    if links:
        git.run(["update-index", "-z", "--add", "--index-info"], git_dir=scratch, env=index,
                input_data=b"".join(f"160000 {sha}\t".encode() + path.encode("utf-8", "surrogateescape") + b"\0"
                                    for path, sha in links))
    tree = git.text(["write-tree"], git_dir=scratch, env=index)
    worktree = head
    if tree != git.text(["rev-parse", f"{head}^{{tree}}"], git_dir=scratch):
        people = {"GIT_AUTHOR_NAME": author.name, "GIT_AUTHOR_EMAIL": author.email,
                  "GIT_COMMITTER_NAME": BOT_IDENTITY[0], "GIT_COMMITTER_EMAIL": BOT_IDENTITY[1]}
        worktree = git.text(["commit-tree", tree, "-p", head, "-F", "-"], git_dir=scratch, env=people,
                            input_data=message.encode("utf-8"))
    git.run(["update-ref", "refs/heads/ws", head], git_dir=scratch)
    git.run(["update-ref", "refs/heads/wt", worktree], git_dir=scratch)
    return Snapshot(head=head, worktree=worktree, skipped=tuple(skipped))


def fetch_snapshot(git: Git, mirror: str, scratch: str) -> None:
    """The scratch repository's two commits into the mirror: a fetch whose objects git checks on the way in, from
    a repository whose config the bot wrote."""
    git.run(["fetch", "-q", "--no-tags", "--no-write-fetch-head", "--", scratch, f"+refs/heads/ws:{HEAD_REF_NAME}",
             f"+refs/heads/wt:{WORKTREE_REF}"], git_dir=mirror, scheme="file")

