"""The Stream connections (dingtalk/stream.py) in-process against the stand-in: several sockets, each ACK on its own
socket, a replacement opened before the old socket goes, the old one still read until it is let go."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from config import read_config
from dingtalk.intake import Intake
from dingtalk.stream import StreamConnections
from tests.standin import BOT_TOPIC, DingTalkStandin

CLIENT_ID, CLIENT_SECRET = "test-client-id", "test-client-secret"


class _Running:
    """StreamConnections on an event loop of its own thread; `received` holds what reached the intake."""

    def __init__(self, standin: DingTalkStandin, **settings: object) -> None:
        config, _ = read_config({"DINGTALK_CLIENT_ID": CLIENT_ID, "DINGTALK_CLIENT_SECRET": CLIENT_SECRET,
                                 "DINGTALK_OPENAPI_ENDPOINT": standin.base_url}, dotenv_path=None)
        self.received: list[dict] = []
        self.intake = Intake(self.received.append)
        self.loop = asyncio.new_event_loop()
        self.streams = StreamConnections(config, self.intake, **{"idle_timeout": 30.0, **settings})
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.streams.run(),), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.streams.stop)
        self.thread.join(15)
        assert not self.thread.is_alive()
        self.loop.close()
        self.intake.shutdown()


@pytest.fixture
def standin() -> Iterator[DingTalkStandin]:
    with DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, fire_and_forget=True) as server:
        yield server


@pytest.fixture
def running(standin) -> Iterator[callable]:
    started: list[_Running] = []

    def start(**settings: object) -> _Running:
        started.append(_Running(standin, **settings))
        return started[-1]

    yield start
    for each in started:
        each.stop()


def _live(standin: DingTalkStandin, count: int) -> list[str]:
    return standin.wait_for(lambda: len(standin.live_connections()) == count and standin.live_connections(),
                            message=f"{count} live connections")


def test_each_ack_goes_back_on_the_socket_its_frame_came_in_on(standin, running):
    bot = running(count=3)
    connections = _live(standin, 3)
    standin.wait_for(lambda: bot.streams.live == 3, timeout=10, message="the bot counting 3 live")  # its side lags
    assert bot.streams.wanted == 3
    for connection in connections:
        sent = standin.send_bot_message("hi", connection_id=connection)
        standin.wait_ack(sent.frame_message_id)
        assert standin.ack_connection(sent.frame_message_id) == connection
    standin.wait_for(lambda: len(bot.received) == 3)


def test_a_socket_told_to_leave_is_still_read_until_the_bot_lets_it_go(standin, running):
    bot = running(count=2, drain_seconds=1.5)
    leaving = _live(standin, 2)[0]
    stream = next(s for s in standin._streams if s.connection_id == leaving)
    standin.send_disconnect(close_after=60, connection_id=leaving)  # the gateway would close it ~10 s later
    new = standin.wait_for(lambda: [c for c in standin.live_connections() if c != leaving][1:], timeout=10)
    # A message the gateway had in flight when it said disconnect still arrives, and is taken and ACKed there.
    late = {"msgId": "late-1", "senderStaffId": "u1", "text": {"content": "late"}, "msgtype": "text"}
    frame = standin._send_frame_on(stream, "CALLBACK", BOT_TOPIC, late)
    standin.wait_ack(frame)
    assert standin.ack_connection(frame) == leaving and new
    standin.wait_for(lambda: any(m.get("msgId") == "late-1" for m in bot.received))
    standin.wait_for(lambda: stream.ws.closed, timeout=5, message="the bot closed the old socket")
    standin.wait_for(lambda: bot.streams.live == 2, timeout=10, message="the bot counting 2 live")
    assert standin.open_sockets() == 2


def test_a_silent_socket_is_replaced_before_it_is_let_go(standin, running):
    standin.ping_interval = 0.1  # the live sockets hear pings; the silent one hears nothing
    bot = running(count=1, idle_timeout=0.8, drain_seconds=5.0)
    silent = _live(standin, 1)[0]
    standin.go_silent(silent)
    replacement = standin.wait_for(lambda: [c for c in standin.live_connections() if c != silent], timeout=10)
    assert standin.open_sockets() == 2  # the new socket opened while the silent one was still held
    assert replacement
    # The bot counts the replacement live once its own side has it, a moment after the stand-in does.
    standin.wait_for(lambda: bot.streams.live == 1 and bot.streams.reconnects == 1, timeout=10,
                     message="the bot counting the replacement live")
    standin.wait_for(lambda: standin.open_sockets() == 1, timeout=10, message="the silent socket let go")


def test_a_dropped_connection_reconnects_alone_while_the_other_stays_live(standin, running):
    bot = running(count=2)
    first, second = _live(standin, 2)
    standin.drop_stream()  # the newest
    assert bot.streams.live >= 1
    connections = _live(standin, 2)
    assert first in connections and second not in connections
    standin.wait_for(lambda: bot.streams.reconnects == 1, timeout=10, message="the bot counting the reconnect")
