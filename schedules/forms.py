"""What a schedule's text means: the forms /every takes (每天 09:00, 工作日 09:00, a quoted cron expression, …) as a
cron expression and words, and its next fire times in SCHEDULE_TZ (cronsim does the cron arithmetic)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError

FORMS = """可用的定时写法:
每天 HH:MM、工作日 HH:MM (周一至周五)、每周一 HH:MM … 每周日 HH:MM、每月N日 HH:MM、每小时、每N分钟、
daily HH:MM、weekdays HH:MM，或引号中的 cron 表达式 ("0 9 * * 1-5")。
例: /every 工作日 09:00 生成日报"""
WEEKDAYS = {"一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "日": 0, "天": 0}
_TIME = r"(\d{1,2})[:：](\d{2})"
_QUOTES = {'"': '"', "'": "'", "“": "”", "「": "」"}
SAMPLE_FIRES = 200  # fires looked at to find a cron expression's shortest gap


class ScheduleError(ValueError):
    """The text is not a schedule /every understands; the message says why, then lists the forms."""


@dataclass(frozen=True)
class Timing:
    """A parsed schedule: the cron expression it is and the words that say it."""

    cron: str
    words: str


def _clock(hour: str, minute: str) -> tuple[int, int]:
    h, m = int(hour), int(minute)
    if h > 23 or m > 59:
        raise ScheduleError(f"时间 {hour}:{minute} 无效")
    return h, m


def _fixed(text: str) -> tuple[Timing, str] | None:
    """The Chinese and English forms with a time of day, 每小时 and 每N分钟; None for anything else."""
    patterns: tuple[tuple[str, object], ...] = (
        (rf"(?:每天|daily)\s+{_TIME}", lambda g: ("* * *", "每天")),
        (rf"(?:工作日|weekdays)\s+{_TIME}", lambda g: ("* * 1-5", "工作日 (周一至周五)")),
        (rf"每周([一二三四五六日天])\s+{_TIME}", lambda g: (f"* * {WEEKDAYS[g[0]]}", f"每周{g[0]}")),
        (rf"每月(\d{{1,2}})[日号]\s+{_TIME}", lambda g: (f"{g[0]} * *", f"每月{g[0]}日")),
    )
    for pattern, build in patterns:
        found = re.match(pattern + r"(?:\s+|$)", text, re.IGNORECASE)
        if found:
            groups = found.groups()
            hour, minute = _clock(*groups[-2:])
            rest, words = build(groups[:-2])  # type: ignore[operator]
            if rest[0].isdigit() and not 1 <= int(rest.split()[0]) <= 31:
                raise ScheduleError(f"日期 {rest.split()[0]} 无效")
            return Timing(f"{minute} {hour} {rest}", f"{words} {hour:02d}:{minute:02d}"), text[found.end():]
    found = re.match(r"每小时(?:\s+|$)", text)
    if found:
        return Timing("0 * * * *", "每小时整点"), text[found.end():]
    found = re.match(r"每(\d{1,2})分钟(?:\s+|$)", text)
    if found:
        every = int(found.group(1))
        if not 1 <= every <= 59:
            raise ScheduleError(f"每{every}分钟无效 (1 到 59)")
        return Timing(f"*/{every} * * * *", f"每{every}分钟"), text[found.end():]
    return None


def parse(text: str) -> tuple[Timing, str]:
    """The schedule at the start of `text` and the prompt after it; ScheduleError if there is none."""
    text = text.strip()
    fixed = _fixed(text)
    if fixed is not None:
        return fixed
    closing = _QUOTES.get(text[:1])
    end = text.find(closing, 1) if closing else -1
    if end < 0:
        raise ScheduleError("看不懂这个定时写法")
    cron = " ".join(text[1:end].split())
    try:
        words = CronSim(cron, datetime(2026, 1, 1)).explain()
    except (CronSimError, ValueError) as exc:
        raise ScheduleError(f"cron 表达式 \"{cron}\" 无效 ({exc})") from None
    if len(cron.split()) != 5:
        raise ScheduleError(f"cron 表达式 \"{cron}\" 应有 5 个字段 (分 时 日 月 周)")
    return Timing(cron, f"cron \"{cron}\" ({words})"), text[end + 1:]


def next_fires(cron: str, after: float, tz: str, count: int) -> list[float]:
    """The next `count` fire times (epoch seconds) strictly after `after`, the cron expression read in `tz`."""
    start = datetime.fromtimestamp(after, ZoneInfo(tz))
    fires = CronSim(cron, start)
    return [next(fires).timestamp() for _ in range(count)]


def next_fire(cron: str, after: float, tz: str) -> float:
    """The first fire time strictly after `after`."""
    return next_fires(cron, after, tz, 1)[0]


def previous_fire(cron: str, before: float, tz: str) -> float:
    """The last fire time at or before `before`."""
    return next(CronSim(cron, datetime.fromtimestamp(math.floor(before) + 1, ZoneInfo(tz)), reverse=True)).timestamp()


def fires_within(cron: str, now: float, seconds: float, tz: str, cap: int) -> int:
    """How many times the schedule fires in the `seconds` after `now`, counted up to `cap`."""
    fires, end, count = CronSim(cron, datetime.fromtimestamp(now, ZoneInfo(tz))), now + seconds, 0
    while count < cap and next(fires).timestamp() <= end:
        count += 1
    return count


def shortest_gap(cron: str, now: float, tz: str) -> float:
    """The shortest time between two of the next SAMPLE_FIRES fires (seconds): what SCHEDULE_MIN_INTERVAL judges."""
    fires = next_fires(cron, now, tz, SAMPLE_FIRES)
    return min(later - earlier for earlier, later in zip(fires, fires[1:], strict=False))


def local_time(when: float, tz: str) -> str:
    """`when` as the chat reads it: 2026-12-07 09:00 (周一)."""
    moment = datetime.fromtimestamp(when, ZoneInfo(tz))
    return moment.strftime("%Y-%m-%d %H:%M") + f" (周{'一二三四五六日'[moment.weekday()]})"
