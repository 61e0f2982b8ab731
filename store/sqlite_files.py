"""Opening the SQLite task DB file: creating it 0600, migrating its schema, read-only URIs and one-line errors.

`task_store.SQLiteTaskStore` uses these; `ops/doctor.py` uses `store_writable` to see whether the file takes a write.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from urllib.parse import quote

from store.schema import (
    FLAGS,
    SCHEMA_VERSION,
    SQLITE_STEPS,
    SQLITE_VERSION_TABLE,
    TASK_COLUMNS,
    StoreError,
    newer_than_known,
)


def migrate(db: sqlite3.Connection, path: str) -> None:
    """Bring the DB's schema to SCHEMA_VERSION in one transaction (docs: store/schema.py)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(SQLITE_VERSION_TABLE)
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(newer_than_known(version, path))
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in filter(str.strip, SQLITE_STEPS[step].split(";")):
                db.execute(statement)
        present = {row[1] for row in db.execute("PRAGMA table_info(tasks)")}
        for name in TASK_COLUMNS:  # a DB made by an older version gains the columns of newer Task fields
            if name not in present:
                default = " DEFAULT 0" if name in FLAGS else ""
                db.execute(f"ALTER TABLE tasks ADD COLUMN {name}{' INTEGER' if default else ''}{default}")
        db.execute("DELETE FROM schema_version")
        db.execute("INSERT INTO schema_version VALUES (?)", (max(version, SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


def _why(exc: BaseException) -> str:
    """An exception as a few words on one line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def open_error(absolute: str, exc: sqlite3.Error) -> StoreError:
    """The one-line StoreError for a SQLite error met while opening `absolute`."""
    why = _why(exc)
    if "not a database" in why:
        return StoreError(f"TASK_DB {absolute} is not a SQLite database (corrupt?): move it away or point TASK_DB "
                          "elsewhere")
    if "full" in why:
        return StoreError(f"TASK_DB {absolute} cannot be written ({why}): free some space on its disk or point TASK_DB "
                          "elsewhere")
    if "locked" in why or "busy" in why:
        return StoreError(f"TASK_DB {absolute} is held by another process ({why}): stop that process (another bot?) "
                          "or point TASK_DB elsewhere")
    return StoreError(f"TASK_DB {absolute} cannot be opened ({why}): make the file and its directory readable and "
                      "writable for this user, or point TASK_DB elsewhere")


def create_file(absolute: str) -> None:
    """Create the DB file (and its directory), the bot's alone: 0600 (the WAL files follow its mode)."""
    directory = os.path.dirname(absolute)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, FileExistsError) else _why(exc)
        raise StoreError(f"TASK_DB {absolute}: cannot create its directory {directory} ({why}): create it, writable "
                         "for this user, or point TASK_DB elsewhere") from exc
    try:
        os.close(os.open(absolute, os.O_CREAT | os.O_RDWR, 0o600))
    except OSError as exc:
        raise StoreError(f"TASK_DB {absolute} cannot be opened for reading and writing ({_why(exc)}): fix its "
                         "permissions or point TASK_DB elsewhere") from exc


def read_only_uri(absolute: str) -> str:
    # A read-only connection to a WAL database creates -wal and -shm files if they are missing (owned by whoever
    # ran it, possibly root); without them every row is in the main file, which `immutable` reads as it is.
    if os.path.exists(absolute + "-wal") and os.path.exists(absolute + "-shm"):
        return f"file:{quote(absolute)}?mode=ro"
    return f"file:{quote(absolute)}?mode=ro&immutable=1"


def store_writable(path: str, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the SQLite task DB at `path` exists and takes a write lock; (ok, reason when not)."""
    if path == ":memory:":
        return True, ""
    absolute = os.path.abspath(path)
    if not os.path.exists(absolute):
        return False, f"{absolute} does not exist"
    try:
        db = sqlite3.connect(f"file:{quote(absolute)}?mode=rw", uri=True, timeout=timeout, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")  # takes the write lock: fails on a read-only file or directory
            db.execute("ROLLBACK")
        finally:
            db.close()
    except sqlite3.Error as exc:
        return False, f"{absolute}: {exc}"
    return True, ""
