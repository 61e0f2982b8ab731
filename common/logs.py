"""How the bot logs: the line format, the log file, secret redaction, and the ` task=… user=…` context.

Operators grep these lines (docs/operations.md, "Logs"): one event per line, ending with ` task=<id> user=<uid>` when it
is about a task. `TaskLogger` writes that ending, so no call site formats it by hand. `OneLineFormatter` escapes
control characters, so text from outside (CLI stderr, DingTalk errors) can neither split nor forge a line.
"""

from __future__ import annotations

import copy
import logging
import logging.handlers
import os
import queue
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Protocol

from common.redaction import redact_secrets, replace_secrets

log = logging.getLogger("bot")

LOG_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"

# C0 and C1 controls (newlines, ESC, …) and the Unicode line and paragraph separators.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match) -> str:
    char = match.group()
    return _ESCAPES.get(char) or (f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes (`\\n`, `\\x1b`, `\\u2028`): one line, no terminal codes."""
    if not _CONTROL_CHARACTERS.search(text):  # the common case: nothing to do, no new string
        return text
    return _CONTROL_CHARACTERS.sub(_escape, text)


class _HasIds(Protocol):
    id: str
    user_id: str


class TaskLogger(logging.LoggerAdapter):
    """A logger whose every line ends with ` task=<id> user=<uid>` (the id and user as log arguments)."""

    def __init__(self, logger: logging.Logger, task_id: str, user_id: str) -> None:
        super().__init__(logger, {"task": task_id, "user": user_id})

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        # Arguments, not text: an id with a "%" in it must not break the line's formatting.
        extra: MutableMapping[str, Any] = self.extra or {}
        super().log(level, f"{msg} task=%s user=%s", *args, extra["task"], extra["user"], **kwargs)


def task_log(logger: logging.Logger, task: _HasIds) -> TaskLogger:
    """`logger`, with `task`'s id and user at the end of every line."""
    return TaskLogger(logger, task.id, task.user_id)


class RedactingFilter(logging.Filter):
    """Removes the bot's secrets and anything token-like from every log line, its traceback and its stack."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.levelno >= logging.WARNING or record.exc_info:
            cleaned = redact_secrets(message, self._secrets)  # errors may quote text from outside
        else:
            # INFO lines are the bot's own phrases and ids: only the exact secrets are checked (cheap).
            cleaned = replace_secrets(message, self._secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        # The traceback is formatted here, once, so every handler (and the writer thread) writes the redacted one.
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_secrets(record.exc_text, self._secrets)
        if record.stack_info:
            record.stack_info = redact_secrets(record.stack_info, self._secrets)
        return True


class OneLineFormatter(logging.Formatter):
    """The log format, with the message on one line: control characters escaped, the traceback left as it is (but
    for the secrets: a handler without the RedactingFilter still writes none)."""

    def __init__(self, fmt: str | None = None, datefmt: str | None = None, secrets: tuple[str, ...] = ()) -> None:
        super().__init__(fmt, datefmt)
        self._secrets = tuple(s for s in secrets if s)

    def formatException(self, ei: Any) -> str:
        return redact_secrets(super().formatException(ei), self._secrets)

    def formatStack(self, stack_info: str) -> str:
        return redact_secrets(super().formatStack(stack_info), self._secrets)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


class _Enqueue(logging.handlers.QueueHandler):
    """Hands a record to the log writer thread: the message is formatted here (its arguments may change later),
    the traceback is kept apart so the writer's one-line formatter leaves it as it is."""

    def handle(self, record: logging.LogRecord) -> logging.LogRecord | bool:
        # No handler lock: the queue is thread-safe, and callers must never wait for each other here.
        if not self.filter(record):
            return False
        try:
            self.enqueue(self.prepare(record))
        except Exception:
            self.handleError(record)
        return record

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = record.exc_text or _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record


_TRACEBACKS = logging.Formatter()
_writer: logging.handlers.QueueListener | None = None  # the log writer thread, when there is one


def stop_logging() -> None:
    """Write what the log writer thread still holds, then stop it (before the process exits)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


def setup_logging(log_file: str, level: str, secrets: tuple[str, ...] = (), *, echo: bool = False,
                  echo_level: str = "DEBUG", writer_thread: bool = False) -> logging.Handler:
    """Log to `log_file` (WatchedFileHandler, so logrotate works), or to stderr when it is "" or cannot be opened
    (said once). `echo`: lines going to a file also go to stderr (at `echo_level` and up), for a terminal."""
    formatter = OneLineFormatter(LOG_FORMAT, LOG_DATEFMT, secrets)
    fallback_reason = ""
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    if log_file:
        try:
            directory = os.path.dirname(os.path.abspath(log_file))
            os.makedirs(directory, exist_ok=True)
            os.close(os.open(log_file, os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o600))  # a new log is the bot's alone
            handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        except OSError as exc:
            fallback_reason = f"cannot open LOG_FILE {log_file} ({exc.strerror or exc}); logging to stderr"
    handlers = [handler]
    if echo and isinstance(handler, logging.FileHandler):
        handlers.append(logging.StreamHandler(sys.stderr))
        handlers[-1].setLevel(echo_level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    stop_logging()
    for each in handlers:
        each.setFormatter(formatter)
    if writer_thread:
        # The daemon's threads only queue their lines; one thread writes them. Dozens of delivery threads
        # logging through a file handler's lock made the intake thread wait its turn (BENCHMARKS.md).
        global _writer
        queue_handler = _Enqueue(queue.SimpleQueue())
        queue_handler.addFilter(RedactingFilter(secrets))
        _writer = logging.handlers.QueueListener(queue_handler.queue, *handlers, respect_handler_level=True)
        _writer.start()
        root.addHandler(queue_handler)
    else:
        for each in handlers:
            each.addFilter(RedactingFilter(secrets))
            root.addHandler(each)
    root.setLevel(level)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)
    if fallback_reason:
        log.warning(fallback_reason)
    return handler


def output_handlers() -> list[logging.Handler]:
    """The handlers that write the lines (the writer thread's, or the root logger's)."""
    return list(_writer.handlers) if _writer is not None else list(logging.getLogger().handlers)


def log_destination() -> str:
    """Where the log goes now (see `setup_logging`), for the line the bot prints once it has started."""
    handlers = output_handlers()
    files = [h.baseFilename for h in handlers if isinstance(h, logging.FileHandler)]
    if files:
        return f"日志: {files[0]}" + (" (also shown on this terminal)" if len(handlers) > 1 else "")
    return "日志: stderr (LOG_FILE is unset or cannot be opened)"
