"""How a running task's question reads in the chat: a tool request shown whole, as plain text, in pages DingTalk takes.

Every field of the tool's input is shown in full (a Bash command, a Write's path and content, an Edit's old and new
text, anything else as JSON), never cut: each line of a value stands behind "│ " (a longer one goes on behind "┆ "), so
nothing in a value can pass for the bot's own words, and line breaks other than "\\n" and invisible characters (bidi
overrides, zero-width) read as ⟨U+XXXX⟩. The question goes as plain text (nothing in it renders as markdown), split
into pages of PAGE_BYTES, each one message; a request longer than SHOWN_PAGES pages sends those and says, in its last
line, how many more there are and how to read them (「详情 N」, see `detail_page`).
"""

from __future__ import annotations

import json
import re

from codebuddy.warm_sessions import Decision, ToolRequest
from dingtalk.message_parts import split_message, utf8_json_cost
from tasks.task import Task

# One page's text in UTF-8, escaped as in JSON: with the answer line added it stays under a push's 15,000 bytes
# (docs/wire-facts.md §3; the session webhook takes about 20,000), so the sender never cuts a page again.
PAGE_BYTES = 12_000
SHOWN_PAGES = 4  # pages sent with a question; a longer request's other pages are sent on request
WRAP_CHARS = 1_000  # a longer line of a value goes on in pieces (at most 4,000 bytes: a page never cuts one)
DETAIL_WORDS = ("详情", "/detail")
DETAIL_CHARS = 300  # of the one-line summary in the log
CARD_CHARS = 120  # of the one-line summary on an AI card
TOOL_NAME_CHARS = 100
LABELS = {"command": "命令", "file_path": "文件", "notebook_path": "笔记本", "path": "路径", "url": "网址",
          "pattern": "匹配", "query": "查询", "old_string": "原内容", "new_string": "新内容", "replace_all": "全部替换",
          "content": "内容", "new_source": "新内容", "edits": "修改", "prompt": "提示词",
          "description": "说明 (CodeBuddy 自述)"}
_LAST = ("description",)  # the agent's own words about the request, after what it actually asks for
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Characters that would hide or reorder what is shown: controls, line and paragraph separators, bidi controls,
# zero-width and other invisible formatting characters, blank fillers, lone surrogates, tags.
_HIDDEN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160\u180e\u200b-\u200f\u2028-\u202e"
                     r"\u2060-\u2064\u2066-\u206f\u3164\ufeff\uffa0\ufff9-\ufffb\ud800-\udfff\U000e0000-\U000e007f]")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]#|~<>])")  # what makes emphasis, code, links, headings, HTML


def visible(text: str) -> str:
    """`text` with each character that would hide or reorder what is shown as ⟨U+XXXX⟩ ("\\n" and tabs kept)."""
    return _HIDDEN.sub(lambda found: f"⟨U+{ord(found.group()):04X}⟩", text)


def visible_line(text: str) -> str:
    """`visible`, on one line ("\\n" shown as ⟨U+000A⟩ too)."""
    return visible(text).replace("\n", "⟨U+000A⟩")


def escape_markdown(text: str) -> str:
    """`text` shown literally in DingTalk markdown (no links, emphasis, headings or HTML from the agent)."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def shorten(text: str, limit: int = DETAIL_CHARS) -> str:
    """`text` on one line, cut to `limit` characters with "…" (for the log and the card, never the question)."""
    text = " ".join(visible(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def value_lines(value: object) -> list[str]:
    """A field's value, every line of it, each behind "│ " (a long line's further pieces behind "┆ ")."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2)
    lines = []
    for line in text.split("\n"):
        line = visible(line)
        pieces = [line[start:start + WRAP_CHARS] for start in range(0, len(line), WRAP_CHARS)] or [""]
        lines += ["│ " + pieces[0], *("┆ " + piece for piece in pieces[1:])]
    return lines


def field_block(key: str, value: object, label: str = "") -> str:
    """One field of a tool's input: its name (`label`, else a known field's Chinese name; with its size when the value
    is long), then its whole value."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2)
    size = f" ({text.count(chr(10)) + 1} 行, {len(text)} 字)" if "\n" in text or len(text) > 200 else ""
    if label or key in LABELS:
        head = [f"{label or LABELS[key]}{size}:"]
    elif _PLAIN_KEY.fullmatch(key):
        head = [f"字段 {key}{size}:"]
    else:  # a name that could hide something is shown like a value
        head = ["字段 (名称如下):", *value_lines(key), f"该字段的值{size}:"]
    return "\n".join([*head, *value_lines(value)])


def request_detail(request: ToolRequest) -> str:
    """What the tool wants to do, in one short line (the log): the command, the file, or its input."""
    data = request.input
    for key in ("command", "file_path", "path", "url", "pattern", "query", "prompt"):
        if isinstance(data.get(key), str) and data[key].strip():
            return shorten(data[key])
    return shorten(", ".join(f"{k}={v}" for k, v in data.items() if k != "description")) or "(无参数)"


def tool_name(request: ToolRequest) -> str:
    name = visible_line(request.tool_name)
    return name if len(name) <= TOOL_NAME_CHARS else f"{name[:TOOL_NAME_CHARS]}… (工具名共 {len(name)} 字)"


def request_body(task: Task, request: ToolRequest) -> str:
    """The whole question before its answer line: what asks, and everything the request holds."""
    if request.is_question:
        lines = [f"CodeBuddy 有问题问你 (任务 {task.id})", ""]
        for number, question in enumerate(request.questions or [{"question": "?"}], 1):
            first, *more = visible(str(question.get("question"))).split("\n")
            lines += [f"{number}. {first}", *("   ┆ " + line for line in more)]
            options = [visible_line(str(o.get("label"))) for o in question.get("options") or [] if isinstance(o, dict)]
            if options:
                lines[-1] += " (" + " / ".join(options) + ")"
        return "\n".join(lines)
    keys = sorted(request.input, key=lambda key: (key in _LAST, list(LABELS).index(key) if key in LABELS else 99))
    blocks = [field_block(key, request.input[key]) for key in keys] or ["(无参数)"]
    if request.reason:
        blocks.append(field_block("", request.reason, label="CLI 给出的原因"))
    return "\n\n".join([f"CodeBuddy 请求使用工具 {tool_name(request)} (任务 {task.id})", *blocks])


def answer_line(task: Task, request: ToolRequest, timeout: float, remaining: float | None = None) -> str:
    """How to answer, and until when (`remaining`: seconds left of the task's TASK_TIMEOUT, when that comes first)."""
    who = f"@{visible_line(task.user_name)} " if task.user_name else ""
    if remaining is not None and remaining < timeout:
        until = f"任务还剩约 {_duration(max(remaining, 0))}，到时未回复任务将因超时结束。"
    else:
        until = f"{_duration(timeout)}内未回复视为{'不回答' if request.is_question else '拒绝'}。"
    if request.is_question:
        several = "，多个问题请按编号逐行回答 (「1. …」换行「2. …」)" if len(request.questions) > 1 else ""
        return f"{who}请直接回复你的答案{several} (回复「拒绝」则不回答)，{until}"
    return f"{who}回复「同意」允许，回复「拒绝」拒绝 (也可用 /approve、/deny)。{until}"


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} 分钟" if seconds >= 120 else f"{seconds:.0f} 秒"


def question_messages(task: Task, request: ToolRequest, timeout: float,
                      remaining: float | None = None) -> tuple[list[str], list[str]]:
    """(the messages that ask, in order; every page of the request). Up to SHOWN_PAGES pages are sent, the answer
    line after the last; a longer request's last sent page says how many more there are and how to read them."""
    pages = split_message(request_body(task, request), PAGE_BYTES, utf8_json_cost)
    answer = answer_line(task, request, timeout, remaining)
    if len(pages) <= SHOWN_PAGES:
        return [*pages[:-1], f"{pages[-1]}\n\n{answer}"], pages
    rest = SHOWN_PAGES + 1
    note = (f"⚠️ 内容较长，共 {len(pages)} 页，以上是第 1–{SHOWN_PAGES} 页；第 {rest}–{len(pages)} 页没有发送，"
            f"回复「详情 {rest}」查看第 {rest} 页 (依此类推)，看完再决定。")
    return [*pages[:SHOWN_PAGES - 1], f"{pages[SHOWN_PAGES - 1]}\n\n{note}\n{answer}"], pages


def wants_page(text: str) -> bool:
    """Whether `text` asks for a page of the waiting request (「详情 5」, `/detail 5`)."""
    words = text.split()
    return bool(words) and words[0].lower() in DETAIL_WORDS and len(words) <= 2


def detail_page(pages: list[str], text: str) -> str:
    """The page 「详情 N」 asks for (no number: the first one not sent with the question)."""
    words = text.split()
    number = int(words[1]) if len(words) > 1 and words[1].isdigit() else SHOWN_PAGES + 1
    if not 1 <= number <= len(pages):
        return f"没有第 {number} 页，这个请求共 {len(pages)} 页。"
    return f"{pages[number - 1]}\n\n(第 {number} 页，共 {len(pages)} 页；回复「同意」或「拒绝」作答)"


def card_question(request: ToolRequest) -> str:
    """The line a task's AI card shows while the request waits (its buttons answer a tool request)."""
    if request.is_question:
        return "⏸ **CodeBuddy 在等你的回答** (见聊天消息，直接回复即可)"
    summary = escape_markdown(shorten(request_detail(request), CARD_CHARS))
    return (f"⏸ **等待确认: 工具 {escape_markdown(tool_name(request))}** — {summary} (摘要，完整请求见聊天消息)\n\n"
            "点「同意」或「拒绝」，或在聊天中回复")


def card_outcome(request: ToolRequest, decision: Decision | None) -> str:
    """The step a task's AI card keeps once the request was answered, refused or timed out."""
    allowed = decision is not None and decision.allowed
    if request.is_question:
        return f"问题: {'已回答' if allowed else '未回答'}"
    return f"工具 {escape_markdown(tool_name(request))}: {'已同意' if allowed else '已拒绝'}"
