"""What "healthy" means, for /healthz, the systemd watchdog and `bot.py check`: intake, workers, store, stream.

- unhealthy (HTTP 503; the watchdog stops pinging when the cause is in the bot itself): a core thread is
  dead or crash-looping, or the intake has not taken a message for `INTAKE_STUCK_SECONDS`; or (503 only)
  no DingTalk Stream connection is live.
- degraded (HTTP 200): the bot answers, but something is being held back — the task store cannot be
  written (records wait in memory), results wait for another delivery attempt, or fewer Stream connections
  are live than STREAM_CONNECTIONS wants (a message DingTalk pushes while the last one is replaced is lost).
- ok.
"""

from __future__ import annotations

import time
from typing import Any

INTAKE_STUCK_SECONDS = 60.0  # a message waiting this long for the intake thread means it is stuck


def core_problems(supervisor: Any, intake: Any, now: float | None = None) -> list[str]:
    """What is wrong inside the bot itself (dead threads, a stuck intake); [] when its core is alive."""
    problems = [f"thread {name} is dead" for name in supervisor.dead()]
    backlog = intake.backlog_age(time.monotonic() if now is None else now) if intake is not None else 0.0
    if backlog >= INTAKE_STUCK_SECONDS:
        problems.append(f"intake stuck: a message has waited {backlog:.0f} s")
    return problems


def stream_connections(stream: Any) -> tuple[int, int]:
    """(live, wanted) Stream connections; an object that only says `connected` counts as one of one."""
    connected = bool(stream.connected)
    return int(getattr(stream, "live", int(connected))), int(getattr(stream, "wanted", 1))


def assess(sources: Any) -> tuple[int, dict]:
    """(HTTP status, JSON body) of /healthz from the daemon's live objects (see metrics.StatusSources).

    Reads only in-memory state: never takes the task DB's lock.
    """
    problems = core_problems(sources.supervisor, sources.intake)
    live, wanted = stream_connections(sources.stream)
    connected = live > 0
    if not connected:
        problems.append("DingTalk Stream not connected")
    store = sources.store.health()
    degraded = []
    if connected and live < wanted:
        degraded.append(f"DingTalk Stream: {live} of {wanted} connections live")
    if not store.ok:
        degraded.append(f"task store not writable ({store.reason}); {store.pending} record(s) kept in memory")
    waiting = sources.manager.outbox.waiting_retries
    if waiting:
        degraded.append(f"{waiting} result(s) waiting for another delivery attempt")
    status = "unhealthy" if problems else "degraded" if degraded else "ok"
    body: dict[str, Any] = {"status": status, "stream_connected": connected,
                            "stream_connections": {"live": live, "wanted": wanted}, "store_writable": store.ok,
                            "store_pending": store.pending, "dead_threads": list(sources.supervisor.dead())}
    body["warm_processes"] = sources.client.warm_stats()
    if store.reason:
        body["store_error"] = store.reason
    if problems or degraded:
        body["reasons"] = problems + degraded
    return (503 if problems else 200), body
