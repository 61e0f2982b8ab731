"""End to end: pictures and files both ways — people send them in, CodeBuddy's outbox/ sends them back.

The real SDK over a real websocket to the local DingTalk stand-in (tests/standin_files.py speaks the download,
upload and file-message APIs), `python bot.py` as a subprocess, the fake CLI in its sandbox. One bot serves the
whole module; each test chats as a user of its own.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import pytest

from codebuddy.sandbox import Workspaces
from tests.conftest import CLIENT_ID, CLIENT_SECRET, BotProcess, bot_env, cli_runs
from tests.fake_codebuddy import outbox_bytes
from tests.standin import DingTalkStandin
from tests.standin_files import DOWNLOAD_PATH, UPLOAD_PATH, send_file, send_picture, send_rich_text

pytestmark = pytest.mark.e2e

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
XLSX = b"PK\x03\x04" + os.urandom(50_000)
LIMIT_MB = 1


@pytest.fixture(scope="module")
def files_bot(tmp_path_factory):
    """(stand-in, bot, tmp dir): one bot for the module, attachments capped at 1 MB."""
    tmp_path = tmp_path_factory.mktemp("files")
    (tmp_path / "home").mkdir()
    standin = DingTalkStandin(client_id=CLIENT_ID, client_secret=CLIENT_SECRET).start()
    env = bot_env(standin, tmp_path, tmp_path / "home", DINGTALK_OAPI_ENDPOINT=standin.base_url,
                  MAX_ATTACHMENT_MB=str(LIMIT_MB), USER_RATE_LIMIT="100")
    bot = BotProcess(tmp_path, env).start()
    try:
        standin.wait_connected(timeout=20)
        yield standin, bot, tmp_path
    finally:
        if bot.proc is not None and bot.proc.poll() is None:
            bot.proc.kill()
            bot.proc.wait(timeout=10)
        standin.stop()


def _workspace(tmp_path: Path, sent) -> Path:
    return Path(Workspaces(str(tmp_path / "workspace")).dirs_for(sent.payload["conversationId"]).workspace)


def _texts(standin, sent, count: int, timeout: float = 15.0) -> list[str]:
    posts = standin.wait_for(lambda: len(standin.webhook_posts(sent.session)) >= count
                             and standin.webhook_posts(sent.session), timeout=timeout,
                             message=f"{count} webhook replies")
    return [post.text or "" for post in posts]


def _runs_of(tmp_path: Path, marker: str) -> list[dict]:
    return [run for run in cli_runs(tmp_path) if marker in run["prompt"]]


def _runs_in_conversation(tmp_path: Path, sent) -> list[dict]:
    """The fake CLI's runs in `sent`'s conversation only (other tests' conversations share the bot)."""
    home = Path(Workspaces(str(tmp_path / "workspace")).dirs_for(sent.payload["conversationId"]).home)
    return cli_runs(home)


# ---------------------------------------------------------------- in


def test_a_picture_and_a_file_sent_alone_arrive_byte_identical_and_the_next_prompt_names_them(files_bot):
    standin, bot, tmp_path = files_bot
    picture = send_picture(standin, PNG, sender_staff_id="pic-user")
    assert _texts(standin, picture, 1)[0] == "已收到 图片.png，请告诉我要做什么。"
    document = send_file(standin, XLSX, "../../etc/季度 report.xlsx", sender_staff_id="pic-user")
    assert _texts(standin, document, 1)[0] == "已收到 _.._etc_季度 report.xlsx，请告诉我要做什么。"
    assert _runs_in_conversation(tmp_path, document) == []  # nothing ran yet: they wait for the words

    question = standin.send_bot_message("这两个附件里有什么？", sender_staff_id="pic-user")
    answer = _texts(standin, question, 2)[1]
    run = standin.wait_for(lambda: _runs_of(tmp_path, "这两个附件里有什么？"))[0]
    assert _runs_in_conversation(tmp_path, question) == [run]  # the words started the conversation's first run
    saved = re.findall(r"- (attachments/[\w.-]+) \((图片|文件) ([^,]+), ([^)]+)\)", run["prompt"])
    assert [(kind, name) for _, kind, name, _ in saved] == [("图片", "图片.png"),
                                                           ("文件", "_.._etc_季度 report.xlsx")]
    assert run["prompt"].rstrip().endswith("这两个附件里有什么？") and "回答:" in answer
    workspace = _workspace(tmp_path, question)
    assert (workspace / saved[0][0]).read_bytes() == PNG and saved[0][0].endswith(".png")
    assert (workspace / saved[1][0]).read_bytes() == XLSX and saved[1][0].endswith(".xlsx")
    assert sorted(os.listdir(workspace / "attachments")) == sorted(p.split("/")[1] for p, *_ in saved)
    # Used once: the next prompt carries no attachment.
    again = standin.send_bot_message("再问一次", sender_staff_id="pic-user")
    _texts(standin, again, 2)
    assert "attachments/" not in _runs_of(tmp_path, "再问一次")[0]["prompt"]
    # This test's downloads (found by their codes: other tests share the bot): one per attachment, by
    # downloadCode, never pictureDownloadCode (which DingTalk answers with a 500).
    codes = {sent.payload["content"]["downloadCode"]: sent for sent in (picture, document)}
    downloads = [r for r in standin.requests if r.path == DOWNLOAD_PATH and isinstance(r.body, dict)
                 and r.body.get("downloadCode") in codes.keys() | {picture.payload["content"]["pictureDownloadCode"]}]
    assert sorted(r.body["downloadCode"] for r in downloads) == sorted(codes)
    assert all(r.status == 200 for r in downloads)
    # The download URLs (they grant access) never reach the log in full.
    urls = [r.response["downloadUrl"] for r in downloads]
    assert all(url.split("?")[0] not in bot.log_text() for url in urls)


def test_a_question_sent_while_its_picture_still_downloads_waits_for_it(files_bot):
    standin, bot, tmp_path = files_bot
    picture = send_picture(standin, PNG, delay=1.0, sender_staff_id="quick-user")
    question = standin.send_bot_message("图里是什么？", sender_staff_id="quick-user")
    assert "回答:" in _texts(standin, question, 2)[1]
    assert _texts(standin, picture, 1) == ["已收到 图片.png。"]  # no "tell me what to do": the question came
    runs = _runs_of(tmp_path, "图里是什么？")
    assert len(runs) == 1 and re.search(r"- attachments/[\w.-]+\.png \(图片", runs[0]["prompt"])


def test_rich_text_words_and_picture_make_one_prompt(files_bot):
    standin, bot, tmp_path = files_bot
    sent = send_rich_text(standin, ["看看这个报错截图", PNG, "怎么修？"], sender_staff_id="rich-user")
    texts = _texts(standin, sent, 2)
    assert texts[0].startswith("收到任务") and "回答:" in texts[1]
    runs = _runs_of(tmp_path, "看看这个报错截图")
    assert len(runs) == 1 and "怎么修？" in runs[0]["prompt"]
    path = re.search(r"- (attachments/[\w.-]+\.png) \(图片", runs[0]["prompt"]).group(1)
    assert (_workspace(tmp_path, sent) / path).read_bytes() == PNG


def test_a_file_over_the_limit_is_refused_clearly_and_nothing_is_written(files_bot):
    standin, bot, tmp_path = files_bot
    big = b"x" * (LIMIT_MB * 1024 * 1024 + 1)
    announced = send_file(standin, big, "big.log", sender_staff_id="big-user")
    assert _texts(standin, announced, 1)[0].startswith("附件未能接收:\n- 文件 big.log: big.log 超过 1 MB 上限")
    # No Content-Length: the cap holds while streaming, and the partial file is removed.
    chunked = send_file(standin, big, "stream.log", announce_length=False, sender_staff_id="big-user")
    assert "stream.log: 文件超过 1 MB 上限，未接收" in _texts(standin, chunked, 1)[0]
    attachments = _workspace(tmp_path, chunked) / "attachments"
    assert not attachments.exists() or os.listdir(attachments) == []
    assert not _runs_of(tmp_path, "big.log") and not _runs_of(tmp_path, "stream.log")


def test_an_attachments_symlink_left_by_a_run_is_never_written_through(files_bot):
    standin, bot, tmp_path = files_bot
    first = standin.send_bot_message("你好", sender_staff_id="link-in")
    _texts(standin, first, 2)
    outside = tmp_path / "outside-in"
    outside.mkdir()
    workspace = _workspace(tmp_path, first)
    (workspace / "attachments").symlink_to(outside)  # what a run could leave behind
    sent = send_file(standin, XLSX, "data.xlsx", sender_staff_id="link-in")
    assert "attachments/ 不是目录" in _texts(standin, sent, 1)[0]
    assert os.listdir(outside) == []


# ---------------------------------------------------------------- out


def _file_messages_for(standin, *, user: str | None = None, group: str | None = None):
    return [(record, upload) for record, upload in standin.files.file_messages()
            if (user and record.user_ids == [user]) or (group and record.open_conversation_id == group)]


def test_files_written_to_outbox_reach_a_one_to_one_chat_as_file_and_picture_messages(files_bot):
    standin, bot, tmp_path = files_bot
    sent = standin.send_bot_message("写个报告 [outbox=report.csv:3000] [outbox=chart.png:2000] "
                                    "[outbox=page.html:100]", sender_staff_id="out-user")
    answer = _texts(standin, sent, 2)[1]
    assert "随后发送文件: chart.png (2.0 KB)、page.html.zip" in answer and "report.csv (2.9 KB)" in answer
    messages = standin.wait_for(lambda: len(_file_messages_for(standin, user="out-user")) == 3
                                and _file_messages_for(standin, user="out-user"))
    by_name = {upload.filename: (record, upload) for record, upload in messages}
    record, upload = by_name["report.csv"]
    assert record.msg_key == "sampleFile" and upload.data == outbox_bytes("report.csv", 3000)
    assert record.msg_param == {"mediaId": upload.media_id, "fileName": "report.csv", "fileType": "csv"}
    record, upload = by_name["chart.png"]
    assert record.msg_key == "sampleImageMsg" and upload.type == "image"
    assert upload.data == outbox_bytes("chart.png", 2000)
    record, upload = by_name["page.html.zip"]  # DingTalk refuses .html: sent zipped
    assert record.msg_param["fileType"] == "zip"
    assert zipfile.ZipFile(io.BytesIO(upload.data)).read("page.html") == outbox_bytes("page.html", 100)
    outbox = _workspace(tmp_path, sent) / "outbox"
    bot.wait_log("文件已发送: page.html.zip", count=1)
    standin.wait_for(lambda: len(os.listdir(outbox / "sent")) == 3)
    assert sorted(os.listdir(outbox)) == ["sent"]
    # Only file and picture messages were pushed for this user (its text went by the session webhook).
    assert all(r.msg_key in ("sampleFile", "sampleImageMsg") for r in standin.batch_sends()
               if "out-user" in r.user_ids)
    assert all(upload.media_id not in bot.log_text() for _, upload in messages)  # media ids never logged
    argv = _runs_of(tmp_path, "写个报告")[0]["argv"]  # CodeBuddy was told where to leave files
    assert "outbox/" in argv[argv.index("--append-system-prompt") + 1]


def test_a_file_written_to_outbox_reaches_the_group(files_bot):
    standin, bot, tmp_path = files_bot
    sent = standin.send_bot_message("群里要一个文件 [outbox=minutes.txt:500]", sender_staff_id="grp-user",
                                    conversation_type="2", conversation_id="cidFILES+group/test==")
    assert "随后发送文件: minutes.txt (500 B)" in _texts(standin, sent, 2)[1]
    record, upload = standin.wait_for(lambda: _file_messages_for(standin, group="cidFILES+group/test=="))[0]
    assert record.path.endswith("/groupMessages/send") and record.msg_param["fileName"] == "minutes.txt"
    assert upload.data == outbox_bytes("minutes.txt", 500)


def test_a_symlink_in_outbox_pointing_outside_is_refused_and_nothing_outside_is_uploaded(files_bot):
    standin, bot, tmp_path = files_bot
    secret = tmp_path / "host-secret.txt"
    secret.write_bytes(b"TOP-SECRET-HOST-FILE")
    huge = LIMIT_MB * 1024 * 1024 + 10
    sent = standin.send_bot_message(f"试试 [outbox-link=leak.txt:{secret}] [outbox=ok.txt:10] "
                                    f"[outbox=huge.bin:{huge}]", sender_staff_id="link-out")
    answer = _texts(standin, sent, 2)[1]
    assert "leak.txt 是链接，不是工作目录中的普通文件: 未发送" in answer
    assert "huge.bin 超过 1 MB" in answer and "随后发送文件: ok.txt (10 B)" in answer
    standin.wait_for(lambda: _file_messages_for(standin, user="link-out"))
    bot.wait_log("文件已发送: ok.txt")
    assert all(b"TOP-SECRET" not in upload.data for upload in standin.files.uploads.values())
    assert [upload.filename for _, upload in _file_messages_for(standin, user="link-out")] == ["ok.txt"]
    refused = _workspace(tmp_path, sent) / "outbox" / "refused"
    assert sorted(os.listdir(refused)) == ["huge.bin", "leak.txt"] and (refused / "leak.txt").is_symlink()
    assert secret.read_bytes() == b"TOP-SECRET-HOST-FILE"


def test_an_upload_failure_still_delivers_the_text_answer_once(files_bot):
    standin, bot, tmp_path = files_bot
    standin.fail_next(UPLOAD_PATH, status=503, times=3)
    sent = standin.send_bot_message("生成一个文件 [outbox=fail.txt:20]", sender_staff_id="fail-user")
    texts = _texts(standin, sent, 3, timeout=30)
    assert sum("回答: 生成一个文件" in text for text in texts) == 1
    assert texts[2] == "以下文件未能发送: fail.txt。请稍后再让 CodeBuddy 发送一次。"
    assert not _file_messages_for(standin, user="fail-user")
    bot.wait_log(r"文件发送失败: fail.txt: gave up after 3 attempts")
