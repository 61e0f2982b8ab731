"""The log file: one event per line, whatever text from outside a line quotes."""

from __future__ import annotations

import logging

import pytest

from common.logs import escape_controls, setup_logging


@pytest.fixture
def log_file(tmp_path):
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    path = tmp_path / "bot.log"
    handler = setup_logging(str(path), "INFO")
    yield path
    root.removeHandler(handler)
    handler.close()
    for old in handlers:  # pytest's own capture handlers, as they were
        root.addHandler(old)
    root.setLevel(level)


def test_a_newline_in_a_message_cannot_forge_a_second_line(log_file):
    logging.getLogger("bot").warning("CLI stderr: %s", "a\nFAKE - ERROR - forged")
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1
    assert lines[0].endswith(" - WARNING - CLI stderr: a\\nFAKE - ERROR - forged")


def test_terminal_codes_and_unicode_line_separators_are_escaped(log_file):
    logging.getLogger("bot").info("errmsg=%s", "red\x1b[31m\r\tx\x85y\u2028z\u2029\x00")
    text = log_file.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and "\x1b" not in text
    assert "errmsg=red\\x1b[31m\\r\\tx\\x85y\\u2028z\\u2029\\x00" in text


def test_the_traceback_keeps_its_lines(log_file):
    try:
        raise ValueError("boom\nsecond")
    except ValueError:
        logging.getLogger("bot").exception("任务 %s 失败: unexpected error", "t1\nforged")
    text = log_file.read_text(encoding="utf-8")
    first, *traceback = text.splitlines()
    assert first.endswith("任务 t1\\nforged 失败: unexpected error")
    assert traceback[0] == "Traceback (most recent call last):" and traceback[-1] == "second"


def test_plain_text_is_left_as_it_is():
    text = "创建任务: 3f2a9c1b, 用户: manager123 task=3f2a9c1b user=manager123"
    assert escape_controls(text) is text
