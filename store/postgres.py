"""The PostgreSQL task store backend: the `StoreBackend` methods on a psycopg 3 connection pool, shared by many hosts.

Chosen by `TASK_DB=postgresql://…` (store_journal.open_store). Every bot process on the app opens one; the schema is
created and migrated at start under an advisory lock (hosts starting together migrate one after another). The
differences from SQLite that matter: `remember_message` is answered by the unique key on msg_id (the
JournaledStore asks the DB for it, since another host may have taken the message), and `shared` says so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from common.logs import task_log
from common.redaction import dsn_passwords, mask_dsn_passwords, replace_secrets
from config import DB_CONNECT_TIMEOUT, DEDUP_TTL_SECONDS
from dingtalk.api_budget import day_of
from store.base import task_from_row, task_to_row
from store.pg_connect import DEFAULT_STATEMENT_TIMEOUT, DBTimeout, TimedConnection, connection_options
from store.schema import (
    PG_MIGRATION_LOCK,
    PG_STEPS,
    PG_VERSION_TABLE,
    SCHEMA_VERSION,
    TASK_COLUMNS,
    StoreError,
    newer_than_known,
)
from tasks.task import FINISHED_STATUSES, Task

log = logging.getLogger("task_store")

DB_ERRORS = (psycopg.Error,)  # a DB that is down, slow or refusing: expected, logged without a traceback
URL_PREFIXES = ("postgresql://", "postgres://")
_COLUMNS = ", ".join(TASK_COLUMNS)  # not *: the cluster's columns (host, lease_until) are not Task fields
# A new row belongs to the host that made it, with a lease (cluster/hosts.py renews it); later saves leave both alone.
DB_NOW = "extract(epoch FROM clock_timestamp())"  # the DB's clock: every host's leases are measured by one clock
# A cancel is final, and another host may have asked for it on the row (cluster/hosts.py request_cancel) before the
# holder heard: the holder's later writes never turn it back.
_UPDATED = {c: f"{c} = excluded.{c}" for c in TASK_COLUMNS if c != "id"} | {
    "cancel_requested": "cancel_requested = greatest(tasks.cancel_requested, excluded.cancel_requested)"}
SAVE_TASK = (f"INSERT INTO tasks ({_COLUMNS}, host, lease_until) "
             f"VALUES ({', '.join(f'%({c})s' for c in TASK_COLUMNS)}, "
             f"%(_host)s, CASE WHEN %(_host)s::text IS NULL THEN NULL ELSE {DB_NOW} + %(_lease)s::float8 END) "
             f"ON CONFLICT (id) DO UPDATE SET {', '.join(_UPDATED.values())} "
             "WHERE tasks.created_at IS NOT DISTINCT FROM excluded.created_at "
             # A host writes only the tasks it holds: once another took one over, the old host's late writes
             # (a run it finished while cut off from the DB) do not overwrite the taker's (cluster/fence.py).
             "AND (excluded.host IS NULL OR tasks.host IS NULL OR tasks.host = excluded.host)")


class StoreUnreachable(StoreError):
    """The server did not answer, or refused the connection: a later try may succeed (start-up waits and retries)."""


_CONNINFO_KEYS = {"host", "hostaddr", "port", "dbname", "user", "password", "service", "sslmode"}


def is_postgres_url(task_db: str) -> bool:
    """Whether TASK_DB names a PostgreSQL database (a postgresql:// URL, or libpq's `key=value …` form naming at
    least a host, database, user or service) rather than a SQLite file."""
    if task_db.startswith(URL_PREFIXES):
        return True
    if "=" not in task_db:
        return False
    try:
        keys = set(psycopg.conninfo.conninfo_to_dict(task_db))
    except psycopg.Error:
        return False
    return bool(keys & _CONNINFO_KEYS)


def safe_url(url: str) -> str:
    """The URL (or key=value DSN) with every password in it shown as ***: in the user info, a `password=` query
    parameter or a `password=` key, percent-encoded or not, holding `?`, `#` or `@` or not. For log lines, errors,
    `check` and `tasks`."""
    return mask_dsn_passwords(url)


class PostgresTaskStore:
    """The store backend on PostgreSQL: a small connection pool; the writes inside `transaction()` share one.

    `busy_timeout` bounds how long a statement waits for a row or table lock another session holds (lock_timeout),
    and how long a call waits for a pooled connection; `statement_timeout` how long one statement may run (and, with
    a margin, how long the client waits for any answer: store/pg_connect.py). `read_only=True` (`bot.py tasks`)
    creates and writes nothing. Raises StoreUnreachable when the DB cannot be reached (or stops answering) and
    StoreError when a retry cannot help (its schema is newer than this code, a bad URL): one line, no password.
    """

    shared = True  # several hosts write it: dedup must ask the DB's unique key, not memory

    def __init__(self, url: str, *, read_only: bool = False, busy_timeout: float = 10.0, pool_size: int = 4,
                 connect_timeout: float = DB_CONNECT_TIMEOUT, dedup_ttl: float = DEDUP_TTL_SECONDS, host: str = "",
                 lease_seconds: float = 30.0, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> None:
        self.path = safe_url(url)
        self._owner = {"_host": host or None, "_lease": lease_seconds}  # "" (tools, tests): rows no host leases
        self._dedup_ttl = dedup_ttl
        self.read_only = read_only
        self._local = threading.local()  # the connection of the transaction() this thread is inside
        options = {**connection_options(statement_timeout=statement_timeout, lock_timeout=busy_timeout,
                                        connect_timeout=connect_timeout, read_only=read_only), "row_factory": dict_row}
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=max(busy_timeout, 1.0), open=False,
                                    connection_class=TimedConnection, kwargs=options, name="task-store")
        try:
            with TimedConnection.connect(url, **options) as conn:  # its own error, not the pool's "incomplete"
                self._prepare(conn)
            self._pool.open(wait=True, timeout=connect_timeout)
        except StoreError:
            self._pool.close()
            raise
        except Exception as exc:
            self._pool.close()
            # libpq quotes a connection string it cannot parse: the password must not ride along.
            why = replace_secrets(" ".join(str(exc).split()), dsn_passwords(url)) or type(exc).__name__
            # Not reached, refused or timed out (the server down, the network, a password or database the DBA may
            # still fix): worth another try. Anything else (a URL libpq cannot parse) is for the operator.
            error = StoreUnreachable if isinstance(exc, psycopg.OperationalError) else StoreError
            raise error(f"TASK_DB {self.path} cannot be opened ({why}): start PostgreSQL, check the URL, the "
                        "user's password and that the database exists, or point TASK_DB elsewhere") from exc

    def _prepare(self, conn: psycopg.Connection) -> None:
        if self.read_only:
            if conn.execute("SELECT to_regclass('tasks') AS t").fetchone()["t"] is None:
                raise StoreError(f"TASK_DB {self.path} has no tasks table: it is not the bot's task DB")
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
        conn.execute(PG_VERSION_TABLE)
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        version = row["version"] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(newer_than_known(version, self.path))
        for step in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute(PG_STEPS[step])
        if version < SCHEMA_VERSION:
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
            log.info("任务数据库结构已升级: %d → %d", version, SCHEMA_VERSION)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """The connection of this thread's open transaction(), else a pooled one committed on leaving."""
        bound = getattr(self._local, "conn", None)
        if bound is not None:
            yield bound
            return
        try:
            with self._pool.connection() as conn:
                yield conn
        except DBTimeout:
            self._pool.drain()  # the path to the server died: the idle connections most likely with it
            raise

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The writes made inside (by this thread) are committed together, or not at all if one raises."""
        if self.read_only:
            raise StoreError(f"TASK_DB {self.path} is open read-only")
        with self.connection() as conn:
            self._local.conn = conn
            try:
                yield
            finally:
                self._local.conn = None

    def _query(self, sql: str, args: tuple | dict = ()) -> list[dict]:
        with self.connection() as conn:
            return conn.execute(sql, args).fetchall()

    def _write(self, sql: str, args: tuple | dict = ()) -> int:
        if self.read_only:
            raise StoreError(f"TASK_DB {self.path} is open read-only")
        with self.connection() as conn:
            return conn.execute(sql, args).rowcount

    def save(self, task: Task) -> None:
        """Insert the task's row, or update it if it exists. Never overwrites another task's row."""
        if not self._write(SAVE_TASK, {**task_to_row(task), **self._owner}):
            holder = self._query("SELECT host FROM tasks WHERE id = %s", (task.id,))
            if holder and holder[0]["host"] not in (None, self._owner["_host"]):
                task_log(log, task).warning("任务 %s 已由主机 %s 接管，本主机的状态更新未写入", task.id,
                                            holder[0]["host"])
            else:
                task_log(log, task).error("任务ID冲突，数据库中已有另一任务 %s，未覆盖", task.id)

    def get(self, task_id: str) -> Task | None:
        rows = self._query(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s", (task_id,))
        return task_from_row(rows[0]) if rows else None

    def load(self, statuses: Iterable[str] | None = None, undelivered_only: bool = False) -> list[Task]:
        sql, args = f"SELECT {_COLUMNS} FROM tasks WHERE true", []
        if statuses is not None:
            sql += " AND status = ANY(%s)"
            args.append(list(statuses))
        if undelivered_only:
            sql += " AND delivered = 0"
        return [task_from_row(r) for r in self._query(sql + " ORDER BY created_at", tuple(args))]

    def recent_for_user(self, user_id: str | None, limit: int) -> list[Task]:
        if user_id is None:
            rows = self._query(f"SELECT {_COLUMNS} FROM tasks ORDER BY created_at DESC LIMIT %s", (limit,))
        else:
            rows = self._query(f"SELECT {_COLUMNS} FROM tasks WHERE user_id = %s ORDER BY created_at DESC LIMIT %s",
                               (user_id, limit))
        return [task_from_row(r) for r in rows]

    def recent_messages(self, since: float) -> dict[str, float]:
        """msgIds seen since `since`, with when."""
        rows = self._query("SELECT msg_id, seen_at FROM seen_messages WHERE seen_at >= %s", (since,))
        return {r["msg_id"]: r["seen_at"] for r in rows}

    def count(self, user_id: str | None = None, status: str | None = None) -> int:
        """How many tasks there are, of one user and/or status."""
        sql, args = "SELECT COUNT(*) AS n FROM tasks WHERE true", []
        for column, value in (("user_id", user_id), ("status", status)):
            if value is not None:
                sql += f" AND {column} = %s"
                args.append(value)
        return int(self._query(sql, tuple(args))[0]["n"])

    def remember_message(self, msg_id: str, now: float) -> bool:
        """Record a msgId; False if any host recorded it within the dedup window (one statement on the primary key:
        of two hosts inserting it at once, exactly one gets True)."""
        return self._write("INSERT INTO seen_messages (msg_id, seen_at) VALUES (%s, %s) ON CONFLICT (msg_id) "
                           "DO UPDATE SET seen_at = excluded.seen_at WHERE seen_messages.seen_at < %s",
                           (msg_id, now, now - self._dedup_ttl)) == 1

    def record_duration(self, user_id: str, keyword: str, seconds: float, now: float) -> None:
        self._write("INSERT INTO durations (user_id, keyword, seconds, finished_at) VALUES (%s, %s, %s, %s)",
                    (user_id, keyword, seconds, now))

    def durations(self, keyword: str, user_id: str | None = None, limit: int = 50) -> list[float]:
        if user_id is None:
            rows = self._query("SELECT seconds FROM durations WHERE keyword = %s ORDER BY finished_at DESC, seq DESC "
                               "LIMIT %s", (keyword, limit))
        else:
            rows = self._query("SELECT seconds FROM durations WHERE keyword = %s AND user_id = %s "
                               "ORDER BY finished_at DESC, seq DESC LIMIT %s", (keyword, user_id, limit))
        return [r["seconds"] for r in rows]

    def session_for(self, conversation_key: str) -> str | None:
        rows = self._query("SELECT session_id FROM sessions WHERE conversation_key = %s", (conversation_key,))
        return rows[0]["session_id"] if rows else None

    def set_session(self, conversation_key: str, session_id: str) -> None:
        self._write("INSERT INTO sessions VALUES (%s, %s) ON CONFLICT (conversation_key) "
                    "DO UPDATE SET session_id = excluded.session_id", (conversation_key, session_id))

    def add_api_calls(self, month: str, count: int, kind: str = "", day: str = "", user_id: str = "") -> None:
        """Add `count` calls to the org's counter for the month, and to the kind's and the user's day's when given
        (one statement each: no host's add is lost; the journal writes them in one transaction)."""
        self._write("INSERT INTO api_calls (month, calls) VALUES (%s, %s) "
                    "ON CONFLICT (month) DO UPDATE SET calls = api_calls.calls + excluded.calls", (month, count))
        if kind:
            self._write("INSERT INTO api_calls_by_kind (month, kind, calls) VALUES (%s, %s, %s) ON CONFLICT "
                        "(month, kind) DO UPDATE SET calls = api_calls_by_kind.calls + excluded.calls",
                        (month, kind, count))
        if day and user_id:
            self._write("INSERT INTO user_api_calls (day, user_id, calls) VALUES (%s, %s, %s) ON CONFLICT "
                        "(day, user_id) DO UPDATE SET calls = user_api_calls.calls + excluded.calls",
                        (day, user_id, count))

    def api_calls(self, month: str) -> int:
        rows = self._query("SELECT calls FROM api_calls WHERE month = %s", (month,))
        return int(rows[0]["calls"]) if rows else 0

    def api_calls_by_kind(self, month: str) -> dict[str, int]:
        rows = self._query("SELECT kind, calls FROM api_calls_by_kind WHERE month = %s", (month,))
        return {str(r["kind"]): int(r["calls"]) for r in rows}

    def user_api_calls(self, day: str, user_id: str) -> int:
        rows = self._query("SELECT calls FROM user_api_calls WHERE day = %s AND user_id = %s", (day, user_id))
        return int(rows[0]["calls"]) if rows else 0

    def purge(self, finished_before: float, seen_before: float) -> int:
        with self.connection() as conn:
            purged = conn.execute("DELETE FROM tasks WHERE (delivered = 1 OR undeliverable = 1) AND finished_at < %s "
                                  "AND status = ANY(%s)", (finished_before, list(FINISHED_STATUSES))).rowcount
            conn.execute("DELETE FROM seen_messages WHERE seen_at < %s", (seen_before,))
            conn.execute("DELETE FROM durations WHERE finished_at < %s", (finished_before,))
            conn.execute("DELETE FROM user_api_calls WHERE day < %s", (day_of(finished_before),))
        return purged

    def schema_version(self) -> int:
        """The schema version the DB is at (0: no version table)."""
        if self._query("SELECT to_regclass('schema_version') AS t")[0]["t"] is None:
            return 0
        return int(self._query("SELECT version FROM schema_version")[0]["version"])

    def db_time(self) -> float:
        """The DB server's clock (epoch seconds): leases are compared with it, so `check` measures the skew."""
        return float(self._query("SELECT extract(epoch FROM clock_timestamp()) AS now")[0]["now"])

    def close(self) -> None:
        self._pool.close()
