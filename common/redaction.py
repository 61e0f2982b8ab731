"""Secret redaction, in one place: exact secrets replaced, token-looking strings masked, a secret shown safely."""

from __future__ import annotations

import re
from collections.abc import Iterable

# Things that look like credentials in CLI error text: (pattern, replacement keeping any label).
_TOKEN_PATTERNS = (
    (re.compile(r"\b(?:sk|ak|pk)-[A-Za-z0-9_\-]{8,}"), "***"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._\-]{8,}"), r"\1***"),
    (re.compile(r"(?i)\b((?:api[_-]?key|access[_-]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?)"
                r"[^\s\"',;]{4,}"), r"\1***"),
    (re.compile(r"\b(?=[A-Za-z_\-]*\d)(?=[0-9_\-]*[A-Za-z])[A-Za-z0-9_\-]{32,}\b"), "***"),
)


def replace_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every exact occurrence of each non-empty secret replaced by `***`."""
    for secret in secrets:
        if secret and secret in text:
            text = text.replace(secret, "***")
    return text


def redact_secrets(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Replace anything that looks like a token, and each of `extra_secrets`, with `***`."""
    text = replace_secrets(text, (secret for secret in extra_secrets if len(secret) >= 4))
    for pattern, replacement in _TOKEN_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def mask_secret(value: str) -> str:
    """Show a secret as its first two characters and its length, never the rest."""
    if not value:
        return "(unset)"
    return f"{value[:2]}…({len(value)} chars)"
