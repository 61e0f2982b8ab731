"""How every PostgreSQL connection of the bot is opened: the time limits and TCP keepalives it carries, and a client
that stops waiting for a server that no longer answers.

One place builds the options for the store's pool, the cluster's statement connection (fence, questions, admission)
and its LISTEN connection. The server enforces statement_timeout, lock_timeout and idle_in_transaction_session_timeout;
but a statement that never reached it (a black-holed network) only the client can end: `TimedConnection` gives up
`DB_CLIENT_MARGIN` s after statement_timeout and closes the connection, so no thread of the bot waits for the DB longer
than that. TCP keepalives and tcp_user_timeout let the kernel notice a dead path sooner.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from config import (
    DB_CLIENT_MARGIN,
    DB_CONNECT_TIMEOUT,
    DB_IDLE_IN_TRANSACTION_TIMEOUT,
    DB_KEEPALIVES,
    DB_LOCK_TIMEOUT,
    DB_TCP_USER_TIMEOUT,
)

DEFAULT_STATEMENT_TIMEOUT = 10.0  # DB_STATEMENT_TIMEOUT's default, for tools and tests that have no settings
_WAIT_TIMEOUT = errors._WaitTimeout  # psycopg ≥ 3.2: what Connection.wait(timeout=…) raises when the time is up


class DBTimeout(psycopg.OperationalError):
    """The server did not answer within the client's deadline; the connection is closed."""


class TimedConnection(psycopg.Connection):
    """A psycopg connection whose every wait for the server ends after `deadline` s (a DBTimeout, the connection
    closed): a statement lost on the way never reaches the server's statement_timeout."""

    deadline = DEFAULT_STATEMENT_TIMEOUT + DB_CLIENT_MARGIN  # set per connection by `connection_options`

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is not None:  # psycopg's own bounded waits (notifies): theirs to handle
            return super().wait(gen, interval, timeout)
        try:
            return super().wait(gen, interval, self.deadline)
        except _WAIT_TIMEOUT:
            self.pgconn.finish()  # mid-protocol: the connection cannot be used again (a pool discards it)
            raise DBTimeout(f"no answer from PostgreSQL within {self.deadline:g} s") from None

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> TimedConnection:  # type: ignore[override]
        deadline = kwargs.pop("deadline", None)
        conn = super().connect(conninfo, **kwargs)
        if deadline is not None:
            conn.deadline = deadline
        return conn


def connection_options(*, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT, lock_timeout: float = DB_LOCK_TIMEOUT,
                       connect_timeout: float = DB_CONNECT_TIMEOUT, read_only: bool = False) -> dict[str, Any]:
    """The keyword arguments of `TimedConnection.connect` (or a pool's `kwargs`) for one of the bot's connections."""
    idle, interval, count = DB_KEEPALIVES
    server = {"statement_timeout": statement_timeout, "lock_timeout": lock_timeout,
              "idle_in_transaction_session_timeout": DB_IDLE_IN_TRANSACTION_TIMEOUT}
    options = " ".join(f"-c {name}={int(seconds * 1000)}" for name, seconds in server.items())
    if read_only:
        options += " -c default_transaction_read_only=on"
    return {"options": options, "connect_timeout": max(2, round(connect_timeout)),
            "keepalives": 1, "keepalives_idle": idle, "keepalives_interval": interval, "keepalives_count": count,
            "tcp_user_timeout": int(DB_TCP_USER_TIMEOUT * 1000), "deadline": statement_timeout + DB_CLIENT_MARGIN}


def connect(url: str, *, autocommit: bool = True, **limits: Any) -> TimedConnection:
    """A connection with the bot's time limits (`connection_options(**limits)`); psycopg.Error if it fails."""
    return TimedConnection.connect(url, autocommit=autocommit, **connection_options(**limits))
