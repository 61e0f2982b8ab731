"""Secret redaction, in one place: exact secrets replaced, token-looking strings masked, a secret shown safely, and
the passwords of a PostgreSQL connection string found and masked."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import unquote

# Things that look like credentials in CLI error text: (pattern, replacement keeping any label).
_TOKEN_PATTERNS = (
    (re.compile(r"\b(?:sk|ak|pk)-[A-Za-z0-9_\-]{8,}"), "***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._\-]{8,}"), r"\1***"),
    (re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"',;]{4,}"), r"\1***"),
    (re.compile(r"\b(?=[A-Za-z_\-]*\d)(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}\b"), "***"),
)
# Shorter secrets are not matched in free text: replacing every "pw" in every answer would garble it.
MIN_SECRET_CHARS = 4

_DSN_URL_PREFIXES = ("postgresql://", "postgres://")
# A password as a URL query parameter (libpq splits the query on "&" only: "#" and "?" are part of the value).
_QUERY_PASSWORD = re.compile(r"[?&](?:ssl)?password=([^&]*)", re.IGNORECASE)
# A password in a key=value connection string: quoted ('…', with \' and \\) or up to the next space.
_KEYWORD_PASSWORD = re.compile(r"(?:^|(?<=\s))(?:ssl)?password\s*=\s*('(?:[^'\\]|\\.)*'?|(?:[^\s\\]|\\.)+)",
                               re.IGNORECASE)


def replace_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every exact occurrence of each non-empty secret replaced by `***`."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


def replace_secrets_in(value: Any, secrets: Iterable[str]) -> Any:
    """`value` (text, or JSON-like dicts and lists holding text) with `replace_secrets` applied to every string."""
    if isinstance(value, str):
        return replace_secrets(value, secrets)
    secrets = tuple(secrets)
    if isinstance(value, dict):
        return {key: replace_secrets_in(item, secrets) for key, item in value.items()}
    if isinstance(value, list):
        return [replace_secrets_in(item, secrets) for item in value]
    return value


def redact_secrets(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Replace anything that looks like a token, and each of `extra_secrets`, with `***`."""
    text = replace_secrets(text, (secret for secret in extra_secrets if len(secret) >= MIN_SECRET_CHARS))
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def mask_secret(value: str) -> str:
    """Show a secret as its first two characters and its length, never the rest."""
    if not value:
        return "(unset)"
    return f"{value[:2]}…({len(value)} chars)"


def _password_spans(dsn: str) -> list[tuple[int, int, str]]:
    """(start, end, password) of each password written in a PostgreSQL connection string: a URL's user info, a URL's
    `password=` query parameter, or a key=value string's `password=` (`sslpassword` too), decoded as libpq does."""
    spans = []
    if dsn.startswith(_DSN_URL_PREFIXES):
        start = query_from = dsn.index("://") + 3
        first_at = dsn.find("@", start)
        path = dsn.find("/", start, max(first_at, start))
        if first_at != -1 and not (path != -1 and "?" in dsn[path:first_at]):  # an "@" in the query is no user info
            # libpq ends the user info at the first "@"; the last one before the path also covers a password
            # holding a raw "@" or "/" (libpq would misread that URL, and its error would quote it).
            slash = dsn.find("/", first_at)
            end = dsn.rfind("@", start, len(dsn) if slash == -1 else slash)
            colon = dsn.find(":", start, end)
            if colon != -1:
                spans.append((colon + 1, end, unquote(dsn[colon + 1:end])))
            query_from = end
        spans += [(m.start(1), m.end(1), unquote(m.group(1))) for m in _QUERY_PASSWORD.finditer(dsn, query_from)]
    else:
        for match in _KEYWORD_PASSWORD.finditer(dsn):
            raw = match.group(1)
            quoted = raw[1:-1] if len(raw) > 1 and raw.endswith("'") else raw[1:]
            spans.append((match.start(1), match.end(1), re.sub(r"\\(.)", r"\1", quoted if raw[0] == "'" else raw)))
    return spans


def dsn_passwords(dsn: str) -> tuple[str, ...]:
    """The passwords of a PostgreSQL connection string (URL or key=value), each as written and as decoded, and as
    repr() and JSON would quote those (a password may hold quotes and backslashes), for the bot's list of secrets
    (those shorter than MIN_SECRET_CHARS left out); () when it holds none."""
    found: dict[str, None] = {}
    for start, end, decoded in _password_spans(dsn):
        for form in (dsn[start:end], decoded):
            for shown in (form, repr(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1]):
                if len(shown) >= MIN_SECRET_CHARS:
                    found.setdefault(shown, None)
    return tuple(found)


def mask_dsn_passwords(dsn: str) -> str:
    """`dsn` with every password it holds (URL or key=value, any length) shown as `***`."""
    for start, end, _ in sorted(_password_spans(dsn), reverse=True):
        dsn = dsn[:start] + "***" + dsn[end:]
    return dsn


class RedactedStream:
    """A text stream writing through `replace_secrets`: for command output that quotes settings, paths or tasks
    (`check`, `tasks`). A secret is caught when one write holds it whole, as a print() of a line does."""

    def __init__(self, stream: TextIO, secrets: Iterable[str]) -> None:
        self._stream = stream
        self._secrets = tuple(secret for secret in secrets if secret)

    def write(self, text: str) -> int:
        return self._stream.write(replace_secrets(text, self._secrets))

    def flush(self) -> None:
        self._stream.flush()
