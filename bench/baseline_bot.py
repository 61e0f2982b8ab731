#!/usr/bin/env python3
"""The benchmark's baseline: the least a DingTalk bot on the same SDK can do.

The `dingtalk-stream` SDK's own loop and `AsyncChatbotHandler` (ACK at once, `process` on a thread pool of
32, the size of the bot's notice pool); `process` posts one text reply to the message's session webhook and
does nothing else. Settings come from the environment: DINGTALK_CLIENT_ID, DINGTALK_CLIENT_SECRET and
DINGTALK_OPENAPI_ENDPOINT (read by the SDK at import).
"""

from __future__ import annotations

import logging
import os

import dingtalk_stream
import requests
from requests.adapters import HTTPAdapter

POOL_SIZE = 32
REPLY = "收到任务，正在处理中…"

session = requests.Session()
session.trust_env = False
session.mount("http://", HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE))


class ReplyHandler(dingtalk_stream.AsyncChatbotHandler):
    def process(self, callback: dingtalk_stream.CallbackMessage) -> None:
        session.post(callback.data["sessionWebhook"], json={"msgtype": "text", "text": {"content": REPLY}},
                     timeout=(5, 30))


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    credential = dingtalk_stream.Credential(os.environ["DINGTALK_CLIENT_ID"], os.environ["DINGTALK_CLIENT_SECRET"])
    client = dingtalk_stream.DingTalkStreamClient(credential)
    client.register_callback_handler(dingtalk_stream.ChatbotMessage.TOPIC, ReplyHandler(max_workers=POOL_SIZE))
    client.start_forever()


if __name__ == "__main__":
    main()
