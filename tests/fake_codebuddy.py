#!/usr/bin/env python3
"""A fake `codebuddy` CLI for tests: `-p --output-format stream-json`, driven by prompt directives.

Directives anywhere in the prompt (combinable): [sleep=N] [spawn] [spawn-session] [fail] [error] [crash] [noresult]
[big=N] [echo-env] [ignore-term] [stream=N] (the answer in five assistant messages over N seconds, a Bash step
mid-way). Environment (CODEBUDDY_* like the real CLI's own variables, so the bot's
environment allowlist hands them on): CODEBUDDY_FAKE_LOG (append one JSON line per run; default
$HOME/.fake-codebuddy/runs.jsonl, which is inside the run's sandbox), CODEBUDDY_FAKE_PIDS (pids of [spawn]
children), CODEBUDDY_FAKE_ECHO (names for [echo-env]), CODEBUDDY_FAKE_STARTUP_DELAY (seconds before the init
line). Session state for --resume/--session-id lives in $HOME/.fake-codebuddy/<id>.json as {cwd: [earlier
prompts]} (sessions are per cwd, like the real CLI). Stdlib only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import uuid
from typing import Any

VERSION = "2.163.0 (fake)"
SESSION_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9\-_:]*$")
VALUE_FLAGS = {
    "--output-format", "--input-format", "--model", "--permission-mode", "--resume", "-r",
    "--session-id", "--allowedTools", "--allowed-tools", "--disallowedTools", "--disallowed-tools",
    "--max-turns", "--append-system-prompt", "--system-prompt", "--setting-sources", "--add-dir",
    "--settings", "--mcp-config", "--fallback-model", "--agents", "--permission-prompt-tool",
}
FAIL_ERROR = "模型调用失败: upstream 500"
AUTH_ERROR = "Authentication required: token sk-FAKESECRET1234567890abcdef expired"


def parse_args(argv: list[str]) -> tuple[dict[str, Any], list[str], str | None]:
    """Split argv into flags, positional words, and a trailing word that may be an unknown flag's value."""
    flags: dict[str, Any] = {}
    positional: list[str] = []
    ambiguous = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional.extend(argv[i + 1:])
            break
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.partition("=")
            if eq:
                flags[name] = value
            elif name in VALUE_FLAGS and i + 1 < len(argv):
                flags[name] = argv[i + 1]
                i += 1
            elif name not in VALUE_FLAGS and name.startswith("--") and i + 1 < len(argv) \
                    and not argv[i + 1].startswith("-"):
                # Unknown flag followed by a word: its value, unless it is the last word (maybe the prompt).
                if i + 2 < len(argv):
                    flags[name] = argv[i + 1]
                    i += 1
                else:
                    flags[name] = True
                    ambiguous = argv[i + 1]
                    i += 1
            else:
                flags[name] = True
        else:
            positional.append(arg)
        i += 1
    return flags, positional, ambiguous


def emit(obj: dict[str, Any]) -> None:
    """Write one stream-json line and flush it."""
    try:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        os._exit(0)


def big_text(size: int) -> str:
    """Exactly `size` characters of Chinese/ASCII lines with a large ```python block in the middle."""

    def prose(i: int) -> str:
        return f"第{i}行：这是用于测试长消息分段的中文内容。Line {i}: plain ASCII text for split tests.\n"

    def code(i: int) -> str:
        return f"def func_{i}(x):\n    # 计算第 {i} 步\n    return x * {i} + len('代码{i}')\n\n"

    head, body, tail = [], ["```python\n"], []
    n = 1
    while sum(map(len, head)) < size // 4:
        head.append(prose(n))
        n += 1
    while sum(map(len, head)) + sum(map(len, body)) < size * 3 // 4 - 4:
        body.append(code(n))
        n += 1
    body.append("```\n")
    text = "".join(head) + "".join(body)
    if len(text) > size:  # too small for a closed code block: prose only
        text = ""
        n = 1
    while len(text) + sum(map(len, tail)) < size:
        tail.append(prose(n))
        n += 1
    return (text + "".join(tail))[:size]


def load_state(path: str) -> dict[str, list[str]]:
    """Per-session state: {cwd: [earlier prompts]}."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_state(path: str, state: dict[str, list[str]]) -> None:
    """Write the session state atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, ensure_ascii=False)
    os.replace(tmp, path)


def on_sigterm(signum: int, frame: Any) -> None:
    """The real CLI exits 0 promptly after SIGTERM."""
    os._exit(0)


def main() -> int:
    """Run one fake prompt; returns the exit code."""
    argv = sys.argv[1:]
    if "--version" in argv or "-v" in argv:
        print(VERSION)
        return 0
    signal.signal(signal.SIGTERM, on_sigterm)
    flags, positional, ambiguous = parse_args(argv)
    if not (flags.get("-p") or flags.get("--print")):
        sys.stderr.write("fake codebuddy: only non-interactive mode is supported; pass -p\n")
        return 1
    output_format = flags.get("--output-format", "text")
    if output_format not in ("text", "json", "stream-json"):
        sys.stderr.write(f"error: option '--output-format <format>' argument '{output_format}' is invalid.\n")
        return 1
    if positional:
        prompt = " ".join(positional)
    else:
        prompt = sys.stdin.read()
        if not prompt.strip() and ambiguous is not None:
            prompt = ambiguous
    raw_prompt = prompt
    prompt = prompt.strip()  # answers and session state use the trimmed prompt; the log keeps it raw
    if "[ignore-term]" in prompt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    resume_id = flags.get("--resume") or flags.get("-r") or flags.get("--session-id")
    if resume_id is True:
        resume_id = None
    cwd = os.getcwd()
    log_path = os.environ.get("CODEBUDDY_FAKE_LOG") or os.path.join(
        os.path.expanduser("~"), ".fake-codebuddy", "runs.jsonl")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    entry = {
        "argv": argv, "prompt": raw_prompt, "cwd": cwd, "pid": os.getpid(), "pgid": os.getpgid(0),
        "session": resume_id, "start": time.time(), "run_tag": os.environ.get("CODEBUDDY_BOT_RUN", ""),
        "home": os.path.expanduser("~"),
    }
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    if resume_id is not None and not SESSION_ID_RE.match(resume_id):
        sys.stderr.write(f"error: invalid session id {resume_id!r}: must match {SESSION_ID_RE.pattern}\n")
        return 1
    events: list[dict[str, Any]] = []

    def out(obj: dict[str, Any]) -> None:
        events.append(obj)
        if output_format == "stream-json":
            emit(obj)

    if "[error]" in prompt:
        out({"type": "error", "error": AUTH_ERROR})
        if output_format == "text":
            print(AUTH_ERROR, flush=True)
        return 0

    session_id = resume_id or str(uuid.uuid4())
    earlier: list[str] = []
    if resume_id is not None:
        state_path = os.path.join(os.path.expanduser("~"), ".fake-codebuddy", f"{resume_id}.json")
        state = load_state(state_path)
        if cwd not in state and flags.get("--resume") and not flags.get("--resume-create-missing"):
            out({"type": "error", "error": f"No conversation found with session ID: {resume_id}"})
            return 0
        earlier = list(state.get(cwd, []))
        state[cwd] = earlier + [prompt]
        save_state(state_path, state)

    delay = float(os.environ.get("CODEBUDDY_FAKE_STARTUP_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    started = time.monotonic()
    model = flags.get("--model", "fake-model")
    out({
        "type": "system", "subtype": "init", "session_id": session_id, "cwd": cwd, "model": model,
        "permissionMode": flags.get("--permission-mode", "default"), "tools": ["Bash", "Read", "Edit"],
        "uuid": str(uuid.uuid4()),
    })

    if "[spawn]" in prompt or "[spawn-session]" in prompt:
        import subprocess

        # [spawn]: same process group; [spawn-session]: a session of its own, as the real CLI's Bash tool does.
        # No inherited pipes, like the real CLI's tool children.
        child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session="[spawn-session]" in prompt)
        pids_path = os.environ.get("CODEBUDDY_FAKE_PIDS")
        if pids_path:
            with open(pids_path, "a", encoding="utf-8") as fh:
                fh.write(f"{child.pid}\n")

    sleep_match = re.search(r"\[sleep=([0-9]*\.?[0-9]+)\]", prompt)
    if sleep_match:
        seconds = float(sleep_match.group(1))
        tool_id = "toolu_" + uuid.uuid4().hex[:12]
        out({"type": "assistant", "session_id": session_id, "message": {"role": "assistant", "content": [
            {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": f"sleep {seconds:g}"}}]}})
        deadline = time.monotonic() + seconds
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(1.0, remaining))
            if deadline - time.monotonic() > 0:
                out({"type": "system", "subtype": "status", "session_id": session_id})
        out({"type": "user", "session_id": session_id, "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": ""}]}})

    streamed: list[str] = []  # [stream=N]: the answer written in five assistant messages over N seconds
    stream_match = re.search(r"\[stream=([0-9]*\.?[0-9]+)\]", prompt)
    for number in range(1, 6) if stream_match else ():
        time.sleep(float(stream_match.group(1)) / 5)
        if number == 3:
            step = {"type": "tool_use", "id": f"toolu_{number}", "name": "Bash", "input": {"command": "ls"}}
            out({"type": "assistant", "session_id": session_id, "message": {"role": "assistant", "content": [step]}})
        streamed.append(f"第{number}段: " + prompt.replace("[", "(").replace("]", ")"))
        out({"type": "assistant", "session_id": session_id, "message": {
            "role": "assistant", "content": [{"type": "text", "text": streamed[-1]}]}})

    if "[crash]" in prompt:
        sys.stderr.write("Traceback: boom\n")
        sys.stderr.flush()
        return 3
    if "[noresult]" in prompt:
        return 0

    duration_ms = int((time.monotonic() - started) * 1000)
    if "[fail]" in prompt:
        result = {"type": "result", "subtype": "error_during_execution", "is_error": True, "result": "",
                  "errors": [FAIL_ERROR]}
    else:
        big = re.search(r"\[big=(\d+)\]", prompt)
        if streamed:
            text = "\n\n".join(streamed)
        elif big:
            text = big_text(int(big.group(1)))
        else:
            text = "回答: " + prompt
            if "[echo-env]" in prompt:
                names = [n.strip() for n in os.environ.get("CODEBUDDY_FAKE_ECHO", "").split(",") if n.strip()]
                text += "".join(f"\n{n}={os.environ.get(n, '<unset>')}" for n in names)
            if resume_id is not None:
                previous = earlier[-1] if earlier else "none"
                text += f"\n(turn {len(earlier) + 1}, earlier: {previous})"
        if flags.get("--include-partial-messages"):
            for i in range(0, len(text), 200):
                out({"type": "stream_event", "session_id": session_id, "event": {
                    "type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": text[i:i + 200]}}})
        if not streamed:
            out({"type": "assistant", "session_id": session_id, "message": {
                "role": "assistant", "model": model, "content": [{"type": "text", "text": text}]}})
        result = {"type": "result", "subtype": "success", "is_error": False, "result": text}
    result.update({"session_id": session_id, "duration_ms": duration_ms, "num_turns": 1,
                   "total_cost_usd": 0, "usage": {}})
    out(result)
    if output_format == "json":
        sys.stdout.write(json.dumps(events, ensure_ascii=False) + "\n")
    elif output_format == "text":
        sys.stdout.write((result.get("result") or "") + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
