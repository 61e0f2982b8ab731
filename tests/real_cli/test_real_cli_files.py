"""End to end with the REAL CodeBuddy CLI: a picture sent in is readable by the agent, a file it writes goes out.

`python bot.py` runs the real CLI (wheel `codebuddy-agent-sdk`) in its sandbox against tests/fake_model_server.py,
which turns `[bash:…]` and `[write:PATH:BASE64]` in the user's words into real tool calls.
"""

from __future__ import annotations

import base64

import pytest

from tests.conftest import CLI_START_TIMEOUT
from tests.standin_files import send_picture

pytestmark = [pytest.mark.real_cli, pytest.mark.e2e]

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # 2056 bytes


def _posts(standin, session: str, count: int):
    return standin.wait_for(lambda: len(standin.webhook_posts(session)) >= count and standin.webhook_posts(session),
                            timeout=CLI_START_TIMEOUT, message=f"{count} webhook posts")


def test_the_real_cli_reads_a_picture_sent_in_and_sends_back_a_file_it_wrote(standin, real_bot, model_server):
    real_bot(DINGTALK_OAPI_ENDPOINT=standin.base_url)
    picture = send_picture(standin, PNG, sender_staff_id="rc-files")
    assert _posts(standin, picture.session, 1)[0].text == "已收到 图片.png，请告诉我要做什么。"

    report = "第一行\nsecond line\n"
    sent = standin.send_bot_message(f"看看图片大小 [bash:wc -c attachments/*.png] "
                                    f"[write:outbox/report.txt:{base64.b64encode(report.encode()).decode()}]",
                                    sender_staff_id="rc-files")
    answer = _posts(standin, sent.session, 2)[1].text
    query = model_server.chat_requests()[-1].user_queries[-1]
    assert "个附件，已保存在当前工作目录下" in query and "attachments/" in query and "(图片 图片.png, 2.0 KB)" in query
    assert "2056 attachments/" in answer  # the agent's Bash, inside the jail, read the picture
    system = model_server.chat_requests()[-1].messages[0]
    assert "outbox/" in str(system.get("content"))  # told through --append-system-prompt
    assert "随后发送文件: report.txt" in answer
    record, upload = standin.wait_for(lambda: standin.files.file_messages(), timeout=30)[0]
    assert record.user_ids == ["rc-files"] and record.msg_param["fileName"] == "report.txt"
    assert upload.data == report.encode()
