"""How a setting's text becomes its value: one parser per kind of setting, each naming the variable in its error,
and the CLI flags CODEBUDDY_EXTRA_ARGS may not carry."""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class ConfigError(ValueError):
    """Settings are missing or invalid: `problems` names each variable (all of them, not only the first);
    `unfilled` the ones that still hold `.env.example`'s example value."""

    def __init__(self, problems: str | Iterable[str], unfilled: Iterable[str] = ()) -> None:
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        self.unfilled = tuple(unfilled)
        super().__init__("; ".join(self.problems))


def _number(name: str, raw: str, kind: type, what: str, zero_allowed: bool) -> float | int:
    """`raw` as `kind` (int or float), above 0 (or 0 or more); ConfigError naming `name` otherwise."""
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got {raw!r}") from None
    if value < 0 or (value == 0 and not zero_allowed):
        raise ConfigError(f"{name} must be {'0 or more' if zero_allowed else 'greater than 0'}, got {raw!r}")
    return value


def positive_float(name: str, raw: str) -> float:
    return _number(name, raw, float, "a number of seconds", zero_allowed=False)


def non_negative_float(name: str, raw: str) -> float:
    return _number(name, raw, float, "a number", zero_allowed=True)


def parse_positive_int(name: str, raw: str) -> int:
    """`raw` as a whole number greater than 0; ConfigError naming `name` otherwise."""
    return int(_number(name, raw, int, "a whole number", zero_allowed=False))


def non_negative_int(name: str, raw: str) -> int:
    return int(_number(name, raw, int, "a whole number", zero_allowed=True))


def time_zone(name: str, raw: str) -> str:
    """`raw` as an IANA time zone name (Asia/Shanghai); ConfigError naming `name` otherwise."""
    try:
        ZoneInfo(raw)
    except (ValueError, ZoneInfoNotFoundError):
        raise ConfigError(f"{name} must be a time zone name such as Asia/Shanghai, got {raw!r}") from None
    return raw


def optional_port(name: str, raw: str) -> int | None:
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a port number, got {raw!r}") from None
    if not 0 <= value <= 65535:
        raise ConfigError(f"{name} must be a port number, got {raw!r}")
    return value


def on_off(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("on", "off"):
        raise ConfigError(f"{name} must be on or off, got {raw!r}")
    return value == "on"


def comma_list(name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def shell_words(name: str, raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(f"{name} cannot be split like a shell command line: {exc}") from None


def log_level_name(name: str, raw: str) -> str:
    level = raw.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"{name} must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got {raw!r}")
    return level


_PERMISSION_MODES = ("acceptEdits", "auto", "bypassPermissions", "default", "dontAsk", "plan")


def permission_mode_name(name: str, raw: str) -> str:
    if raw not in _PERMISSION_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(_PERMISSION_MODES)}, got {raw!r}")
    return raw


def any_text(name: str, raw: str) -> str:
    return raw


MIN_TOKEN_CHARS = 16


def access_token(name: str, raw: str) -> str:
    """A secret given in an HTTP header or URL: empty (off), or 16+ URL-safe characters; the error never quotes it."""
    if raw and (len(raw) < MIN_TOKEN_CHARS or not all(c.isascii() and (c.isalnum() or c in "-._~") for c in raw)):
        raise ConfigError(f"{name} must be at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 - . _ ~ "
                          "(e.g. the output of: python3 -c 'import secrets; print(secrets.token_urlsafe(24))')")
    return raw


_SANDBOXES = ("bwrap", "none")


def sandbox_name(name: str, raw: str) -> str:
    if raw not in _SANDBOXES:
        raise ConfigError(f"{name} must be one of {', '.join(_SANDBOXES)}, got {raw!r}")
    return raw


_EGRESS_MODES = ("public", "model", "off")


def egress_mode(name: str, raw: str) -> str:
    if raw.lower() not in _EGRESS_MODES:
        raise ConfigError(f"{name} must be one of {', '.join(_EGRESS_MODES)}, got {raw!r}")
    return raw.lower()


def absolute_paths(name: str, raw: str) -> tuple[str, ...]:
    paths = comma_list(name, raw)
    for path in paths:
        if not os.path.isabs(path):
            raise ConfigError(f"{name} takes absolute paths, got {path!r}")
    return tuple(os.path.normpath(path) for path in paths)


# CLI flags that would undo the sandbox or take the run out of the bot's hands: (flag, what to use instead).
_RESERVED_CLI_FLAGS = (
    ("--permission-mode", "set CODEBUDDY_PERMISSION_MODE"),
    ("--dangerously-skip-permissions", "set CODEBUDDY_PERMISSION_MODE=bypassPermissions"),
    ("-y", "set CODEBUDDY_PERMISSION_MODE=bypassPermissions"),
    ("--add-dir", "runs see only their conversation's workspace; CODEBUDDY_SANDBOX_PATHS adds read-only paths"),
    ("--resume", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("-r", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("--resume-create-missing", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("--continue", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("-c", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("--session-id", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("--fork-session", "the bot keeps one session per conversation (/new starts a fresh one)"),
    ("--sandbox", "set CODEBUDDY_SANDBOX"),
    ("-p", "the bot runs the CLI with -p itself"),
    ("--print", "the bot runs the CLI with -p itself"),
    ("--output-format", "the bot reads the CLI's stream-json output itself"),
    ("--input-format", "the bot writes the CLI's input itself"),
    ("--replay-user-messages", "the bot asks the CLI to echo its prompts itself"),
    ("--permission-prompt-tool", "the bot answers the CLI's tool requests itself (APPROVALS)"),
)


def _reserved_flag(arg: str) -> tuple[str, str] | None:
    """The reserved flag `arg` is (also as `--flag=value`, `--sandbox…` or in a cluster like `-yp`), if any."""
    for flag, instead in _RESERVED_CLI_FLAGS:
        if arg == flag or arg.startswith(flag + "=") or (flag == "--sandbox" and arg.startswith(flag)):
            return flag, instead
    if len(arg) > 2 and arg[0] == "-" and arg[1] != "-":
        for letter in arg[1:]:
            found = _reserved_flag("-" + letter)
            if found:
                return found
    return None


def cli_args(name: str, raw: str) -> tuple[str, ...]:
    words = shell_words(name, raw)
    for word in words:
        found = _reserved_flag(word)
        if found:
            flag, instead = found
            raise ConfigError(f"{name} must not contain {flag} (it would undo the run's isolation or the bot's "
                              f"control of the run): {instead}")
    return words
