"""The schedules table of the task DB (SQLite or PostgreSQL, schema version 6): a schedule's row, and the claim that
hands each due fire to exactly one host.

The claim is one transaction: the due rows are selected (PostgreSQL: `FOR UPDATE SKIP LOCKED`, so a row another host
is claiming is passed over; SQLite: `BEGIN IMMEDIATE`, one writer at a time) and each one's `next_fire` moved past
now before it commits. A second host, or the same host after a restart, finds nothing due until the next fire.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from dingtalk.route import Route
from schedules.forms import next_fire, previous_fire
from store.feature_table import FeatureTable


@dataclass(frozen=True)
class Schedule:
    """One scheduled prompt: whose, which chat, when (a cron expression and its words) and what happened last."""

    id: str
    user_id: str
    user_name: str
    conversation_key: str
    route: Route  # the chat's route, without a session webhook: fires are pushed
    cron: str
    words: str
    prompt: str
    created_at: float
    next_fire: float
    paused: bool = False
    last_fire: float | None = None
    last_task: str = ""  # the task of the last fire that ran
    last_result: str = ""  # what the last fire did, in words (/schedules)
    note: str = ""  # what the next answer says first (fires skipped meanwhile)
    fires: int = 0
    skipped: int = 0


@dataclass(frozen=True)
class Claim:
    """A due fire this host now owns: the schedule as it was, the latest fire time that has passed, and how many
    fire times passed since the schedule last fired (more than one after downtime)."""

    schedule: Schedule
    due: float
    missed: int


MAX_COUNTED = 1000  # missed fire times counted one by one after downtime; past it "1000 or more"
COLUMNS = [f.name for f in fields(Schedule)]


def _row(schedule: Schedule) -> dict[str, Any]:
    row = {name: getattr(schedule, name) for name in COLUMNS}
    row["route"] = json.dumps(schedule.route.__dict__, ensure_ascii=False)
    row["paused"] = int(schedule.paused)
    return row


def _schedule(row: dict[str, Any]) -> Schedule:
    values = dict(row)
    values["route"] = Route(**json.loads(values["route"]))
    values["paused"] = bool(values["paused"])
    return Schedule(**values)


class ScheduleTable(FeatureTable):
    """The schedules of one task DB (`TASK_DB`: a SQLite path, or a postgresql:// URL shared by the hosts)."""

    def __init__(self, task_db: str) -> None:
        super().__init__(task_db, "schedules")  # the task store migrated it (schema version 6)

    def add(self, schedule: Schedule) -> None:
        row = _row(schedule)
        with self._transaction() as run:
            run(f"INSERT INTO schedules ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})",
                tuple(row[name] for name in COLUMNS))

    def get(self, schedule_id: str) -> Schedule | None:
        rows = self._query("SELECT * FROM schedules WHERE id = %s", (schedule_id,))
        return _schedule(rows[0]) if rows else None

    def listed(self, conversation_key: str | None = None) -> list[Schedule]:
        """The schedules of one chat (None: every schedule), oldest first."""
        if conversation_key is None:
            rows = self._query("SELECT * FROM schedules ORDER BY created_at")
        else:
            rows = self._query("SELECT * FROM schedules WHERE conversation_key = %s ORDER BY created_at",
                               (conversation_key,))
        return [_schedule(row) for row in rows]

    def count(self) -> int:
        """Schedules in the table, paused ones too."""
        return int(self._query("SELECT count(*) AS n FROM schedules")[0]["n"])

    def count_for_user(self, user_id: str) -> int:
        return int(self._query("SELECT count(*) AS n FROM schedules WHERE user_id = %s", (user_id,))[0]["n"])

    def remove(self, schedule_id: str) -> bool:
        with self._transaction() as run:
            found = run("SELECT id FROM schedules WHERE id = %s", (schedule_id,))
            run("DELETE FROM schedules WHERE id = %s", (schedule_id,))
        return bool(found)

    def update(self, schedule_id: str, **changes: Any) -> None:
        """Set some columns of one schedule (paused, next_fire, last_task, last_result, note, skipped)."""
        values = {name: int(value) if name == "paused" else value for name, value in changes.items()}
        with self._transaction() as run:
            run(f"UPDATE schedules SET {', '.join(f'{name} = %s' for name in values)} WHERE id = %s",
                (*values.values(), schedule_id))

    def claim_due(self, now: float, tz: str) -> list[Claim]:
        """Take every due, unpaused schedule for this host in one transaction: its `next_fire` moves to the first
        fire time after `now` (cron read in `tz`), so no other host, nor a restart, fires it again."""
        if not self._query("SELECT id FROM schedules WHERE paused = 0 AND next_fire <= %s LIMIT 1", (now,)):
            return []  # the usual look: nothing due, and no write lock taken for it
        claims = []
        with self._transaction() as run:
            rows = run("SELECT * FROM schedules WHERE paused = 0 AND next_fire <= %s ORDER BY next_fire "
                       "FOR UPDATE SKIP LOCKED", (now,))
            for row in rows:
                schedule = _schedule(row)
                due, missed, upcoming = schedule.next_fire, 1, next_fire(schedule.cron, schedule.next_fire, tz)
                while upcoming <= now:  # fire times passed while no host was up: counted, the latest kept
                    due, missed, upcoming = upcoming, missed + 1, next_fire(schedule.cron, upcoming, tz)
                    if missed >= MAX_COUNTED:  # a long downtime: no need to walk every minute of it
                        due, upcoming = previous_fire(schedule.cron, now, tz), next_fire(schedule.cron, now, tz)
                run("UPDATE schedules SET next_fire = %s, last_fire = %s, fires = fires + 1 WHERE id = %s",
                    (upcoming, due, schedule.id))
                claims.append(Claim(schedule, due, missed))
        return claims
