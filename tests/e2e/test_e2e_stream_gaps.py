"""No gap in the Stream, end to end: the real SDK frames, `python bot.py` as a subprocess, and a stand-in that
delivers as DingTalk does (docs/wire-facts.md §8): a message goes to one live connection of the app chosen at
random and is dropped when there is none; a `disconnect` frame is followed by nothing on that connection; a
connection can go silent with its socket open. Each loss test runs with STREAM_CONNECTIONS=1 too and asserts it
loses messages: the proof that the test can fail.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

from ops import doctor
from tests.conftest import CLIENT_ID, CLIENT_SECRET, cli_runs, replies
from tests.conftest import healthz as _healthz
from tests.standin import DingTalkStandin

pytestmark = pytest.mark.e2e

PING_INTERVAL = 0.3  # the stand-in's keepalive pings (DingTalk's: every few seconds to ~30 s)
OPEN_DELAY = 0.3  # seconds the stand-in's connections/open takes: a single connection's gap while replaced
MESSAGE_INTERVAL = 0.2


@pytest.fixture
def standin():
    server = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, fire_and_forget=True,
                             ping_interval=PING_INTERVAL, open_delay=OPEN_DELAY)
    server.start()
    yield server
    server.stop()


class _Sender:
    """A thread that sends `/help` from ten users every MESSAGE_INTERVAL seconds until stopped."""

    def __init__(self, standin: DingTalkStandin) -> None:
        self.standin = standin
        self.sent = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Sender:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        number = 0
        while not self._stop.is_set():
            self.sent.append(self.standin.send_bot_message("/help", sender_staff_id=f"user{number % 10}"))
            number += 1
            self._stop.wait(MESSAGE_INTERVAL)


def _wait_live(standin: DingTalkStandin, count: int, timeout: float = 20.0) -> list[str]:
    return standin.wait_for(lambda: len(standin.live_connections()) >= count and standin.live_connections(),
                            timeout=timeout, message=f"{count} live connection(s)")


def _delivered(standin: DingTalkStandin, sent: list) -> list:
    dropped = {id(message) for message in standin.dropped}
    return [message for message in sent if id(message) not in dropped]


def _each_answered_once(standin: DingTalkStandin, messages: list, timeout: float = 30.0) -> None:
    """Every message got its one reply, and none a second (after a moment for late duplicates)."""
    standin.wait_for(lambda: all(standin.webhook_posts(m.session) for m in messages), timeout=timeout,
                     message=f"a reply to each of {len(messages)} messages")
    time.sleep(1)
    counts = [len(standin.webhook_posts(m.session)) for m in messages]
    assert counts == [1] * len(messages), counts


def _five_disconnects(standin: DingTalkStandin, make_bot, connections: int) -> tuple[list, list]:
    """Five `disconnect` frames while a message comes every 0.2 s; (messages sent, messages dropped)."""
    bot = make_bot(STREAM_CONNECTIONS=str(connections), USER_RATE_LIMIT="100")
    _wait_live(standin, connections)
    with _Sender(standin) as sender:
        time.sleep(0.5)
        for _ in range(5):
            _wait_live(standin, connections)  # DingTalk's disconnects are minutes apart, not a burst
            standin.send_disconnect(close_after=2.0)
            time.sleep(1.0)
        time.sleep(0.5)
    _each_answered_once(standin, _delivered(standin, sender.sent))
    assert bot.proc.poll() is None
    return sender.sent, list(standin.dropped)


def test_five_disconnects_lose_no_message_with_two_connections(standin, make_bot):
    sent, dropped = _five_disconnects(standin, make_bot, connections=2)
    assert len(sent) >= 25 and not dropped, f"{len(dropped)} of {len(sent)} messages found no live connection"


def test_one_connection_loses_messages_across_disconnects(standin, make_bot):
    sent, dropped = _five_disconnects(standin, make_bot, connections=1)
    print(f"\nSTREAM_CONNECTIONS=1: {len(dropped)} of {len(sent)} messages lost over five disconnects")
    assert dropped, "the control must lose messages, or the test above proves nothing"
    assert all(not standin.webhook_posts(m.session) for m in dropped)


def _silent_stop(standin: DingTalkStandin, make_bot, connections: int) -> tuple[object, list, list, str]:
    """One connection goes silent while a message comes every 0.2 s for 3 s (twice the idle timeout)."""
    bot = make_bot(STREAM_CONNECTIONS=str(connections), STREAM_IDLE_TIMEOUT="1.5", USER_RATE_LIMIT="100")
    _wait_live(standin, connections)
    silent = standin.go_silent()
    with _Sender(standin) as sender:
        time.sleep(3.0)
    _each_answered_once(standin, _delivered(standin, sender.sent))
    return bot, sender.sent, list(standin.dropped), silent


def test_a_silent_connection_loses_no_message_with_two_connections(standin, make_bot):
    bot, sent, dropped, silent = _silent_stop(standin, make_bot, connections=2)
    assert len(sent) >= 12 and not dropped, f"{len(dropped)} of {len(sent)} messages found no live connection"
    assert all(m.connection_id != silent for m in sent)  # none went to the silent one: DingTalk sees it gone
    bot.wait_log(r"\[连接 \d\] \d+ 秒没有任何消息，重新连接")  # and the silent one was replaced
    _wait_live(standin, 2)


def test_one_connection_loses_messages_while_silent(standin, make_bot):
    bot, sent, dropped, _ = _silent_stop(standin, make_bot, connections=1)
    print(f"\nSTREAM_CONNECTIONS=1: {len(dropped)} of {len(sent)} messages lost while the connection was silent")
    assert dropped, "the control must lose messages, or the test above proves nothing"
    bot.wait_log("秒没有任何消息，重新连接")


def test_a_message_delivered_on_both_connections_is_answered_once(standin, make_bot, tmp_path):
    bot = make_bot()
    first, second = _wait_live(standin, 2)[:2]
    sent = standin.send_bot_message("两条连接都送到了", sender_staff_id="u1", connection_id=first)
    again = standin.redeliver(sent, connection_id=second)
    assert again.connection_id == second and sent.connection_id == first
    standin.wait_ack(sent.frame_message_id)
    standin.wait_ack(again.frame_message_id)
    assert "回答: 两条连接都送到了" in replies(standin, sent, 2)[1]
    bot.wait_log("重复消息已忽略: msgId=")
    time.sleep(1)
    assert len(standin.webhook_posts(sent.session)) == 2 and len(cli_runs(tmp_path)) == 1


def _status_port(bot) -> int:
    line = bot.wait_log(r"状态服务已启动: http://127\.0\.0\.1:\d+/")[-1]
    return int(re.search(r"127\.0\.0\.1:(\d+)/", line).group(1))


def test_healthz_and_check_show_connections_live_of_wanted_and_the_log_names_each(standin, make_bot):
    bot = make_bot(STATUS_PORT="0")
    port = _status_port(bot)
    _wait_live(standin, 2)
    standin.wait_for(lambda: _healthz(port)[1]["status"] == "ok", message="/healthz ok")
    code, body = _healthz(port)
    assert code == 200 and body["stream_connections"] == {"live": 2, "wanted": 2}, body
    assert "Stream connections 2/2 live" in doctor.check_running_bot(port).detail

    standin.open_delay = 3.0  # replacements take a while: the bot runs on fewer connections meanwhile
    standin.send_disconnect(close_after=5.0)
    code, body = standin.wait_for(lambda: (lambda r: r if r[1]["status"] == "degraded" else None)(_healthz(port)),
                                  message="/healthz degraded")
    assert code == 200 and body["stream_connections"] == {"live": 1, "wanted": 2}, body
    assert "DingTalk Stream: 1 of 2 connections live" in body["reasons"]
    running = doctor.check_running_bot(port)
    assert not running.ok and "Stream connections 1/2 live" in running.detail, running
    standin.send_disconnect(close_after=5.0)
    code, body = standin.wait_for(lambda: (lambda r: r if r[0] == 503 else None)(_healthz(port)),
                                  message="/healthz unhealthy")
    assert body["status"] == "unhealthy" and body["stream_connections"] == {"live": 0, "wanted": 2}, body
    assert "DingTalk Stream not connected" in body["reasons"]

    standin.wait_for(lambda: _healthz(port)[1]["status"] == "ok", timeout=20, message="/healthz ok again")
    # The log names each connection as it opens, is told to leave (both were, one after the other) and is let go.
    log = "\n".join(bot.wait_log(r"钉钉 Stream (已连接|要求断开)", count=6))
    assert sorted(re.findall(r"钉钉 Stream 已连接 \[连接 (\d)\] \(在线 \d/2\)", log)) == ["1", "1", "2", "2"], log
    assert sorted(re.findall(r"钉钉 Stream 要求断开 \[连接 (\d)\]，立即打开新连接", log)) == ["1", "2"], log
    bot.wait_log(r"钉钉 Stream 旧连接已放开 \[连接 \d\] \(网关已关闭", count=2, timeout=10)


def test_sigterm_ends_the_bot_with_sockets_being_let_go(standin, make_bot):
    bot = make_bot(SHUTDOWN_GRACE="1")
    _wait_live(standin, 2)
    standin.open_delay = 5.0
    standin.send_disconnect(close_after=30.0)  # the old socket stays open: the bot closes it on SIGTERM
    bot.wait_log("钉钉 Stream 要求断开")
    started = time.monotonic()
    assert bot.terminate(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert re.search(r"钉钉 Stream 旧连接已放开 \[连接 \d\] \(停止时关闭", bot.log_text()), bot.log_text()[-3000:]
    assert CLIENT_SECRET not in bot.log_text()
