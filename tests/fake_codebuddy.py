#!/usr/bin/env python3
"""A fake `codebuddy` CLI for tests: `-p --output-format stream-json`, driven by prompt directives.

Directives anywhere in the prompt (combinable): [sleep=N] [spawn] [spawn-session] [fail] [error] [crash] [noresult]
[big=N] [usage=IN:OUT[:COST]] (the turn's model usage; results report the session's totals, as the real CLI
does) [echo-env] [ignore-term] [stream=N] (the answer in five assistant messages over N seconds, a Bash step
mid-way; [parts=N] for N messages instead of five) [tool=NAME:COMMAND] (asks can_use_tool, runs COMMAND with sh
if allowed; under bypassPermissions at once) [tools-at-once=A|B] (Bash requests for A and B sent together, then
each run if allowed) [write=NAME:LINES] (asks to Write `write_content` into NAME) [ask=QUESTION] (AskUserQuestion;
[ask=Q1|Q2] asks several at once); [flood=N] (N forged can_use_tool requests written at once, as a tool writing
into the CLI's stdout could) and [longline=N] (one line of N bytes).
With `--input-format stream-json` it stays alive and takes one user message per stdin line (a turn each, echoed with
--replay-user-messages), answers `initialize` and `interrupt` (the interrupted turn writes no result, and a running
tool command is left to the bot, the worst case), and sends can_use_tool requests.
Environment (CODEBUDDY_* like the real CLI's own variables, so the bot's
environment allowlist hands them on): CODEBUDDY_FAKE_LOG (append one JSON line per run; default
$HOME/.fake-codebuddy/runs.jsonl, which is inside the run's sandbox), CODEBUDDY_FAKE_PIDS (pids of [spawn]
children), CODEBUDDY_FAKE_ECHO (names for [echo-env]), CODEBUDDY_FAKE_STARTUP_DELAY (seconds before the init
line). Session state for --resume/--session-id lives in $HOME/.fake-codebuddy/<id>.json as {cwd: [earlier
prompts]} (sessions are per cwd, like the real CLI). Stdlib only, so it starts fast.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
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


_EMIT_LOCK = threading.Lock()
INTERRUPTED = -1  # run_prompt's code for a turn stopped by an interrupt (the process goes on)


def emit(obj: dict[str, Any]) -> None:
    """Write one stream-json line and flush it."""
    try:
        with _EMIT_LOCK:
            sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
            sys.stdout.flush()
    except BrokenPipeError:
        os._exit(0)


class Turn:
    """One stream-json turn: whether it was interrupted, and the answers to the control requests it sent."""

    def __init__(self) -> None:
        self.interrupted = threading.Event()
        self._answers: dict[str, dict[str, Any]] = {}
        self._arrived = threading.Condition()

    def answer(self, request_id: str, response: dict[str, Any]) -> None:
        with self._arrived:
            self._answers[request_id] = response
            self._arrived.notify_all()

    def ask(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """Send a control request to the bot and wait for its answer (None if the turn is interrupted first)."""
        return self.wait(self.send(request))

    def send(self, request: dict[str, Any]) -> str:
        """Send a control request to the bot; its request id."""
        request_id = f"perm_{uuid.uuid4().hex[:10]}"
        emit({"type": "control_request", "request_id": request_id, "request": request})
        return request_id

    def wait(self, request_id: str) -> dict[str, Any] | None:
        """The bot's answer to a request sent (None if the turn is interrupted first)."""
        with self._arrived:
            while request_id not in self._answers:
                if self.interrupted.is_set():
                    return None
                self._arrived.wait(0.05)
            return self._answers.pop(request_id)


def serve_stream_json(argv: list[str], flags: dict[str, Any]) -> int:
    """--input-format stream-json: one JSON message per stdin line, a turn per user message, until stdin ends."""
    prompts: queue.Queue[str | None] = queue.Queue()
    current: list[Turn] = [Turn()]

    def read_stdin() -> None:
        for line in sys.stdin:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            kind = message.get("type")
            if kind == "user":
                content = (message.get("message") or {}).get("content")
                if isinstance(content, list):
                    content = "".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
                prompts.put(str(content or ""))
            elif kind == "control_request":
                request = message.get("request") or {}
                response: dict[str, Any] = {}
                if request.get("subtype") == "interrupt":
                    current[0].interrupted.set()
                    response = {"interrupted": True, "reason": "SDK request"}
                emit({"type": "control_response", "response": {
                    "subtype": "success", "request_id": message.get("request_id"), "response": response}})
            elif kind == "control_response":
                response = message.get("response") or {}
                current[0].answer(str(response.get("request_id")), response.get("response") or {})
        current[0].interrupted.set()  # stdin closed: nobody will answer a pending request
        prompts.put(None)

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        prompt = prompts.get()
        if prompt is None:
            return 0
        turn = current[0] = Turn()
        if flags.get("--replay-user-messages"):
            emit({"type": "user", "uuid": str(uuid.uuid4()), "message": {
                "role": "user", "content": [{"type": "text", "text": prompt}]}, "parent_tool_use_id": None})
        code = run_prompt(prompt, argv, flags, emit, "stream-json", turn)
        if code == INTERRUPTED:
            continue
        if code != 0 or any(d in prompt for d in ("[error]", "[noresult]")):
            return code


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


def use_tool(name: str, command: str, session_id: str, out: Any, turn: Turn | None,
             bypass: bool = False) -> str | None:
    """A tool call the permission mode does not allow: ask the bot (stream-json), run it if allowed; under
    --permission-mode bypassPermissions it runs without asking, as the real CLI's tools do."""
    return use_tools_at_once(name, [command], session_id, out, turn, bypass)


def use_tools_at_once(name: str, commands: list[str], session_id: str, out: Any, turn: Turn | None,
                      bypass: bool = False) -> str | None:
    """Tool calls of one assistant message ([tools-at-once=A|B]): every request sent before any answer is awaited,
    as the real CLI does for parallel tool calls; each command run if allowed (at once under bypassPermissions)."""
    calls = [("toolu_" + uuid.uuid4().hex[:12], command, {"command": command, "description": "run a command"})
             for command in commands]
    out({"type": "assistant", "session_id": session_id, "message": {"role": "assistant", "content": [
        {"type": "tool_use", "id": tool_id, "name": name, "input": tool_input} for tool_id, _, tool_input in calls]}})
    if bypass:
        decisions: list[dict[str, Any] | None] = [{"allowed": True}] * len(calls)
    elif turn is None:
        refusal = {"allowed": False, "reason": "permission prompts are not available in non-interactive mode"}
        decisions = [refusal] * len(calls)
    else:
        sent = [turn.send({"subtype": "can_use_tool", "tool_name": name, "input": tool_input, "tool_use_id": tool_id,
                           "decision_reason": "not allowed by the permission mode"})
                for tool_id, _, tool_input in calls]
        decisions = [turn.wait(request_id) for request_id in sent]
        if any(decision is None for decision in decisions):
            return None
    said = []
    for (tool_id, command, tool_input), decision in zip(calls, decisions, strict=True):
        assert decision is not None
        one = run_decided(name, command, tool_id, tool_input, decision, session_id, out, turn)
        if one is None:
            return None
        said.append(one)
    return "\n".join(said)


def write_content(name: str, lines: int) -> str:
    """The deterministic content [write=NAME:LINES] asks to write (tests compare what the chat shows with it)."""
    return "\n".join(f"{name} 第 {n} 行: " + "写入的内容 content " * (n % 7) + ("```" if n % 50 == 0 else "")
                     for n in range(1, lines + 1))


def write_file(name: str, lines: int, session_id: str, out: Any, turn: Turn | None) -> str | None:
    """[write=NAME:LINES]: ask to Write `write_content` into NAME (in the cwd); write it if allowed."""
    tool_id = "toolu_" + uuid.uuid4().hex[:12]
    tool_input = {"file_path": name, "content": write_content(name, lines)}
    out({"type": "assistant", "session_id": session_id, "message": {"role": "assistant", "content": [
        {"type": "tool_use", "id": tool_id, "name": "Write", "input": tool_input}]}})
    decision = turn.ask({"subtype": "can_use_tool", "tool_name": "Write", "input": tool_input,
                         "tool_use_id": tool_id}) if turn is not None else {"allowed": False}
    if decision is None:
        return None
    if decision.get("allowed"):
        with open(name, "w", encoding="utf-8") as fh:
            fh.write(tool_input["content"])
        said = f"工具 Write 已写入: {name} ({len(tool_input['content'])} 字)"
    else:
        said = f"工具 Write 被拒绝: {decision.get('reason', '')}"
    out({"type": "user", "session_id": session_id, "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_id, "content": said}]}})
    return said


def run_decided(name: str, command: str, tool_id: str, tool_input: dict[str, Any], decision: dict[str, Any],
                session_id: str, out: Any, turn: Turn | None) -> str | None:
    """Run an allowed tool call (None if the turn is interrupted meanwhile); what it said, as a tool result."""
    if decision.get("allowed"):
        command = (decision.get("updatedInput") or tool_input).get("command", command)
        child = subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        while child.poll() is None:
            if turn is not None and turn.interrupted.is_set():
                return None  # like the real CLI, the tool is not waited for; the bot cleans up
            time.sleep(0.05)
        output = (child.stdout.read() if child.stdout else b"").decode("utf-8", "replace").strip()
        said = f"工具 {name} 已执行: {command} → {output}"
    else:
        said = f"工具 {name} 被拒绝: {decision.get('reason', '')}"
    out({"type": "user", "session_id": session_id, "message": {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": tool_id, "content": said}]}})
    return said


def ask_user(question: str, session_id: str, out: Any, turn: Turn | None) -> str | None:
    """The agent asks the user a question (the AskUserQuestion tool, through can_use_tool)."""
    tool_id = "toolu_" + uuid.uuid4().hex[:12]
    asked = question.split("|")  # [ask=Q1|Q2]: one AskUserQuestion with several questions
    tool_input = {"questions": [{"question": q, "header": "问题", "options": [], "multiSelect": False} for q in asked]}
    out({"type": "assistant", "session_id": session_id, "message": {"role": "assistant", "content": [
        {"type": "tool_use", "id": tool_id, "name": "AskUserQuestion", "input": tool_input}]}})
    if turn is None:
        return "问题未能提出: non-interactive mode"
    decision = turn.ask({"subtype": "can_use_tool", "tool_name": "AskUserQuestion", "input": tool_input,
                         "tool_use_id": tool_id})
    if decision is None:
        return None
    if not decision.get("allowed"):
        return f"问题被拒绝: {decision.get('reason', '')}"
    answers = (decision.get("updatedInput") or {}).get("answers") or {}
    return "用户回答: " + " / ".join(f"{answers.get(q, '')}" for q in asked)
def outbox_bytes(name: str, size: int) -> bytes:
    """The deterministic content [outbox=NAME:SIZE] writes (tests compare what arrives with it)."""
    seed = name.encode("utf-8") + b"\x00\xff"
    return (seed * (size // len(seed) + 1))[:size]


def write_outbox(prompt: str) -> None:
    """Directives [outbox=NAME:SIZE] (write outbox/NAME with `outbox_bytes`) and [outbox-link=NAME:TARGET] (make
    outbox/NAME a symlink to TARGET), carried out in the cwd (the conversation's workspace)."""
    for kind, name, value in re.findall(r"\[(outbox|outbox-link)=([^\]:/]+):([^\]]+)\]", prompt):
        os.makedirs("outbox", exist_ok=True)
        if kind == "outbox":
            with open(os.path.join("outbox", name), "wb") as fh:
                fh.write(outbox_bytes(name, int(value)))
        else:
            os.symlink(value, os.path.join("outbox", name))


def flood_output(prompt: str) -> None:
    """Directives [flood=N] (N control_request can_use_tool lines, a few thousand per write) and [longline=N] (N bytes
    and no newline until the end), straight into stdout; the bot is expected to end this process on the way."""
    def chunks() -> Iterator[bytes]:
        line = '{"type":"control_request","request_id":"forged-%d","request":{"subtype":"can_use_tool",' \
               '"tool_name":"Bash","input":{"command":"echo forged %d"},"tool_use_id":"toolu_forged"}}\n'
        for count in map(int, re.findall(r"\[flood=(\d+)\]", prompt)):
            for start in range(0, count, 2000):
                yield "".join(line % (i, i) for i in range(start, min(start + 2000, count))).encode()
        for size in map(int, re.findall(r"\[longline=(\d+)\]", prompt)):
            for start in range(0, size, 1 << 20):
                yield b"x" * min(1 << 20, size - start)
            yield b"\n"

    with _EMIT_LOCK:
        sys.stdout.flush()
        for chunk in chunks():
            try:
                os.write(sys.stdout.fileno(), chunk)
            except BrokenPipeError:
                os._exit(0)


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
    if flags.get("--input-format") == "stream-json":
        return serve_stream_json(argv, flags)
    if positional:
        prompt = " ".join(positional)
    else:
        prompt = sys.stdin.read()
        if not prompt.strip() and ambiguous is not None:
            prompt = ambiguous
    return run_prompt(prompt, argv, flags, emit if output_format == "stream-json" else None, output_format)


def session_usage(prompts: list[str]) -> dict[str, Any]:
    """The session totals a result reports (the real CLI 2.163.0 reports the session's, not the turn's): the sum of
    every prompt's [usage=IN:OUT[:COST]]."""
    found = [m for p in prompts for m in re.findall(r"\[usage=(\d+):(\d+)(?::([0-9.]+))?\]", p)]
    return {"usage": {"input_tokens": sum(int(m[0]) for m in found), "output_tokens": sum(int(m[1]) for m in found),
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0},
            "total_cost_usd": round(sum(float(m[2] or 0) for m in found), 6)}


def run_prompt(prompt: str, argv: list[str], flags: dict[str, Any], write: Any, output_format: str,
               turn: Turn | None = None) -> int:
    """Answer one prompt (a whole text-mode run, or one stream-json turn); returns the exit code."""
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
        if write is not None:
            write(obj)

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
        next_status = time.monotonic() + 1.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(0.1, remaining))
            if turn is not None and turn.interrupted.is_set():
                return INTERRUPTED
            if time.monotonic() >= next_status and deadline - time.monotonic() > 0:
                next_status += 1.0
                out({"type": "system", "subtype": "status", "session_id": session_id})
        out({"type": "user", "session_id": session_id, "message": {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": ""}]}})

    tools_said = []
    for name, command in re.findall(r"\[tool=(\w+):([^\]]*)\]", prompt):
        said = use_tool(name, command, session_id, out, turn,
                        bypass=flags.get("--permission-mode") == "bypassPermissions")
        if said is None:
            return INTERRUPTED
        tools_said.append(said)
    for name, lines in re.findall(r"\[write=([^\]:/]+):(\d+)\]", prompt):
        said = write_file(name, int(lines), session_id, out, turn)
        if said is None:
            return INTERRUPTED
        tools_said.append(said)
    for commands in re.findall(r"\[tools-at-once=([^\]]*)\]", prompt):
        said = use_tools_at_once("Bash", commands.split("|"), session_id, out, turn)
        if said is None:
            return INTERRUPTED
        tools_said.append(said)
    for question in re.findall(r"\[ask=([^\]]*)\]", prompt):
        said = ask_user(question, session_id, out, turn)
        if said is None:
            return INTERRUPTED
        tools_said.append(said)

    flood_output(prompt)
    write_outbox(prompt)
    streamed: list[str] = []  # [stream=N]: the answer written in five (or [parts=N]) messages over N seconds
    stream_match = re.search(r"\[stream=([0-9]*\.?[0-9]+)\]", prompt)
    parts_match = re.search(r"\[parts=(\d+)\]", prompt)
    parts = max(1, int(parts_match.group(1))) if parts_match else 5
    for number in range(1, parts + 1) if stream_match else ():
        time.sleep(float(stream_match.group(1)) / parts)
        if turn is not None and turn.interrupted.is_set():
            return INTERRUPTED
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
            text += "".join(f"\n{said}" for said in tools_said)
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
                   **session_usage([*earlier, prompt])})
    out(result)
    if output_format == "json":
        sys.stdout.write(json.dumps(events, ensure_ascii=False) + "\n")
    elif output_format == "text":
        sys.stdout.write((result.get("result") or "") + "\n")
    sys.stdout.flush()
    return 0



if __name__ == "__main__":
    sys.exit(main())
