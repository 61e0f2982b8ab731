"""The stream-json events a CLI process writes, folded into what the turn said so far: its answer, steps, session
and result (docs/wire-facts.md §4). The lines are untrusted input (codebuddy/cli_output.py caps them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from codebuddy.run_usage import Usage

log = logging.getLogger("codebuddy_client")

@dataclass
class StreamState:
    """What the stream-json lines said so far."""

    result: dict | None = None
    error: str = ""
    session_id: str | None = None
    last_step: str = ""
    texts: list[str] = field(default_factory=list)  # the text blocks of the assistant's messages so far
    partial: str = ""  # text of the block being written (partial messages), until its whole message arrives
    usage: Usage | None = None  # what the turn used, once it is over (codebuddy/run_usage.py)

    @property
    def answer_text(self) -> str:
        """The answer as written so far: every text block of the turn, the one in progress last."""
        return "\n\n".join(self.texts + ([self.partial] if self.partial else []))


def parse_stream_line(line: str, state: StreamState) -> str | None:
    """Fold one stream-json line into `state`; return a human progress step if the line names one."""
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    return fold_event(event, state) if isinstance(event, dict) else None


def fold_event(event: dict, state: StreamState) -> str | None:
    """Fold one stream-json event into `state`; return a human progress step if it names one."""
    kind = event.get("type")
    if event.get("session_id"):
        state.session_id = str(event["session_id"])
    if kind == "result":
        state.result = event
        return None
    if kind == "error":
        state.error = str(event.get("error") or event.get("message") or "unknown error")
        return None
    if kind == "stream_event":
        delta = (event.get("event") or {}).get("delta") or {}
        if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            state.partial += delta["text"]
        return None
    if kind == "assistant":
        step = None
        content = (event.get("message") or {}).get("content") or []
        state.partial = ""
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                step = f"工具 {block.get('name', '?')}"
            elif block.get("type") == "text" and block.get("text"):
                state.texts.append(str(block["text"]))
                step = step or "生成回答"
        if step:
            state.last_step = step
        return step
    return None


def follow_event(event: dict, state: StreamState, on_step: Callable[[str], None] | None,
                 on_text: Callable[[str], None] | None) -> None:
    """Fold one stream-json event into `state` and tell the callbacks of a new step or more answer text."""
    text_before = state.answer_text
    step = fold_event(event, state)
    try:  # a progress callback must never break the run
        if step and on_step is not None:
            on_step(step)
        if on_text is not None and state.answer_text != text_before:
            on_text(state.answer_text)
    except Exception:
        log.exception("progress callback failed")
