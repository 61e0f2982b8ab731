"""The org's monthly DingTalk OpenAPI call budget: every metered call counted per month, and how to spend the rest.

DingTalk meters robot pushes and card calls per calendar month (free orgs: 5,000, error
`Forbidden.AccessDenied.ApiCountLimitForOrg`, docs/wire-facts.md §7); session-webhook replies are not metered.
`ApiBudget` counts each metered attempt in the task store (`add_api_calls`), compares the month's spend with a
straight line through the month and tells the callers what they may spend:

- `card_interval(base)`: card updates come further apart while the spend runs ahead of the line;
- `cards_allowed()`: no new card once the spend reaches `CARDS_OFF_AT` of the budget (or the line is far behind);
- `push_allowed(urgent)`: pushes only for what cannot wait (results) once `NOTICES_OFF_AT` is reached;
- after `ApiCountLimitForOrg` (`limit_hit`): no metered call at all until the month turns (webhook only), and
  `take_limit_notice` hands the next webhook reply the sentence that tells the user why.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol

log = logging.getLogger("api_budget")

# DingTalk's calendar month is China's (UTC+8): the count turns over at midnight Beijing time.
MONTH_OFFSET = timedelta(hours=8)
THRESHOLDS = (0.5, 0.8, 1.0)  # a log line when the month's spend first reaches each share of the budget
CARDS_OFF_AT = 0.9  # no new AI card past this share of the budget
NOTICES_OFF_AT = 0.95  # progress notes and other notices no longer pushed past this share
MAX_STRETCH = 8.0  # card updates at most this many times further apart than CARD_UPDATE_INTERVAL
CARDS_OFF_PACE = 4.0  # no new AI card while the spend is this many times ahead of the straight line
EARLY_MONTH = 0.02  # the first 2 % of the month: too early for the line to say anything
LIMIT_NOTICE = ("（提示：本组织本月的钉钉开放接口调用额度已用完，机器人暂时只能在您发消息后的会话中回复，"
                "后台任务的结果会在您下次发消息时才能送达；额度下月恢复。）")


class CallCounts(Protocol):
    """The task store's calls that keep the counts (store.base.TaskRecords)."""

    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None: ...
    def api_calls(self, month: str) -> int: ...
    def api_calls_by_kind(self, month: str) -> dict[str, int]: ...
    def user_api_calls(self, day: str, user_id: str) -> int: ...


def month_of(wall_time: float) -> str:
    """The DingTalk calendar month ("2026-11") of a wall-clock time (epoch seconds)."""
    return (datetime.fromtimestamp(wall_time, UTC) + MONTH_OFFSET).strftime("%Y-%m")


def day_of(wall_time: float) -> str:
    """The bot's day ("2026-11-29") of a wall-clock time: Beijing's, like the month (USER_DAILY_API_CALLS)."""
    return (datetime.fromtimestamp(wall_time, UTC) + MONTH_OFFSET).strftime("%Y-%m-%d")


def month_elapsed(wall_time: float) -> float:
    """How much of its DingTalk calendar month has passed at `wall_time`, 0.0 to 1.0."""
    local = datetime.fromtimestamp(wall_time, UTC) + MONTH_OFFSET
    days = calendar.monthrange(local.year, local.month)[1]
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return min(1.0, (local - start).total_seconds() / (days * 86400))


class ApiBudget:
    """Counts metered OpenAPI calls per month in the store and says how many more the bot may spend.

    Thread-safe. The count is read from the store once per month and kept in memory; every call adds one there
    and journals one to the store, so the count survives a restart.
    """

    def __init__(self, store: CallCounts, monthly_budget: int, *, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.monthly_budget = max(1, monthly_budget)
        self._clock = clock
        self._lock = threading.Lock()
        self._month = ""
        self._spent = 0
        self._by_kind: dict[str, int] = {}
        self._limit_month = ""  # the month DingTalk said ApiCountLimitForOrg in
        self._limit_notice_due = False

    def _roll(self, now: float) -> str:
        """The current month; a new month starts from the store's count (held under the lock)."""
        month = month_of(now)
        if month != self._month:
            self._month = month
            try:
                self._spent = int(self._store.api_calls(month))
            except Exception:
                log.exception("读取本月钉钉接口调用次数失败，从 0 开始计数")
                self._spent = 0
            if self._limit_month and self._limit_month != month:
                log.warning("钉钉接口调用额度已进入新的月份 %s，恢复主动推送", month)
                self._limit_month, self._limit_notice_due = "", False
        return month

    # -- counting

    def record(self, kind: str) -> None:
        """Count one metered call attempt of `kind` (batchSend, groupMessages, card_create, …)."""
        now = self._clock()
        with self._lock:
            month = self._roll(now)
            before = self._spent
            self._spent += 1
            self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
            spent = self._spent
        self._store.add_api_calls(month, 1)
        for share in THRESHOLDS:
            if before < share * self.monthly_budget <= spent:
                log.warning("钉钉接口本月已调用 %d 次，达到月度预算 %d 的 %d%% (%s)", spent, self.monthly_budget,
                            int(share * 100), month)

    def limit_hit(self) -> None:
        """DingTalk answered ApiCountLimitForOrg: webhook only until the month turns; the next reply says why."""
        now = self._clock()
        with self._lock:
            month = self._roll(now)
            first = self._limit_month != month
            self._limit_month = month
            if first:
                self._limit_notice_due = True
        if first:
            log.error("钉钉接口月度调用额度已用完 (ApiCountLimitForOrg)，本月只通过会话 webhook 回复 (%s)", month)

    def take_limit_notice(self) -> str:
        """Once after the limit was hit: the sentence to add to the next webhook reply; else ""."""
        with self._lock:
            self._roll(self._clock())
            if not self._limit_notice_due:
                return ""
            self._limit_notice_due = False
            return LIMIT_NOTICE

    # -- what may be spent

    def spent(self) -> int:
        """Metered calls counted this month."""
        with self._lock:
            self._roll(self._clock())
            return self._spent

    def limited(self) -> bool:
        """True while DingTalk refuses metered calls this month (ApiCountLimitForOrg)."""
        with self._lock:
            return self._limit_month == self._roll(self._clock())

    def pace(self) -> float:
        """The month's spend against a straight line through the month: 1.0 on the line, 2.0 twice ahead of it."""
        now = self._clock()
        with self._lock:
            self._roll(now)
            spent = self._spent
        allowed = self.monthly_budget * max(month_elapsed(now), EARLY_MONTH)
        return spent / allowed

    def card_interval(self, base: float) -> float:
        """Seconds between two updates of a card: `base`, stretched while the spend runs ahead of the line."""
        return base * min(MAX_STRETCH, max(1.0, self.pace()) ** 2)

    def cards_allowed(self) -> bool:
        """Whether a new AI card may be started (it costs 2 calls plus one per update)."""
        if self.limited():
            return False
        return self.spent() < CARDS_OFF_AT * self.monthly_budget and self.pace() < CARDS_OFF_PACE

    def push_allowed(self, urgent: bool) -> bool:
        """Whether a push may be sent: never while limited; notices (not `urgent`) not near the budget."""
        if self.limited():
            return False
        return urgent or self.spent() < NOTICES_OFF_AT * self.monthly_budget

    def snapshot(self) -> dict[str, object]:
        """The month, its spend (in all and by kind), the budget and whether DingTalk refuses calls: for /metrics."""
        now = self._clock()
        with self._lock:
            month = self._roll(now)
            return {"month": month, "spent": self._spent, "budget": self.monthly_budget,
                    "by_kind": dict(self._by_kind), "limited": self._limit_month == month}


def describe_month(counts: CallCounts, monthly_budget: int, now: float) -> str:
    """One line for `bot.py check`: this month's metered calls against the budget."""
    month = month_of(now)
    spent = int(counts.api_calls(month))
    share = spent / max(1, monthly_budget)
    return (f"{spent} of {monthly_budget} metered calls in {month} ({share:.0%}), "
            f"{month_elapsed(now):.0%} of the month gone")
