"""The DingTalk OpenAPI call budget: each metered call asked for, then counted by month, kind and the user's day.

DingTalk meters robot pushes and card calls per calendar month (free orgs: 5,000, error
`Forbidden.AccessDenied.ApiCountLimitForOrg`, docs/wire-facts.md §7); session-webhook replies are not metered.
`ApiBudget` counts each metered attempt in the task store (`add_api_calls`), compares the month's spend with a
straight line through the month and tells the callers what they may spend:

- `card_interval(base)`: card updates come further apart while the spend runs ahead of the line;
- `cards_allowed(user_id)`: no new card once the spend reaches `CARDS_OFF_AT` of the budget (or the line is far
  behind), nor for a user with fewer than `CARD_MIN_ROOM` calls left today (`room`);
- `push_allowed(urgent)`: pushes only for what cannot wait (results) once `NOTICES_OFF_AT` is reached;
- after `ApiCountLimitForOrg` (`limit_hit`): no metered call at all until the month turns (webhook only), and
  `take_limit_notice` hands the next webhook reply the sentence that tells the user why.

Every metered call asks first: `spend(kind, user_id)` says "" (granted, and counted) or the sentence saying why not —
DingTalk refused the month, the month is near the budget (downloads and files wait, `EXTRA_KINDS`), or the user has
spent `USER_DAILY_API_CALLS` today (admins exempt). A user's day is Beijing's, like the month; the store counts it, so
the count holds across restarts and hosts.
"""

from __future__ import annotations

import calendar
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
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
ORG_LIMIT_REFUSAL = "本组织本月的钉钉开放接口调用额度已用完，下月恢复"
NEAR_BUDGET_REFUSAL = "本组织本月的钉钉接口调用已用 {spent} 次，接近月度预算 {budget} 次，附件和文件暂停收发，下月恢复"
# Not the answer itself: once the month's spend reaches NOTICES_OFF_AT these wait, like notices.
EXTRA_KINDS = frozenset({"download", "media_upload", "file_send"})
# Refusals the caller tells the user itself (the attachment reply, the outbox's line): no later notice repeats them.
TOLD_AT_ONCE = frozenset({"download", "media_upload", "file_send"})
CARD_MIN_ROOM = 5  # a card costs 3 calls at least: with fewer left today, the answer goes as a plain message
USER_LOCKS = 64  # a user's check-and-count is one step on this host (locks striped by user)
# The month's spend by kind, for people: the kinds each group holds, in the order shown.
KIND_GROUPS: dict[str, tuple[str, ...]] = {
    "downloads": ("download",), "uploads": ("media_upload",),
    "pushes": ("batchSend", "groupMessages", "file_send"), "cards": ("card_create", "card_stream", "card_update"),
}
GROUP_LABELS = {"downloads": "下载", "uploads": "上传", "pushes": "推送", "cards": "卡片", "other": "其他"}


_SERVING = threading.local()  # the task a thread is sending for (`serving`), so its metered calls are the task's


@contextlib.contextmanager
def serving(task_id: str) -> Iterator[None]:
    """Calls counted on this thread meanwhile are made for `task_id` (`ApiBudget.on_task_call` hears of each)."""
    before = getattr(_SERVING, "task", "")
    _SERVING.task = task_id
    try:
        yield
    finally:
        _SERVING.task = before


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


def day_reset(wall_time: float) -> str:
    """When the day of `wall_time` ends, for people: "北京时间 11-30 00:00"."""
    local = datetime.fromtimestamp(wall_time, UTC) + MONTH_OFFSET
    return f"北京时间 {(local + timedelta(days=1)).strftime('%m-%d')} 00:00"


def spend_by_group(by_kind: dict[str, int], total: int) -> dict[str, int]:
    """The month's calls by group (KIND_GROUPS order), and "other": what no group names (kinds not counted before)."""
    groups = {group: sum(by_kind.get(kind, 0) for kind in kinds) for group, kinds in KIND_GROUPS.items()}
    other = total - sum(groups.values())
    return {**groups, "other": other} if other > 0 else groups


def month_elapsed(wall_time: float) -> float:
    """How much of its DingTalk calendar month has passed at `wall_time`, 0.0 to 1.0."""
    local = datetime.fromtimestamp(wall_time, UTC) + MONTH_OFFSET
    days = calendar.monthrange(local.year, local.month)[1]
    start = local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return min(1.0, (local - start).total_seconds() / (days * 86400))


class DailyAllowance:
    """USER_DAILY_API_CALLS: the metered calls one user may cause per day (Beijing's), as every host counted them.

    The store's count of the user's day is read at every ask, so calls made on other hosts (or before a restart) count
    too; this host's own count is a floor under it (a store that cannot be read resets nobody). One user's ask and
    count are one step on this host. Admins (`exempt`) and the limit 0 mean no limit.
    """

    def __init__(self, store: CallCounts, limit: int, exempt: Iterable[str] = ()) -> None:
        self._store = store
        self.limit = max(0, limit)
        self.exempt = frozenset(exempt)
        self._lock = threading.Lock()
        self._user_locks = tuple(threading.Lock() for _ in range(USER_LOCKS))
        self._day = ""
        self._here: dict[str, int] = {}  # this host's count of each user today
        self._untold: set[str] = set()  # users refused today who have not been told why yet

    def applies_to(self, user_id: str) -> bool:
        """Whether `user_id` has a daily limit (not an admin, not anonymous, the limit not 0)."""
        return bool(user_id) and self.limit > 0 and user_id not in self.exempt

    def _roll(self, day: str) -> None:
        if day != self._day:  # under the lock
            self._day, self._here, self._untold = day, {}, set()

    def used(self, user_id: str, now: float) -> int:
        """The user's metered calls on the day of `now`, on every host."""
        day = day_of(now)
        try:
            stored = int(self._store.user_api_calls(day, user_id))
        except Exception:
            log.exception("读取用户今日钉钉接口调用次数失败 user=%s", user_id)
            stored = 0
        with self._lock:
            self._roll(day)
            return max(stored, self._here.get(user_id, 0))

    def counted(self, user_id: str, now: float) -> None:
        """One call of the user was counted (in the store, by the caller)."""
        with self._lock:
            self._roll(day_of(now))
            self._here[user_id] = self._here.get(user_id, 0) + 1

    def ask(self, user_id: str, kind: str, now: float, count: Callable[[], object]) -> str:
        """One call of `kind` for the user: counted (`count`) and "" while the day has room, else why not."""
        with self._user_locks[hash(user_id) % USER_LOCKS]:
            used = self.used(user_id, now)
            if used < self.limit:
                count()
                return ""
        if kind not in TOLD_AT_ONCE:
            with self._lock:
                self._untold.add(user_id)
        log.warning("用户今日钉钉接口调用已达上限 (%d/%d)，未调用 %s user=%s", used, self.limit, kind, user_id)
        return self.refusal(used, now)

    def refusal(self, used: int, now: float, need: int = 1) -> str:
        """Why a user's call (or `need` calls) is refused: the numbers, and when the day turns."""
        if used >= self.limit:
            return f"你今天的钉钉接口调用已用 {used} 次，达到每人每天 {self.limit} 次的上限，{day_reset(now)} 恢复"
        return (f"你今天的钉钉接口调用已用 {used} 次，每人每天上限 {self.limit} 次，不够这次所需的 {need} 次，"
                f"{day_reset(now)} 恢复")

    def take_notice(self, user_id: str, now: float) -> str:
        """Once after a call of the user's was refused unseen (a push, a card): the sentence for the next reply."""
        with self._lock:
            self._roll(day_of(now))
            if user_id not in self._untold:
                return ""
            self._untold.discard(user_id)
        why = self.refusal(self.used(user_id, now), now)
        return f"（提示：{why}；在此之前后台任务的结果、文件和卡片不会主动推送，只在您发消息后的会话中回复。）"


class ApiBudget:
    """Counts metered OpenAPI calls per month in the store and says how many more the bot may spend.

    Thread-safe. The count is read from the store once per month and kept in memory; every call adds one there
    and journals one to the store (with its kind and the user it was made for), so the count survives a restart.
    `users` holds the per-user daily limit.
    """

    def __init__(self, store: CallCounts, monthly_budget: int, *, user_daily_limit: int = 0,
                 exempt: Iterable[str] = (), clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self.monthly_budget = max(1, monthly_budget)
        self.users = DailyAllowance(store, user_daily_limit, exempt)
        self._clock = clock
        self._lock = threading.Lock()
        self._month = ""
        self._spent = 0
        self._by_kind: dict[str, int] = {}
        self._limit_month = ""  # the month DingTalk said ApiCountLimitForOrg in
        self._limit_notice_due = False
        # Told of each call counted while a thread serves a task (`serving`): (task id, user id, wall time).
        self.on_task_call: Callable[[str, str, float], None] | None = None

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

    # -- asking and counting

    def spend(self, kind: str, user_id: str = "") -> str:
        """Ask for one metered call of `kind` made for `user_id`: "" when granted (and counted), else why not, in
        words fit for that user."""
        if self.limited():
            return ORG_LIMIT_REFUSAL
        if kind in EXTRA_KINDS and not self.push_allowed(urgent=False):
            log.warning("本月钉钉接口调用接近预算，未调用 %s user=%s", kind, user_id or "-")
            return NEAR_BUDGET_REFUSAL.format(spent=self.spent(), budget=self.monthly_budget)
        now = self._clock()
        if not self.users.applies_to(user_id):
            self.record(kind, user_id, now)
            return ""
        return self.users.ask(user_id, kind, now, lambda: self.record(kind, user_id, now))

    def room(self, user_id: str) -> int | None:
        """Metered calls `user_id` may still cause today; None when no daily limit applies to them."""
        if not self.users.applies_to(user_id):
            return None
        return max(0, self.users.limit - self.users.used(user_id, self._clock()))

    def short_of(self, user_id: str, calls: int) -> str:
        """Why `user_id` may not start something costing `calls` metered calls today; "" when they may."""
        if not self.users.applies_to(user_id):
            return ""
        now = self._clock()
        used = self.users.used(user_id, now)
        return self.users.refusal(used, now, calls) if used + calls > self.users.limit else ""

    def used_today(self, user_id: str) -> int:
        """The metered calls made for `user_id` today, on every host."""
        return self.users.used(user_id, self._clock())

    def record(self, kind: str, user_id: str = "", now: float | None = None) -> None:
        """Count one metered call attempt of `kind` (batchSend, groupMessages, card_create, …) made for `user_id`."""
        now = self._clock() if now is None else now
        with self._lock:
            month = self._roll(now)
            before = self._spent
            self._spent += 1
            self._by_kind[kind] = self._by_kind.get(kind, 0) + 1
            spent = self._spent
        self._store.add_api_calls(month, 1, kind, day_of(now) if user_id else "", user_id)
        if user_id:
            self.users.counted(user_id, now)
        task_id = getattr(_SERVING, "task", "")
        if task_id and self.on_task_call is not None:
            try:
                self.on_task_call(task_id, user_id, now)
            except Exception:  # the task's own count is a report; the month's count above is what limits
                log.exception("记录任务的钉钉接口调用失败 task=%s", task_id)
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

    def take_limit_notice(self, user_id: str = "") -> str:
        """Once after the org's limit was hit, or a push, card or file of this user's refused by their daily limit:
        the sentence to add to the next webhook reply (to that user); else ""."""
        now = self._clock()
        with self._lock:
            self._roll(now)
            org = self._limit_notice_due
            self._limit_notice_due = False
        if org:
            return LIMIT_NOTICE
        return self.users.take_notice(user_id, now) if user_id else ""

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

    def cards_allowed(self, user_id: str = "") -> bool:
        """Whether a new AI card may be started (it costs 2 calls plus one per update), for `user_id`'s task."""
        if self.limited():
            return False
        if not (self.spent() < CARDS_OFF_AT * self.monthly_budget and self.pace() < CARDS_OFF_PACE):
            return False
        room = self.room(user_id)
        return room is None or room >= CARD_MIN_ROOM

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


    def month_spend(self) -> tuple[int, dict[str, int]]:
        """This month's calls, and by group (downloads, uploads, pushes, cards), as every host counted them."""
        month = month_of(self._clock())
        spent = int(self._store.api_calls(month))
        return spent, spend_by_group(self._store.api_calls_by_kind(month), spent)


def describe_month(counts: CallCounts, monthly_budget: int, now: float) -> str:
    """One line for `bot.py check`: this month's metered calls against the budget, and by kind."""
    month = month_of(now)
    spent = int(counts.api_calls(month))
    share = spent / max(1, monthly_budget)
    line = (f"{spent} of {monthly_budget} metered calls in {month} ({share:.0%}), "
            f"{month_elapsed(now):.0%} of the month gone")
    try:
        groups = spend_by_group(counts.api_calls_by_kind(month), spent)
    except Exception as exc:  # a task DB not yet migrated by the bot (schema 4 and older) has no counters by kind
        return f"{line}; by kind: not counted yet ({type(exc).__name__})"
    return f"{line}; " + ", ".join(f"{group} {calls}" for group, calls in groups.items())
