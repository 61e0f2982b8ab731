"""The two seams through which the task logic reaches the outside: a CLI client and a chat sender.

`codebuddy_client.CodeBuddyClient` and `dingtalk_sender.DingTalkSender` are the real ones; tests and the
console pass small stand-ins with the same methods.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from codebuddy.warm_sessions import Decision, ToolRequest
from codebuddy_client import RunResult
from dingtalk.route import Route
from dingtalk_sender import Delivery


class Client(Protocol):
    """Runs one prompt through the CodeBuddy CLI (see codebuddy_client.py)."""

    def run(self, prompt: str, *, conversation: str = "", session_id: str | None = None,
            timeout: float | None = None,
            cancel_event: threading.Event | None = None, on_step: Callable[[str], None] | None = None,
            run_tag: str = "", on_text: Callable[[str], None] | None = None,
            ask: Callable[[ToolRequest], Decision] | None = None) -> RunResult: ...

    def cancel(self, run_tag: str) -> bool: ...

    def close(self) -> None: ...


class Sender(Protocol):
    """Delivers text to a chat (see dingtalk_sender.py)."""

    def send(self, route: Route, text: str, *, markdown: bool = False, title: str = "CodeBuddy",
             allow_webhook: bool = True, retry_window: float | None = None) -> Delivery: ...
