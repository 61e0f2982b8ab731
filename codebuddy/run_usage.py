"""A turn's usage: its tokens, cost and model from the CLI's `result`, and the CPU time its process tree used.

The CLI's `result` carries the usage of its whole session, not of the turn (docs/wire-facts.md §11: with the real CLI
2.163.0 a session's second turn reports 2,000 input tokens where each model request reported 1,000, and a process
started later on the same session goes on from the session's total). A turn's share is therefore the change since
the session's last result, whose totals are kept in `cli-usage.json` beside the conversation's workspace and home
(out of its runs' sight, and surviving a restart as the session does). The numbers come through the CLI's stdout,
which a tool in the jail can write into: a forged total lower than the last is taken as a new count (the whole of it
counted, never less than nothing), so understating a turn makes the next real total count in full again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from dataclasses import dataclass, replace

from codebuddy import process_tree
from codebuddy.sandbox import Sandbox
from codebuddy.warm_sessions import WarmProcess

log = logging.getLogger("codebuddy_client")

USAGE_FILE = "cli-usage.json"  # beside the conversation's workspace and home (codebuddy/sandbox.py base_for)
SESSIONS_KEPT = 20  # the newest sessions' totals kept per conversation (older ones are no longer resumed)
MAX_COUNT = 10**12  # a reported number past this is not a model's: taken as this
COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd")


@dataclass(frozen=True)
class Usage:
    """What one turn used: tokens (input includes the cache reads, as the CLI reports it), the cost the CLI reported
    (2.163.0 always reports 0), the model, and the CPU seconds of its process tree (None: not measured)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0
    model: str = ""
    cpu_seconds: float | None = None

    @property
    def tokens(self) -> int:
        """Input and output tokens: what USER_DAILY_TOKENS counts."""
        return self.input_tokens + self.output_tokens


def _count(value: object, integer: bool = True) -> float:
    """A reported number made safe: finite, not negative, bounded; anything else is 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        return 0
    return int(min(value, MAX_COUNT)) if integer else float(min(value, MAX_COUNT))


def reported(result: dict, default_model: str = "") -> Usage:
    """The session totals a `result` event reports."""
    usage = result.get("usage") if isinstance(result.get("usage"), dict) else {}
    per_model = result.get("modelUsage") if isinstance(result.get("modelUsage"), dict) else {}
    model = next((str(name)[:100] for name in per_model), "") or default_model
    return Usage(input_tokens=int(_count(usage.get("input_tokens"))),
                 output_tokens=int(_count(usage.get("output_tokens"))),
                 cache_read_tokens=int(_count(usage.get("cache_read_input_tokens"))),
                 cache_creation_tokens=int(_count(usage.get("cache_creation_input_tokens"))),
                 cost_usd=float(_count(result.get("total_cost_usd"), integer=False)), model=model)


def share(now: Usage, before: Usage | None) -> Usage:
    """The part of the session totals `now` that the turn used, given the totals `before` it (None: a new session).
    Totals that went down anywhere (a forged line, a session the CLI started again) are counted whole."""
    if before is None or any(getattr(now, name) < getattr(before, name) for name in COUNTS):
        return now
    return replace(now, **{name: getattr(now, name) - getattr(before, name) for name in COUNTS})


def _path(base: str) -> str:
    return os.path.join(base, USAGE_FILE)


def session_totals(base: str) -> dict[str, Usage]:
    """The totals last reported by each CLI session of the conversation whose directories are in `base`."""
    try:
        with open(_path(base), encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return {}
    totals = {}
    for session, values in (stored.items() if isinstance(stored, dict) else ()):
        if isinstance(values, dict):
            totals[str(session)] = Usage(**{name: _count(values.get(name), name != "cost_usd") for name in COUNTS})
    return totals


def _save(base: str, totals: dict[str, Usage]) -> None:
    kept = dict(list(totals.items())[-SESSIONS_KEPT:])
    data = {session: {name: getattr(usage, name) for name in COUNTS} for session, usage in kept.items()}
    temporary = f"{_path(base)}.{uuid.uuid4().hex[:8]}"
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(temporary, _path(base))


def turn_usage(result: dict | None, base: str, cli_session: str, cpu_seconds: float | None,
               default_model: str = "") -> Usage:
    """The turn's usage: its share of the session totals in `result` (none without a result: a cancelled or timed-out
    turn's tokens show in the next result's totals), with the CPU time it used; the new totals are remembered."""
    if result is None:
        return Usage(model=default_model, cpu_seconds=cpu_seconds)
    now = reported(result, default_model)
    totals = session_totals(base)
    turn = share(now, totals.pop(cli_session, None))
    totals[cli_session] = now  # last: the newest session stays among those kept
    try:
        _save(base, totals)
    except OSError as exc:  # the turn is still counted; the next one may count this one's tokens again
        log.warning("无法记录 CLI 会话的用量: %s", exc)
    return replace(turn, cpu_seconds=cpu_seconds)


def process_cpu(sandbox: Sandbox, process: WarmProcess) -> float:
    """The CPU seconds `process` used since the last time they were counted (its first turn: since it started, a
    spare's start included): its run cgroup's, else its process tree's."""
    cpu = sandbox.cpu_seconds(process.tag)
    cpu = process_tree.cpu_seconds(process.proc.pid) if cpu is None else cpu
    spent, process.cpu_counted = max(0.0, cpu - process.cpu_counted), max(cpu, process.cpu_counted)
    return spent
