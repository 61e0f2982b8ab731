"""Secret redaction (common/redaction.py)."""

from __future__ import annotations

from common.redaction import dsn_passwords, redact_secrets, replace_secrets_in
from store.postgres import safe_url


def test_redact_secrets_removes_token_like_text():
    text = redact_secrets("auth failed: sk-FAKESECRET1234567890abcdef; token=abcd1234efgh", ["mysecret"])
    assert "FAKESECRET" not in text and "abcd1234efgh" not in text
    assert redact_secrets("call mysecret now", ["mysecret"]) == "call *** now"


def test_every_password_form_of_a_dsn_is_masked_and_listed_as_written_and_decoded():
    cases = {  # DSN → (as safe_url shows it, the passwords it holds)
        "postgresql://u:pa?ss#wd@h:5432/db": ("postgresql://u:***@h:5432/db", ("pa?ss#wd",)),
        "postgresql://u:p%40ss%2Fwd@h/db": ("postgresql://u:***@h/db", ("p%40ss%2Fwd", "p@ss/wd")),
        "postgresql://u:p@ss@h/db": ("postgresql://u:***@h/db", ("p@ss",)),  # a raw "@": libpq misreads it
        "postgresql://u@h/db?sslmode=off&password=qry-pw": ("postgresql://u@h/db?sslmode=off&password=***",
                                                          ("qry-pw",)),
        "postgresql:///db?host=/run/pg&password=a%2Bb+c": ("postgresql:///db?host=/run/pg&password=***",
                                                           ("a%2Bb+c", "a+b+c")),
        "host=h dbname=db password=kv-pw": ("host=h dbname=db password=***", ("kv-pw",)),
        "host=h password = 'a \\'b\\' c' dbname=db": ("host=h password = *** dbname=db",
                                                     ("'a \\'b\\' c'", "'a \\\\'b\\\\' c'", "a 'b' c")),
        "postgres://h:5432/db?application_name=a@b": ("postgres://h:5432/db?application_name=a@b", ()),
        "postgresql://u@h/db": ("postgresql://u@h/db", ()),
        "./data/tasks.db": ("./data/tasks.db", ()),
    }
    for dsn, (masked, passwords) in cases.items():
        assert (safe_url(dsn), dsn_passwords(dsn)) == (masked, passwords), dsn
    # A short password is masked in the DSN but not hunted in free text (every "pw" in every answer would go).
    assert safe_url("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert dsn_passwords("postgresql://u:pw@h") == ()


def test_a_json_body_has_its_secrets_replaced_in_every_string():
    body = {"a": "x s3cret y", "b": ["s3cret", {"c": "s3cret!"}], "n": 3}
    assert replace_secrets_in(body, ("s3cret",)) == {"a": "x *** y", "b": ["***", {"c": "***!"}], "n": 3}
