"""The bot's metrics: CLI run durations (`TimedClient` feeds a histogram) and the Prometheus text of them all."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from codebuddy_client import RunResult
from ops.admin_view import UsageSource
from ops.health import stream_connections
from tasks.task import STATUS_LABELS

# Buckets (seconds) of the task duration histogram: CLI runs take from seconds to TASK_TIMEOUT (30 min).
DURATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
OUTCOMES = ("succeeded", "failed", "timed_out", "cancelled")
DELIVERY_PATHS = ("webhook", "batchSend", "group")



@dataclass
class _Series:
    counts: list[int]  # per bucket, not cumulative
    total: float = 0.0
    count: int = 0


class DurationHistogram:
    """A thread-safe Prometheus-style histogram of CLI run durations, one series per outcome."""

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = tuple(sorted(buckets))
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}

    def observe(self, outcome: str, seconds: float) -> None:
        """Record one run of `seconds` that ended with `outcome`."""
        with self._lock:
            series = self._series.setdefault(outcome, _Series([0] * len(self.buckets)))
            for index, bound in enumerate(self.buckets):
                if seconds <= bound:
                    series.counts[index] += 1
                    break
            series.total += seconds
            series.count += 1

    def snapshot(self, outcome: str) -> tuple[list[int], float, int]:
        """(cumulative count per bucket, sum of seconds, count) for one outcome."""
        with self._lock:
            series = self._series.get(outcome) or _Series([0] * len(self.buckets))
            cumulative, running = [], 0
            for value in series.counts:
                running += value
                cumulative.append(running)
            return cumulative, series.total, series.count


def run_outcome(result: RunResult) -> str:
    """The task status a run result leads to: succeeded, failed, timed_out or cancelled."""
    if result.ok:
        return "succeeded"
    if result.timed_out:
        return "timed_out"
    if result.cancelled:
        return "cancelled"
    return "failed"


class TimedClient:
    """Wraps a CodeBuddy client so every run's duration lands in a histogram; otherwise the same client."""

    def __init__(self, client: Any, histogram: DurationHistogram) -> None:
        self.client = client
        self.histogram = histogram

    def run(self, prompt: str, **kwargs: Any) -> RunResult:
        """Run through the wrapped client and record how long it took."""
        result = self.client.run(prompt, **kwargs)
        self.histogram.observe(run_outcome(result), result.duration)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


@dataclass
class StatusSources:
    """The daemon's live objects that /healthz, /metrics and the admin page (/) read."""

    manager: Any  # .stats, .outbox.waiting_retries
    sender: Any  # .stats (webhook_ok, batchSend_failed, …), .tokens.fetches
    client: Any  # .running_processes
    stream: Any  # .connected, .live, .wanted, .reconnects
    store: Any  # .health(): never touches the DB
    supervisor: Any  # .dead(): critical threads that died
    intake: Any  # .backlog_age(now)
    durations: DurationHistogram
    schedules: Any = None  # .counts: schedules, fired, skipped (schedules/firing.py)
    usage_book: Any = None  # .totals: runs, tokens by kind, cost, CPU since start (usage/book.py)
    host: str = ""  # HOST_NAME: every sample carries host="…" (several bot processes on one app); "" = no label
    token: str = field(default="", repr=False)  # STATUS_TOKEN: asked on every path but /healthz; "" = no admin page
    usage: UsageSource | None = None  # the month's usage by user and day for the admin page; None = not recorded
    tz: str = "Asia/Shanghai"  # SCHEDULE_TZ: the admin page's times
    version: str = ""  # shown in the admin page's header when known
    secrets: tuple[str, ...] = field(default=(), repr=False)  # never shown on the admin page (prompts, steps)


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Exposition:
    """Builds the Prometheus text format (version 0.0.4)."""

    def __init__(self, constant: Mapping[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.constant = dict(constant or {})  # labels every sample carries

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        every = {**self.constant, **(labels or {})}
        rendered = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in every.items())
        self.lines.append(f"{name}{{{rendered}}} {number(value)}" if rendered else f"{name} {number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(sources: StatusSources) -> str:
    """Every metric of the bot in the Prometheus text format."""
    stats = sources.manager.stats
    sent = dict(sources.sender.stats)
    out = Exposition({"host": sources.host} if sources.host else None)
    out.family("dingtalk_bot_tasks", "gauge", "Live tasks by status (queued, running), and tasks finished since "
               "start by final status.")
    for status in STATUS_LABELS:
        out.sample("dingtalk_bot_tasks", stats.get(f"tasks_{status}", 0), {"status": status})
    out.family("dingtalk_bot_queue_length", "gauge", "Tasks waiting for a worker.")
    out.sample("dingtalk_bot_queue_length", stats.get("queue_length", 0))
    out.family("dingtalk_bot_running_tasks", "gauge", "Tasks running now.")
    out.sample("dingtalk_bot_running_tasks", stats.get("running", 0))
    out.family("dingtalk_bot_cli_processes", "gauge", "CodeBuddy CLI processes alive now.")
    out.sample("dingtalk_bot_cli_processes", sources.client.running_processes)
    warm = sources.client.warm_stats()
    out.family("dingtalk_bot_warm_processes", "gauge", "Warm CLI processes: idle (kept for their conversation's next "
               "message) or busy (running a turn); at most WARM_SESSIONS are kept.")
    for state in ("idle", "busy"):
        out.sample("dingtalk_bot_warm_processes", warm[state], {"state": state})
    out.family("dingtalk_bot_warm_capacity", "gauge", "WARM_SESSIONS: warm CLI processes kept at most.")
    out.sample("dingtalk_bot_warm_capacity", warm["capacity"])
    out.family("dingtalk_bot_warm_memory_bytes", "gauge", "Resident memory of the warm CLI processes and their tools.")
    out.sample("dingtalk_bot_warm_memory_bytes", warm["rss_bytes"])
    out.family("dingtalk_bot_warm_runs_total", "counter",
               "Runs by whether a warm process of their conversation was there (hit) or one was started (miss).")
    out.sample("dingtalk_bot_warm_runs_total", warm["hits"], {"result": "hit"})
    out.sample("dingtalk_bot_warm_runs_total", warm["misses"], {"result": "miss"})
    out.family("dingtalk_bot_warm_ended_total", "counter", "Warm CLI processes ended (evicted, idle, crashed, …).")
    out.sample("dingtalk_bot_warm_ended_total", warm["ended"])
    network = getattr(getattr(sources.client, "sandbox", None), "network", None)
    if network is not None:  # each jailed run's egress proxy (codebuddy/jail_network.py)
        egress = network.stats()
        out.family("dingtalk_bot_egress_connections_total", "counter", "Connections runs opened through the proxy.")
        out.sample("dingtalk_bot_egress_connections_total", egress["connections"])
        out.family("dingtalk_bot_egress_refusals_total", "counter",
                   "Destinations the network policy refused to runs (CODEBUDDY_EGRESS, _ALLOW, _DENY).")
        out.sample("dingtalk_bot_egress_refusals_total", egress["refusals"])
    out.family("dingtalk_bot_task_duration_seconds", "histogram", "Duration of CodeBuddy CLI runs, by outcome.")
    for outcome in OUTCOMES:
        cumulative, total, count = sources.durations.snapshot(outcome)
        for bound, value in zip(sources.durations.buckets, cumulative, strict=True):
            out.sample("dingtalk_bot_task_duration_seconds_bucket", value, {"outcome": outcome, "le": number(bound)})
        out.sample("dingtalk_bot_task_duration_seconds_bucket", count, {"outcome": outcome, "le": "+Inf"})
        out.sample("dingtalk_bot_task_duration_seconds_sum", total, {"outcome": outcome})
        out.sample("dingtalk_bot_task_duration_seconds_count", count, {"outcome": outcome})
    out.family("dingtalk_bot_deliveries_total", "counter",
               "Messages delivered, by path (session webhook, 1:1 batchSend push, group push).")
    for path in DELIVERY_PATHS:
        out.sample("dingtalk_bot_deliveries_total", sent.get(f"{path}_ok", 0), {"path": path})
    out.family("dingtalk_bot_delivery_failures_total", "counter",
               "Deliveries that failed on a path (a failed webhook reply then falls back to a push).")
    for path in DELIVERY_PATHS:
        out.sample("dingtalk_bot_delivery_failures_total", sent.get(f"{path}_failed", 0), {"path": path})
    render_api_budget(out, getattr(sources.sender, "meter", None))
    if sources.schedules is not None:  # scheduled prompts (docs/schedules.md)
        counts = dict(sources.schedules.counts)
        out.family("dingtalk_bot_schedules", "gauge", "Schedules in the task DB (all hosts', paused ones too).")
        out.sample("dingtalk_bot_schedules", counts["schedules"])
        out.family("dingtalk_bot_schedule_fires_total", "counter", "Fires of schedules this host claimed since start, "
                   "by outcome: run (a task) or skipped (the previous still ran, too late, the sender not allowed).")
        out.sample("dingtalk_bot_schedule_fires_total", counts["fired"], {"outcome": "run"})
        out.sample("dingtalk_bot_schedule_fires_total", counts["skipped"], {"outcome": "skipped"})
    render_usage(out, sources.usage_book)
    out.family("dingtalk_bot_token_fetches_total", "counter", "Access tokens fetched from DingTalk.")
    out.sample("dingtalk_bot_token_fetches_total", sources.sender.tokens.fetches)
    out.family("dingtalk_bot_stream_connected", "gauge", "1 while at least one DingTalk Stream connection is live.")
    out.sample("dingtalk_bot_stream_connected", 1 if sources.stream.connected else 0)
    live, wanted = stream_connections(sources.stream)
    out.family("dingtalk_bot_stream_connections", "gauge",
               "DingTalk Stream connections: live (can receive a message now) and wanted (STREAM_CONNECTIONS).")
    out.sample("dingtalk_bot_stream_connections", live, {"state": "live"})
    out.sample("dingtalk_bot_stream_connections", wanted, {"state": "wanted"})
    out.family("dingtalk_bot_stream_reconnects_total", "counter", "DingTalk Stream reconnect attempts.")
    out.sample("dingtalk_bot_stream_reconnects_total", sources.stream.reconnects)
    return out.text()


def render_api_budget(out: Exposition, meter: Any) -> None:
    """The month's metered DingTalk calls against DINGTALK_MONTHLY_CALL_BUDGET (dingtalk/api_budget.py), if counted."""
    if meter is None:
        return
    month = meter.snapshot()
    out.family("dingtalk_bot_api_calls_month", "gauge", "Metered DingTalk OpenAPI calls counted this calendar month "
               "(the count survives restarts).")
    out.sample("dingtalk_bot_api_calls_month", month["spent"], {"month": month["month"]})
    out.family("dingtalk_bot_api_call_budget", "gauge", "DINGTALK_MONTHLY_CALL_BUDGET.")
    out.sample("dingtalk_bot_api_call_budget", month["budget"])
    out.family("dingtalk_bot_api_quota_exhausted", "gauge", "1 while DingTalk refuses metered calls this month "
               "(ApiCountLimitForOrg): results go by session webhook only.")
    out.sample("dingtalk_bot_api_quota_exhausted", 1 if month["limited"] else 0)
    out.family("dingtalk_bot_api_calls_total", "counter", "Metered DingTalk calls since start, by kind.")
    for kind, count in sorted(month["by_kind"].items()):
        out.sample("dingtalk_bot_api_calls_total", count, {"kind": kind})


def render_usage(out: Exposition, book: Any) -> None:
    """What this process's runs used since start (usage/book.py; per user: `bot.py usage`, never a label here)."""
    if book is None:
        return
    totals = dict(book.totals)
    out.family("dingtalk_bot_usage_runs_total", "counter", "CLI runs recorded since start.")
    out.sample("dingtalk_bot_usage_runs_total", totals["runs"])
    out.family("dingtalk_bot_usage_tokens_total", "counter", "Tokens the CLI reported for the runs since start, by "
               "kind (input includes cache_read).")
    for kind in ("input", "output", "cache_read", "cache_creation"):
        out.sample("dingtalk_bot_usage_tokens_total", totals[f"{kind}_tokens"], {"kind": kind})
    out.family("dingtalk_bot_usage_cost_usd_total", "counter", "Cost in USD the CLI reported for the runs since start.")
    out.sample("dingtalk_bot_usage_cost_usd_total", totals["cost_usd"])
    out.family("dingtalk_bot_usage_cpu_seconds_total", "counter", "CPU seconds the runs' processes used since start.")
    out.sample("dingtalk_bot_usage_cpu_seconds_total", totals["cpu_seconds"])
