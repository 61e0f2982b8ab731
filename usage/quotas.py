"""The quotas: USER_DAILY_TOKENS, USER_DAILY_RUNS and USER_MONTHLY_COST_USD, checked before a prompt becomes a run.

A prompt is refused, with the numbers and when the quota resets, once the sender's day (or month) has reached a quota:
the sums every host recorded (usage/book.py), and for runs the sender's tasks already queued or running too. A run that
crosses a quota finishes; the next prompt is refused. Admins and the limit 0 mean no quota. A DB that cannot be read
refuses nobody (logged): the quota is a cost control, not a wall, and the run is still recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from usage.book import UsageBook
from usage.table import Totals

log = logging.getLogger("usage")


@dataclass(frozen=True)
class Limits:
    """The quotas (0 = none)."""

    daily_tokens: int = 0
    daily_runs: int = 0
    monthly_cost_usd: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.daily_tokens or self.daily_runs or self.monthly_cost_usd)


class Quotas:
    """Decides whether a user may start another run now; `active(user_id)`: their tasks queued or running."""

    def __init__(self, book: UsageBook, limits: Limits, *, exempt: Iterable[str] = (),
                 active: Callable[[str], int] = lambda user_id: 0) -> None:
        self.book = book
        self.limits = limits
        self.exempt = frozenset(exempt)
        self.active = active

    def applies_to(self, user_id: str) -> bool:
        return bool(self.limits) and user_id not in self.exempt

    def resets(self, now: float, monthly: bool = False) -> str:
        """When the day (or month) of `now` ends, for people: "12-07 00:00 (Asia/Shanghai)"."""
        local = datetime.fromtimestamp(now, UTC).astimezone(self.book.tz)
        if monthly:
            end = (local.replace(day=28) + timedelta(days=4)).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        else:
            end = (local + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        return f"{end.strftime('%m-%d %H:%M')} ({self.book.tz.key})"

    def today(self, user_id: str, now: float) -> Totals:
        return self.book.user_day(user_id, self.book.day(now))

    def this_month(self, user_id: str, now: float) -> Totals:
        return self.book.user_month(user_id, self.book.day(now)[:7])

    def refusal(self, user_id: str) -> str:
        """Why `user_id` may not start a run now, with the numbers and the reset; "" when they may."""
        if not self.applies_to(user_id):
            return ""
        now, limits = self.book.clock(), self.limits
        try:
            day = self.today(user_id, now) if limits.daily_tokens or limits.daily_runs else Totals()
            month = self.this_month(user_id, now) if limits.monthly_cost_usd else Totals()
        except Exception as exc:
            log.warning("读取用量失败，本次不检查配额 user=%s: %s", user_id, " ".join(str(exc).split())[:200])
            return ""
        if limits.daily_tokens and day.tokens >= limits.daily_tokens:
            return (f"你今天的 token 用量已达上限: {day.tokens:,}/{limits.daily_tokens:,} (输入 {day.input_tokens:,}，"
                    f"输出 {day.output_tokens:,})，{self.resets(now)} 重置。")
        if limits.daily_runs:
            runs = day.runs + self.active(user_id)
            if runs >= limits.daily_runs:
                return (f"你今天的运行次数已达上限: {runs}/{limits.daily_runs} (含排队和执行中的任务)，"
                        f"{self.resets(now)} 重置。")
        if limits.monthly_cost_usd and month.cost_usd >= limits.monthly_cost_usd:
            return (f"你本月的费用已达上限: ${month.cost_usd:.2f}/${limits.monthly_cost_usd:.2f}，"
                    f"{self.resets(now, monthly=True)} 重置。")
        return ""

    def left(self, user_id: str, day: Totals, month: Totals) -> str:
        """The sender's quotas and what is left of each, one line (/usage)."""
        if not self.limits:
            return "配额: 无限制"
        if user_id in self.exempt:
            return "配额: 管理员不受限"
        limits, parts = self.limits, []
        if limits.daily_tokens:
            parts.append(f"今日 token 剩 {max(0, limits.daily_tokens - day.tokens):,}/{limits.daily_tokens:,}")
        if limits.daily_runs:
            parts.append(f"今日运行剩 {max(0, limits.daily_runs - day.runs)}/{limits.daily_runs} 次")
        if limits.monthly_cost_usd:
            parts.append(f"本月费用剩 ${max(0.0, limits.monthly_cost_usd - month.cost_usd):.2f}/"
                         f"${limits.monthly_cost_usd:.2f}")
        return "配额: " + "，".join(parts)
