"""Which project a conversation is bound to, kept in a small file the bot owns beside the conversation's workspace
(out of the jail's sight, written atomically); one lock per conversation keeps its runs and its git apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from codebuddy.sandbox import RunPlace, Workspaces

log = logging.getLogger("projects")

PROJECT_DIR = "project"  # beside workspace/ and home/ in the conversation's directory: the jail never shows it
BINDING_FILE = "binding.json"


@dataclass
class Checkout:
    """A checkout the bot made in the conversation's workspace (its directory is the project's name)."""

    branch: str
    base: str  # the commit it started from (moved by /pull): /diff and /push count from here
    pushes: int = 0  # branches /push made from it so far


@dataclass
class ConversationProjects:
    """A conversation's projects: the one bound now (if any), who bound it, and every checkout the bot made."""

    current: str = ""
    bound_by: str = ""
    last_sender: str = ""  # who sent the conversation's latest prompt while bound (may /push)
    checkouts: dict[str, Checkout] = field(default_factory=dict)

    @property
    def checkout(self) -> Checkout | None:
        return self.checkouts.get(self.current) if self.current else None

    @classmethod
    def from_json(cls, data: Any) -> ConversationProjects:
        checkouts = {str(name): Checkout(str(c["branch"]), str(c["base"]), int(c.get("pushes", 0)))
                     for name, c in dict(data.get("checkouts") or {}).items()}
        return cls(current=str(data.get("current") or ""), bound_by=str(data.get("bound_by") or ""),
                   last_sender=str(data.get("last_sender") or ""), checkouts=checkouts)


def short_id(conversation_key: str) -> str:
    """The conversation's short id in branch names: 8 hex digits of a hash (nothing of the DingTalk id shows)."""
    return hashlib.sha256(conversation_key.encode("utf-8")).hexdigest()[:8]


def run_note(name: str, branch: str) -> str:
    """What CodeBuddy is told when it starts in a project's checkout."""
    return (f"The current working directory is a git checkout of the project {name} (branch {branch}). Commit your "
            "changes with git as usual; the user publishes them with /push (which also commits what is left "
            "uncommitted) and sees them with /diff. This checkout has no remote: do not try to push. Because the "
            "working directory is the checkout, files for the user go to ../outbox/ (not outbox/ inside the "
            "checkout), and files the user sent are in ../attachments/.")


class Bindings:
    """Reads and writes each conversation's binding file; hands out the conversation's lock."""

    def __init__(self, workspaces: Workspaces) -> None:
        self.workspaces = workspaces
        self._locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        self._file_lock = threading.Lock()  # one read-change-write of a binding file at a time (held briefly)

    def lock(self, conversation_key: str) -> threading.Lock:
        """The lock a conversation's run and its project commands take: never both at once."""
        with self._locks_lock:
            return self._locks.setdefault(conversation_key, threading.Lock())

    def directory(self, conversation_key: str) -> str:
        """The bot's own directory for the conversation's projects (mirrors, binding, scratch), made 0700."""
        path = os.path.join(self.workspaces.base_for(conversation_key), PROJECT_DIR)
        self.workspaces.dirs_for(conversation_key)
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def workspace(self, conversation_key: str) -> str:
        return self.workspaces.dirs_for(conversation_key).workspace

    def mirror(self, conversation_key: str, name: str) -> str:
        """The conversation's mirror of project `name` (a bare repository the bot owns)."""
        return os.path.join(self.directory(conversation_key), "mirrors", f"{name}.git")

    def read(self, conversation_key: str) -> ConversationProjects:
        """The conversation's projects (empty when it never bound one, or its file is unreadable: logged)."""
        path = os.path.join(self.workspaces.base_for(conversation_key), PROJECT_DIR, BINDING_FILE)
        try:
            with open(path, encoding="utf-8") as handle:
                return ConversationProjects.from_json(json.load(handle))
        except FileNotFoundError:
            return ConversationProjects()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("项目绑定文件无法读取 (%s): %s", exc, path)
            return ConversationProjects()

    def write(self, conversation_key: str, state: ConversationProjects) -> None:
        """Replace the conversation's binding file at once (a crash leaves the old one or the new one)."""
        directory = self.directory(conversation_key)
        fd, tmp = tempfile.mkstemp(prefix=".binding-", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(asdict(state), handle, ensure_ascii=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, os.path.join(directory, BINDING_FILE))
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def update(self, conversation_key: str, change: Callable[[ConversationProjects], None]) -> ConversationProjects:
        """Read, change and write the conversation's binding file in one step."""
        with self._file_lock:
            state = self.read(conversation_key)
            change(state)
            self.write(conversation_key, state)
        return state

    def place_for(self, conversation_key: str) -> RunPlace:
        """Where the conversation's CLI starts: its bound project's checkout, told what that is; else the workspace."""
        state = self.read(conversation_key)
        checkout = state.checkout
        if checkout is None:
            return RunPlace()
        return RunPlace(subdir=state.current, note=run_note(state.current, checkout.branch))


class ProjectClient:
    """Wraps a CodeBuddy client: a conversation's run waits for its project command (and a command is refused
    while a run goes on), so the bot never reads a checkout a running agent is changing."""

    def __init__(self, client: Any, bindings: Bindings) -> None:
        self.client = client
        self.bindings = bindings

    def run(self, prompt: str, **kwargs: Any) -> Any:
        with self.bindings.lock(str(kwargs.get("conversation") or "")):
            return self.client.run(prompt, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)
