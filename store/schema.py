"""The task DB's schema and its numbered versions for SQLite and PostgreSQL: what a store creates and migrates.

Each backend keeps the version it is at in a one-row `schema_version` table. At start a store applies, in order and in
one transaction, every step above that version, then records the new one; a DB at a higher version than this code
knows (made by a newer bot) is refused rather than written with an older idea of its tables. Every step is written
with IF NOT EXISTS so a DB made before the version table existed (version 0) is migrated by the same steps.
"""

from __future__ import annotations

from tasks.task import Task

SCHEMA_VERSION = 7
TASK_COLUMNS = [f.name for f in Task.__dataclass_fields__.values()]
FLAGS = ("background", "delivered", "cancel_requested", "undeliverable")  # booleans stored as 0/1



class StoreError(Exception):
    """The task DB cannot be opened; the message is one line naming the path, the cause and the fix."""


# -- SQLite

SQLITE_STEPS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT, conversation_key TEXT, route TEXT NOT NULL,
    prompt TEXT NOT NULL, keyword TEXT, status TEXT NOT NULL, background INTEGER, created_at REAL,
    started_at REAL, finished_at REAL, result TEXT, error TEXT, delivered INTEGER, attempts INTEGER,
    last_step TEXT, msg_id TEXT, last_progress_at REAL, cancel_requested INTEGER DEFAULT 0,
    undeliverable INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, delivered);
CREATE TABLE IF NOT EXISTS seen_messages (msg_id TEXT PRIMARY KEY, seen_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS durations (user_id TEXT, keyword TEXT, seconds REAL, finished_at REAL);
CREATE INDEX IF NOT EXISTS durations_keyword_user ON durations (keyword, user_id, finished_at);
CREATE INDEX IF NOT EXISTS durations_keyword_recent ON durations (keyword, finished_at);
CREATE TABLE IF NOT EXISTS sessions (conversation_key TEXT PRIMARY KEY, session_id TEXT NOT NULL);
""",
    2: "CREATE TABLE IF NOT EXISTS api_calls (month TEXT PRIMARY KEY, calls INTEGER NOT NULL DEFAULT 0);",
    3: "",  # the PostgreSQL cluster tables; nothing for one host
    4: "",  # the questions running tasks wait on, shared by the hosts (cluster/questions.py)
    # The budget's counters by kind of call (per month) and by user (per day: USER_DAILY_API_CALLS).
    5: """
CREATE TABLE IF NOT EXISTS api_calls_by_kind (month TEXT NOT NULL, kind TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (month, kind));
CREATE TABLE IF NOT EXISTS user_api_calls (day TEXT NOT NULL, user_id TEXT NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, user_id));
""",
    # Scheduled prompts (schedules/), and the label a task's answer opens with (a fire names its schedule).
    6: """
ALTER TABLE tasks ADD COLUMN label TEXT DEFAULT '';
CREATE TABLE IF NOT EXISTS schedules (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT,
    conversation_key TEXT NOT NULL, route TEXT NOT NULL, cron TEXT NOT NULL, words TEXT NOT NULL, prompt TEXT NOT NULL,
    created_at REAL NOT NULL, next_fire REAL NOT NULL, paused INTEGER NOT NULL DEFAULT 0, last_fire REAL,
    last_task TEXT NOT NULL DEFAULT '', last_result TEXT NOT NULL DEFAULT '', note TEXT NOT NULL DEFAULT '',
    fires INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (paused, next_fire);
CREATE INDEX IF NOT EXISTS schedules_conversation ON schedules (conversation_key);
""",
    # What each run used (usage/): tokens, cost, CPU and metered DingTalk calls per task, summed per user and day.
    7: """
CREATE TABLE IF NOT EXISTS usage (task_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT NOT NULL DEFAULT '',
    conversation_key TEXT NOT NULL DEFAULT '', day TEXT NOT NULL, month TEXT NOT NULL, finished_at REAL NOT NULL,
    runs INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0, cache_creation_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, model TEXT NOT NULL DEFAULT '', wall_seconds REAL NOT NULL DEFAULT 0,
    cpu_seconds REAL NOT NULL DEFAULT 0, api_calls INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_user_day ON usage (user_id, day);
CREATE INDEX IF NOT EXISTS usage_month ON usage (month, user_id);
""",
}
SQLITE_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"

# -- PostgreSQL (booleans stay 0/1 integers so both backends share one row mapping)

PG_STEPS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT, conversation_key TEXT, route TEXT NOT NULL,
    prompt TEXT NOT NULL, keyword TEXT, status TEXT NOT NULL, background INTEGER, created_at DOUBLE PRECISION,
    started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION, result TEXT, error TEXT, delivered INTEGER,
    attempts INTEGER, last_step TEXT, msg_id TEXT, last_progress_at DOUBLE PRECISION,
    cancel_requested INTEGER DEFAULT 0, undeliverable INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_user ON tasks (user_id, created_at);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks (status, delivered);
CREATE TABLE IF NOT EXISTS seen_messages (msg_id TEXT PRIMARY KEY, seen_at DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS durations (seq BIGSERIAL PRIMARY KEY, user_id TEXT, keyword TEXT,
    seconds DOUBLE PRECISION, finished_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS durations_keyword_user ON durations (keyword, user_id, finished_at);
CREATE INDEX IF NOT EXISTS durations_keyword_recent ON durations (keyword, finished_at);
CREATE TABLE IF NOT EXISTS sessions (conversation_key TEXT PRIMARY KEY, session_id TEXT NOT NULL);
""",
    2: "CREATE TABLE IF NOT EXISTS api_calls (month TEXT PRIMARY KEY, calls BIGINT NOT NULL DEFAULT 0);",
    # Several hosts: who runs a task and until when its lease holds, and which host holds a conversation.
    3: """
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS host TEXT;
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION;
CREATE INDEX IF NOT EXISTS tasks_lease ON tasks (status, lease_until);
CREATE TABLE IF NOT EXISTS conversation_hosts (conversation_key TEXT PRIMARY KEY, host TEXT NOT NULL,
    since DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (host TEXT PRIMARY KEY, alive_until DOUBLE PRECISION NOT NULL);
""",
    # Several hosts: the question a running task waits on, so an answer reaching another host gets to it.
    4: """
CREATE TABLE IF NOT EXISTS questions (id TEXT PRIMARY KEY, conversation_key TEXT NOT NULL, task_id TEXT NOT NULL,
    host TEXT NOT NULL, owner TEXT NOT NULL, is_question INTEGER NOT NULL, asked_at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS questions_conversation ON questions (conversation_key);
CREATE INDEX IF NOT EXISTS questions_task ON questions (task_id);
""",
    # The budget's counters by kind of call (per month) and by user (per day: USER_DAILY_API_CALLS).
    5: """
CREATE TABLE IF NOT EXISTS api_calls_by_kind (month TEXT NOT NULL, kind TEXT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (month, kind));
CREATE TABLE IF NOT EXISTS user_api_calls (day TEXT NOT NULL, user_id TEXT NOT NULL,
    calls BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (day, user_id));
""",
    # Scheduled prompts (schedules/), and the label a task's answer opens with (a fire names its schedule).
    6: """
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS label TEXT DEFAULT '';
CREATE TABLE IF NOT EXISTS schedules (id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT,
    conversation_key TEXT NOT NULL, route TEXT NOT NULL, cron TEXT NOT NULL, words TEXT NOT NULL, prompt TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, next_fire DOUBLE PRECISION NOT NULL, paused INTEGER NOT NULL DEFAULT 0,
    last_fire DOUBLE PRECISION, last_task TEXT NOT NULL DEFAULT '', last_result TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '', fires INTEGER NOT NULL DEFAULT 0, skipped INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS schedules_due ON schedules (paused, next_fire);
CREATE INDEX IF NOT EXISTS schedules_conversation ON schedules (conversation_key);
""",
    # What each run used (usage/): tokens, cost, CPU and metered DingTalk calls per task, summed per user and day.
    7: """
CREATE TABLE IF NOT EXISTS usage (task_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, user_name TEXT NOT NULL DEFAULT '',
    conversation_key TEXT NOT NULL DEFAULT '', day TEXT NOT NULL, month TEXT NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL, runs BIGINT NOT NULL DEFAULT 0, input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0, cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_creation_tokens BIGINT NOT NULL DEFAULT 0, cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    model TEXT NOT NULL DEFAULT '', wall_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
    cpu_seconds DOUBLE PRECISION NOT NULL DEFAULT 0, api_calls BIGINT NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS usage_user_day ON usage (user_id, day);
CREATE INDEX IF NOT EXISTS usage_month ON usage (month, user_id);
""",
}
PG_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
PG_MIGRATION_LOCK = 7_316_016  # pg_advisory_xact_lock key: hosts starting together migrate one after another


def newer_than_known(version: int, where: str) -> str:
    """The one-line error for a DB whose schema is newer than this code."""
    return (f"TASK_DB {where} has schema version {version}, newer than this bot's {SCHEMA_VERSION}: "
            "upgrade the bot (or point TASK_DB elsewhere)")
