"""Tests of the test stand-ins: the DingTalk stand-in (with the real SDK) and the fake codebuddy CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.standin import BATCH_SEND_PATH, GROUP_SEND_PATH, WEBHOOK_PATH, DingTalkStandin

FAKE_CLI = Path(__file__).resolve().parents[1] / "fake_codebuddy.py"

SDK_BOT = textwrap.dedent(
    """
    import os
    import dingtalk_stream
    from dingtalk_stream import AckMessage

    class EchoHandler(dingtalk_stream.ChatbotHandler):
        async def process(self, callback):
            message = dingtalk_stream.ChatbotMessage.from_dict(callback.data)
            self.reply_text("echo: " + message.text.content.strip(), message)
            return AckMessage.STATUS_OK, "OK"

    credential = dingtalk_stream.Credential(os.environ["CLIENT_ID"], os.environ["CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, EchoHandler())
    client.start_forever()
    """
)


def local_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: no proxies, localhost only."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", **extra)
    return env


@pytest.fixture
def standin() -> Iterator[DingTalkStandin]:
    with DingTalkStandin(client_id="test-client-id", client_secret="test-client-secret") as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy
    yield session
    session.close()


def token(http: requests.Session, standin: DingTalkStandin) -> str:
    response = http.post(
        standin.base_url + "/v1.0/oauth2/accessToken",
        json={"appKey": "test-client-id", "appSecret": "test-client-secret"},
        timeout=5,
    )
    assert response.status_code == 200
    return response.json()["accessToken"]


def batch_body(users: list[str], content: str = "hi") -> dict[str, object]:
    return {
        "robotCode": "test-client-id",
        "userIds": users,
        "msgKey": "sampleText",
        "msgParam": json.dumps({"content": content}),
    }


# ---------------------------------------------------------------- stream + real SDK


def test_real_sdk_connects_acks_and_replies_through_webhook(standin: DingTalkStandin, tmp_path: Path) -> None:
    log = (tmp_path / "sdk.log").open("w")
    bot = subprocess.Popen(
        [sys.executable, "-c", SDK_BOT],
        env=local_env(
            DINGTALK_OPENAPI_ENDPOINT=standin.base_url, CLIENT_ID="test-client-id", CLIENT_SECRET="test-client-secret"
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        standin.wait_connected(timeout=10)
        assert standin.connections_opened == 1
        opened = [r for r in standin.requests if r.path == "/v1.0/gateway/connections/open"][0]
        assert opened.body["subscriptions"] == [{"type": "CALLBACK", "topic": "/v1.0/im/bot/messages/get"}]

        sent = standin.send_bot_message("hello", sender_staff_id="user1")
        ack = standin.wait_ack(sent.frame_message_id, timeout=5)
        assert ack["code"] == 200
        post = standin.wait_for(lambda: standin.webhook_posts(sent.session), timeout=5)[0]
        assert post.text == "echo: hello"
        assert post.body["at"] == {"atUserIds": ["user1"]}

        group = standin.send_bot_message("hi all", conversation_type="2", sender_staff_id="user2")
        assert group.payload["text"]["content"] == " hi all"
        assert group.payload["conversationId"].startswith("cid")
        standin.wait_for(lambda: standin.webhook_posts(group.session), timeout=5)

        ping = standin.send_ping()
        assert standin.wait_ack(ping, timeout=5)["code"] == 200

        standin.send_disconnect()
        assert not standin.connected
        standin.wait_connected(timeout=8, connects_at_least=2)
        assert standin.connections_opened == 2
        again = standin.send_bot_message("after reconnect")
        standin.wait_ack(again.frame_message_id, timeout=5)
    finally:
        bot.terminate()
        try:
            bot.wait(5)
        except subprocess.TimeoutExpired:
            bot.kill()
            bot.wait(5)
        log.close()


def test_connection_open_rejects_wrong_credentials(standin: DingTalkStandin, http: requests.Session) -> None:
    response = http.post(
        standin.base_url + "/v1.0/gateway/connections/open",
        json={"clientId": "test-client-id", "clientSecret": "wrong", "subscriptions": [], "ua": "", "localIp": ""},
        timeout=5,
    )
    assert response.status_code == 401
    assert response.json()["code"] == "InvalidAuthentication"
    assert standin.connections_opened == 0


def test_websocket_rejects_unknown_ticket_and_accepts_issued_one(
    standin: DingTalkStandin, http: requests.Session
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus):
        connect(standin.base_url.replace("http", "ws") + "/connect?ticket=bogus", proxy=None)
    opened = http.post(
        standin.base_url + "/v1.0/gateway/connections/open",
        json={"clientId": "test-client-id", "clientSecret": "test-client-secret", "subscriptions": []},
        timeout=5,
    ).json()
    with connect(f"{opened['endpoint']}?ticket={opened['ticket']}", proxy=None) as ws:
        standin.wait_connected(timeout=5)
        frame_id = standin.send_ping()
        frame = json.loads(ws.recv(timeout=5))
        assert frame["type"] == "SYSTEM" and frame["headers"]["messageId"] == frame_id
        ws.send(json.dumps({"code": 200, "headers": {"messageId": frame_id}, "message": "OK", "data": "{}"}))
        standin.wait_ack(frame_id, timeout=5)
        standin.drop_stream()
        assert not standin.connected
        with pytest.raises(RuntimeError):
            standin.send_ping()


# ---------------------------------------------------------------- OpenAPI


def test_batch_send_requires_a_valid_token(standin: DingTalkStandin, http: requests.Session) -> None:
    url = standin.base_url + BATCH_SEND_PATH
    missing = http.post(url, json=batch_body(["user1"]), timeout=5)
    assert missing.status_code == 401
    assert missing.json() == {"code": "InvalidAuthentication", "message": "不合法的access_token"}

    headers = {"x-acs-dingtalk-access-token": token(http, standin)}
    ok = http.post(url, json=batch_body(["user1"], "你好"), headers=headers, timeout=5)
    assert ok.status_code == 200
    assert ok.json()["flowControlledStaffIdList"] == [] and ok.json()["processQueryKey"]
    [sent] = standin.batch_sends()
    assert sent.msg_param == {"content": "你好"} and sent.delivered_user_ids == ["user1"]
    assert standin.token_fetches == 1

    too_many = http.post(url, json=batch_body([f"u{i}" for i in range(21)]), headers=headers, timeout=5)
    assert too_many.status_code == 400 and too_many.json()["code"] == "invalidParameter.userIds.overMax"

    standin.invalidate_tokens()
    stale = http.post(url, json=batch_body(["user1"]), headers=headers, timeout=5)
    assert stale.status_code == 401
    assert len(standin.batch_sends()) == 1


def test_access_token_rejects_wrong_secret_and_is_unique(standin: DingTalkStandin, http: requests.Session) -> None:
    bad = http.post(standin.base_url + "/v1.0/oauth2/accessToken", json={"appKey": "test-client-id",
                                                                           "appSecret": "x"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["code"] == "InvalidAuthentication"
    assert token(http, standin) != token(http, standin)
    assert standin.token_fetches == 2


def test_group_send_needs_open_conversation_id(standin: DingTalkStandin, http: requests.Session) -> None:
    url = standin.base_url + GROUP_SEND_PATH
    headers = {"x-acs-dingtalk-access-token": token(http, standin)}
    body = {"robotCode": "test-client-id", "msgKey": "sampleMarkdown",
            "msgParam": json.dumps({"title": "t", "text": "**答**"})}
    assert http.post(url, json=body, headers=headers, timeout=5).status_code == 400
    ok = http.post(url, json={**body, "openConversationId": "cidAB+c/d=="}, headers=headers, timeout=5)
    assert ok.status_code == 200 and set(ok.json()) == {"processQueryKey"}
    [sent] = standin.group_sends()
    assert sent.open_conversation_id == "cidAB+c/d==" and sent.text == "**答**" and sent.title == "t"


def test_fail_next_then_success_and_flow_control(standin: DingTalkStandin, http: requests.Session) -> None:
    url = standin.base_url + BATCH_SEND_PATH
    headers = {"x-acs-dingtalk-access-token": token(http, standin)}
    standin.fail_next(BATCH_SEND_PATH, status=503, headers={"Retry-After": "1"})
    first = http.post(url, json=batch_body(["user1"]), headers=headers, timeout=5)
    assert first.status_code == 503 and first.headers["Retry-After"] == "1"
    assert http.post(url, json=batch_body(["user1"]), headers=headers, timeout=5).status_code == 200
    assert [r.faulted for r in standin.requests if r.path == BATCH_SEND_PATH] == [True, False]

    standin.flow_control_next("user1")
    throttled = http.post(url, json=batch_body(["user1"]), headers=headers, timeout=5)
    assert throttled.status_code == 200 and throttled.json()["flowControlledStaffIdList"] == ["user1"]
    assert len(standin.batch_sends()) == 1


# ---------------------------------------------------------------- session webhook


def test_webhook_answers_300001_when_expired_or_unknown(standin: DingTalkStandin, http: requests.Session) -> None:
    session = standin.add_session()
    body = {"msgtype": "markdown", "markdown": {"title": "答", "text": "**ok**"}}
    assert http.post(standin.webhook_url(session), json=body, timeout=5).json() == {"errcode": 0, "errmsg": "ok"}
    standin.expire_webhook(session)
    for url in (standin.webhook_url(session), standin.webhook_url("never-issued")):
        response = http.post(url, json=body, timeout=5)
        assert response.status_code == 200
        assert response.json() == {"errcode": 300001, "errmsg": "session 不存在"}
    [accepted] = standin.webhook_posts()
    assert accepted.session == session and accepted.text == "**ok**" and accepted.title == "答"


def test_webhook_rejects_too_long_text(standin: DingTalkStandin, http: requests.Session) -> None:
    body = {"msgtype": "text", "text": {"content": "长" * 7000}}  # 21,000 UTF-8 bytes
    response = http.post(standin.webhook_url(standin.add_session()), json=body, timeout=5)
    assert response.json()["errcode"] == 460101


def test_webhook_delay_does_not_block_other_requests(standin: DingTalkStandin, http: requests.Session) -> None:
    slow_session = standin.add_session(delay=3.0)
    body = {"msgtype": "text", "text": {"content": "slow"}}
    with requests.Session() as other, ThreadPoolExecutor(2) as pool:
        other.trust_env = False
        started = time.monotonic()
        slow = pool.submit(http.post, standin.webhook_url(slow_session), json=body, timeout=10)
        standin.wait_for(lambda: standin.in_flight(WEBHOOK_PATH), message="the slow post to be held")
        fast = other.post(standin.webhook_url(standin.add_session()), json=body, timeout=10)
        assert fast.json()["errcode"] == 0 and not slow.done()  # answered while the slow one is still held
        assert slow.result().json()["errcode"] == 0
    assert time.monotonic() - started >= 3.0


def test_wait_for_timeout_lists_recent_requests(standin: DingTalkStandin, http: requests.Session) -> None:
    http.post(standin.base_url + "/nowhere", json={}, timeout=5)
    with pytest.raises(AssertionError, match="/nowhere -> 404"):
        standin.wait_for(lambda: False, timeout=0.1)


# ---------------------------------------------------------------- fake codebuddy CLI


def run_cli(prompt: str, *args: str, home: Path, timeout: float = 10, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKE_CLI), "-p", "--output-format", "stream-json", *args],
        input=prompt,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=local_env(HOME=str(home), **env),
    )


def poll(predicate: Callable[[], object], timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return value


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent or a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_fake_cli_default_answer_and_log(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    result = run_cli("你好", "--model", "m1", "--unknown-flag", home=tmp_path, CODEBUDDY_FAKE_LOG=str(log))
    events = lines(result)
    assert result.returncode == 0
    assert events[0]["type"] == "system" and events[0]["subtype"] == "init"
    assert events[-1]["type"] == "result" and events[-1]["is_error"] is False
    assert events[-1]["result"] == "回答: 你好"
    [entry] = [json.loads(line) for line in log.read_text().splitlines()]
    assert entry["prompt"] == "你好" and "--model" in entry["argv"] and entry["session"] is None
    assert run_cli("", "--version", home=tmp_path).stdout.strip() == "2.163.0 (fake)"


def test_fake_cli_failure_modes(tmp_path: Path) -> None:
    failed = lines(run_cli("x [fail]", home=tmp_path))[-1]
    assert failed["subtype"] == "error_during_execution" and failed["is_error"] is True
    assert failed["errors"] == ["模型调用失败: upstream 500"]

    error = run_cli("x [error]", home=tmp_path)
    assert error.returncode == 0 and [e["type"] for e in lines(error)] == ["error"]

    crash = run_cli("x [crash]", home=tmp_path)
    assert crash.returncode == 3 and "Traceback: boom" in crash.stderr
    assert all(e["type"] != "result" for e in lines(crash))

    noresult = run_cli("x [noresult]", home=tmp_path)
    assert noresult.returncode == 0 and [e["type"] for e in lines(noresult)] == ["system"]


def test_fake_cli_sleep_emits_tool_use_then_result(tmp_path: Path) -> None:
    started = time.monotonic()
    events = lines(run_cli("wait [sleep=0.2]", home=tmp_path))
    assert time.monotonic() - started >= 0.2
    tool = events[1]["message"]["content"][0]
    assert tool["type"] == "tool_use" and tool["name"] == "Bash"
    assert events[-1]["subtype"] == "success"


def test_fake_cli_resume_shares_state_across_calls(tmp_path: Path) -> None:
    args = ("--resume", "conv-1", "--resume-create-missing")
    first = lines(run_cli("第一问", *args, home=tmp_path))[-1]
    second = lines(run_cli("第二问", *args, home=tmp_path))[-1]
    assert first["session_id"] == second["session_id"] == "conv-1"
    assert first["result"].endswith("(turn 1, earlier: none)")
    assert second["result"].endswith("(turn 2, earlier: 第一问)")
    bad = run_cli("x", "--resume", "cid+/==", home=tmp_path)
    assert bad.returncode == 1


def test_fake_cli_big_answer_has_exact_length_and_code_block(tmp_path: Path) -> None:
    text = lines(run_cli("[big=5000]", home=tmp_path))[-1]["result"]
    assert isinstance(text, str) and len(text) == 5000
    assert text.count("```") == 2 and "```python\n" in text
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)


def test_fake_cli_ends_promptly_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(FAKE_CLI), "-p", "--output-format", "stream-json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=local_env(HOME=str(tmp_path)), start_new_session=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write("long [sleep=30]")
    proc.stdin.close()
    assert json.loads(proc.stdout.readline())["subtype"] == "init"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(10)  # it was sleeping 30 s: ending within 10 is ending on the signal, whatever the machine's load


def test_fake_cli_ignore_term_and_spawn_need_group_kill(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    proc = subprocess.Popen(
        [str(FAKE_CLI), "-p", "--output-format", "stream-json"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=local_env(HOME=str(tmp_path), CODEBUDDY_FAKE_PIDS=str(pids)), start_new_session=True,
    )
    assert proc.stdin and proc.stdout
    proc.stdin.write("[spawn] [ignore-term] [sleep=30]")
    proc.stdin.close()
    proc.stdout.readline()
    child = int(str(poll(lambda: pids.exists() and pids.read_text().strip())))
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
    poll(lambda: process_gone(child))
