"""The usage table of the task DB (SQLite or PostgreSQL, schema version 7): one row per task, summed per user, day,
month or chat.

A task's row is added to, never replaced: a run adds its tokens, cost and CPU time (a task run again after a restart
adds a second run), and each metered DingTalk call made for the task adds one call (calls can come before the run's
row, e.g. a progress note pushed while it runs). Days are the bot's (`SCHEDULE_TZ`), months their first seven letters.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from store.feature_table import FeatureTable

COUNTERS = ("runs", "input_tokens", "output_tokens", "cache_read_tokens", "cache_creation_tokens", "cost_usd",
            "wall_seconds", "cpu_seconds", "api_calls")
BY = {"user": "user_id", "day": "day", "conversation": "conversation_key"}


@dataclass(frozen=True)
class UsageRow:
    """What one task used (a run, or only calls): whose, which chat, when, and the counters added."""

    task_id: str
    user_id: str
    user_name: str = ""
    conversation_key: str = ""
    day: str = ""  # "2026-12-06" in SCHEDULE_TZ
    finished_at: float = 0.0
    runs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0
    model: str = ""
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    api_calls: int = 0


@dataclass(frozen=True)
class Totals:
    """The counters summed over some rows; `key` names the group (a user id, a day or a chat), `name` a user's name."""

    key: str = ""
    name: str = ""
    runs: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_usd: float = 0.0
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    api_calls: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


COLUMNS = [f.name for f in fields(UsageRow)[:6]] + ["month"] + [f.name for f in fields(UsageRow)[6:]]
_SUMS = ", ".join(f"COALESCE(SUM({name}), 0) AS {name}" for name in COUNTERS)


def _totals(row: dict, key: str = "", name: str = "") -> Totals:
    return Totals(key=key, name=name, **{counter: (float if counter.endswith(("usd", "seconds")) else int)(
        row.get(counter) or 0) for counter in COUNTERS})


class UsageTable(FeatureTable):
    """The usage rows of one task DB (`TASK_DB`: a SQLite path, or a postgresql:// URL shared by the hosts)."""

    def __init__(self, task_db: str) -> None:
        super().__init__(task_db, "usage")  # the task store migrated it (schema version 7)

    def add(self, row: UsageRow) -> None:
        """Add `row`'s counters to its task's row (made if it is the first); its day is the first's, and names left
        empty (a call's row has no chat or user name) do not replace known ones."""
        values = {**row.__dict__, "month": row.day[:7]}
        added = ", ".join(f"{name} = usage.{name} + excluded.{name}" for name in COUNTERS)
        kept = ", ".join(f"{name} = CASE WHEN excluded.{name} = '' THEN usage.{name} ELSE excluded.{name} END"
                         for name in ("user_id", "user_name", "conversation_key", "model"))
        with self._transaction() as run:
            run(f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
                f"ON CONFLICT (task_id) DO UPDATE SET {added}, finished_at = excluded.finished_at, {kept}",
                tuple(values[name] for name in COLUMNS))

    def user_totals(self, user_id: str, day: str = "", month: str = "") -> Totals:
        """One user's sums for a day, or a month."""
        column, value = ("day", day) if day else ("month", month)
        rows = self._query(f"SELECT {_SUMS} FROM usage WHERE user_id = %s AND {column} = %s", (user_id, value))
        return _totals(rows[0] if rows else {}, user_id)

    def month_totals(self, month: str) -> Totals:
        rows = self._query(f"SELECT {_SUMS} FROM usage WHERE month = %s", (month,))
        return _totals(rows[0] if rows else {}, month)

    def grouped(self, month: str, by: str = "user") -> list[Totals]:
        """The month's sums per user, day or chat (`by`), the most tokens first (days: in date order)."""
        column = BY[by]
        order = "key" if by == "day" else "COALESCE(SUM(input_tokens + output_tokens), 0) DESC, key"
        rows = self._query(f"SELECT {column} AS key, MAX(user_name) AS name, {_SUMS} FROM usage WHERE month = %s "
                           f"GROUP BY {column} ORDER BY {order}", (month,))
        return [_totals(row, str(row["key"]), str(row["name"] or "") if by == "user" else "") for row in rows]
