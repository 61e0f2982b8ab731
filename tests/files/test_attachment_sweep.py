"""Old attachments are swept: files past ATTACHMENT_RETENTION_DAYS go, newer ones and anything outside stay, and a
link a run planted in attachments/ is removed as a link, never followed."""

from __future__ import annotations

import os
import time

from codebuddy.sandbox import Workspaces
from files.attachment_sweep import AttachmentSweeper, sweep
from files.attachments import ATTACHMENTS_DIR

DAY = 86400.0


def _attachment(workspaces: Workspaces, conversation: str, name: str, age_days: float, now: float) -> str:
    folder = os.path.join(workspaces.dirs_for(conversation).workspace, ATTACHMENTS_DIR)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "wb") as handle:
        handle.write(b"picture")
    os.utime(path, (now - age_days * DAY, now - age_days * DAY))
    return path


def test_attachments_past_their_days_go_and_the_rest_stay(tmp_path):
    now = time.time()
    workspaces = Workspaces(str(tmp_path / "work"))
    old = _attachment(workspaces, "alice", "old.png", 8, now)
    new = _attachment(workspaces, "alice", "new.png", 1, now)
    other = _attachment(workspaces, "group-1", "old.pdf", 30, now)
    kept_work = os.path.join(workspaces.dirs_for("alice").workspace, "report.md")  # not an attachment
    with open(kept_work, "w") as handle:
        handle.write("work")
    os.utime(kept_work, (now - 90 * DAY, now - 90 * DAY))
    assert sweep(str(tmp_path / "work"), 7 * DAY, now) == 2
    assert not os.path.exists(old) and not os.path.exists(other)
    assert os.path.exists(new) and os.path.exists(kept_work)


def test_a_planted_link_is_removed_and_its_target_stays(tmp_path):
    now = time.time()
    workspaces = Workspaces(str(tmp_path / "work"))
    outside = tmp_path / "bot-secret.txt"
    outside.write_text("secret")
    os.utime(outside, (now - 30 * DAY, now - 30 * DAY))
    folder = os.path.join(workspaces.dirs_for("mallory").workspace, ATTACHMENTS_DIR)
    os.makedirs(folder)
    link = os.path.join(folder, "innocent.png")
    os.symlink(outside, link)
    os.utime(link, (now - 30 * DAY, now - 30 * DAY), follow_symlinks=False)
    # attachments/ itself a link to a directory outside: not entered at all
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "old.bin").write_text("x")
    os.utime(elsewhere / "old.bin", (now - 30 * DAY, now - 30 * DAY))
    victim = workspaces.dirs_for("eve").workspace
    os.symlink(elsewhere, os.path.join(victim, ATTACHMENTS_DIR))
    assert sweep(str(tmp_path / "work"), 7 * DAY, now) == 1
    assert not os.path.lexists(link) and outside.read_text() == "secret" and (elsewhere / "old.bin").exists()


def test_the_sweeper_logs_what_it_removed(tmp_path, caplog):
    now = time.time()
    workspaces = Workspaces(str(tmp_path / "work"))
    _attachment(workspaces, "bob", "old.jpg", 10, now)
    caplog.set_level("INFO", "files")
    sweeper = AttachmentSweeper(str(tmp_path / "work"), 7 * DAY, clock=lambda: now)
    assert sweeper.run_once() == 1 and "清理过期附件: 1 个 (超过 7 天)" in caplog.text
    assert sweeper.run_once() == 0
