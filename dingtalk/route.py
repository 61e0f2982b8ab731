"""Where a task's messages go: the chat it came from and, while alive, its session webhook."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """Where a task's messages go: the chat it came from and, while alive, its session webhook."""

    conversation_type: str  # "1" = 1:1, "2" = group
    user_id: str  # sender's staff id (batchSend userIds)
    conversation_id: str  # group: the openConversationId
    session_webhook: str = ""
    webhook_expires_ms: int = 0

    @property
    def is_group(self) -> bool:
        return self.conversation_type == "2"

    @property
    def push_path(self) -> str:
        """The OpenAPI push for this chat: "group" (groupMessages/send) or "batchSend" (1:1)."""
        return "group" if self.is_group else "batchSend"

    def session_webhook_alive(self, now_ms: float, margin_ms: float = 5000) -> bool:
        """True while the session webhook exists and is not about to expire."""
        return bool(self.session_webhook) and now_ms + margin_ms < self.webhook_expires_ms

    def path_for(self, allow_webhook: bool, now_ms: float) -> str:
        """The path a message takes: "webhook" while allowed and alive, else the push path."""
        return "webhook" if allow_webhook and self.session_webhook_alive(now_ms) else self.push_path
