"""Secret redaction (common/redaction.py)."""

from __future__ import annotations

from common.redaction import redact_secrets


def test_redact_secrets_removes_token_like_text():
    text = redact_secrets("auth failed: sk-FAKESECRET1234567890abcdef; token=abcd1234efgh", ["mysecret"])
    assert "FAKESECRET" not in text and "abcd1234efgh" not in text
    assert redact_secrets("call mysecret now", ["mysecret"]) == "call *** now"
