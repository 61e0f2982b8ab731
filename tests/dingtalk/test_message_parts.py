"""Cutting long answers into parts DingTalk accepts (dingtalk/message_parts.py)."""

from __future__ import annotations

from dingtalk.message_parts import split_message, utf8_json_cost


def test_short_text_is_not_split():
    assert split_message("hello", 100) == ["hello"]


def test_long_text_is_split_in_order_with_markers_and_nothing_lost():
    text = "\n\n".join(f"段落 {i}: " + "字" * 50 for i in range(100))
    parts = split_message(text, 1000)
    assert len(parts) > 1
    assert all(len(p) <= 1000 for p in parts)
    assert parts[0].startswith(f"(1/{len(parts)})\n") and parts[-1].startswith(f"({len(parts)}/{len(parts)})\n")
    rebuilt = "".join(p.split("\n", 1)[1] for p in parts)
    assert rebuilt == text
    assert all(p.rstrip().endswith("字") for p in parts[:-1])  # cut at paragraph ends


def test_split_by_utf8_bytes_never_cuts_a_character():
    text = "汉" * 10000  # 30,000 bytes, one line
    parts = split_message(text, 15000, utf8_json_cost)
    assert all(utf8_json_cost(p) <= 15000 for p in parts)
    assert "".join(p.split("\n", 1)[1] for p in parts) == text


def test_code_fence_cut_across_parts_is_closed_and_reopened():
    code = "\n".join(f"print({i})" for i in range(300))
    text = "intro\n\n```python\n" + code + "\n```\n\nafter"
    parts = split_message(text, 1000)
    assert len(parts) > 2
    for part in parts:
        body = part.split("\n", 1)[1]
        assert body.count("```") % 2 == 0, part  # every part has balanced fences
    assert parts[1].split("\n", 1)[1].startswith("```python\n")
