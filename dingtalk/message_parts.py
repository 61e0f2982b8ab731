"""Cutting a long answer into parts DingTalk accepts: paragraph breaks kept, code fences closed and reopened."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

_MARKER_RESERVE = 24  # room for the "(i/n)\n" prefix of a split part
_FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")


def utf8_json_cost(text: str) -> int:
    """Bytes `text` takes inside a JSON string (UTF-8, escapes counted): the unit of the push limit."""
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8")) - 2


def _hard_pieces(line: str, max_cost: int, cost: Callable[[str], int]) -> list[str]:
    """Cut one over-long line into pieces of at most `max_cost`, on character boundaries."""
    pieces, start, used = [], 0, 0
    for index, char in enumerate(line):
        char_cost = cost(char)
        if used + char_cost > max_cost and index > start:
            pieces.append(line[start:index])
            start, used = index, 0
        used += char_cost
    pieces.append(line[start:])
    return pieces


def _fence_after(state: str | None, line: str) -> str | None:
    """The open code fence (its opening line) after `line`, given the one open before it."""
    match = _FENCE.match(line)
    if not match:
        return state
    if state is None:
        return line.rstrip("\r\n")
    opener = _FENCE.match(state)
    assert opener is not None
    closes = match.group(1)[0] == opener.group(1)[0] and len(match.group(1)) >= len(opener.group(1))
    return None if closes and not match.group(2).strip() else state


def _closing_fence(opener: str) -> str:
    match = _FENCE.match(opener)
    assert match is not None
    return match.group(1)


def split_message(text: str, limit: int, cost: Callable[[str], int] = len) -> list[str]:
    """Split `text` into parts of at most `limit` (measured by `cost`), each marked `(i/n)` when n > 1.

    Parts prefer paragraph boundaries; a code fence cut across parts is closed at the end of one part
    and reopened, with its language tag, at the start of the next.
    """
    if cost(text) <= limit:
        return [text]
    budget = limit - _MARKER_RESERVE
    lines: list[str] = []
    for line in text.splitlines(keepends=True):
        lines.extend(_hard_pieces(line, budget // 2, cost) if cost(line) > budget // 2 else [line])

    parts: list[str] = []
    fence: str | None = None
    index = 0
    while index < len(lines):
        reopen = fence + "\n" if fence else ""
        chunk, used, state, start = [reopen], cost(reopen), fence, index
        paragraph_break: tuple[int, int] | None = None  # (line index after the break, chunk length)
        while index < len(lines):
            line = lines[index]
            after = _fence_after(state, line)
            closing = cost("\n" + _closing_fence(after) + "\n") if after else 0
            if used + cost(line) + closing > budget and index > start:
                break
            chunk.append(line)
            used += cost(line)
            state = after
            index += 1
            if not line.strip() and state is None and used >= budget // 2:
                paragraph_break = (index, len(chunk))
        if index < len(lines) and paragraph_break and paragraph_break[0] < index:
            index, keep = paragraph_break
            chunk, state = chunk[:keep], None
        part = "".join(chunk)
        if state:
            part += ("" if part.endswith("\n") else "\n") + _closing_fence(state) + "\n"
        parts.append(part)
        fence = state
    total = len(parts)
    return [f"({number}/{total})\n{part}" for number, part in enumerate(parts, 1)]
