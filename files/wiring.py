"""The wiring of pictures and files both ways, from the settings: the attachment intake and the outbox sender."""

from __future__ import annotations

from collections.abc import Callable

from codebuddy.sandbox import Workspaces
from codebuddy_client import CodeBuddyClient
from common.supervision import Supervisor
from config import Config
from dingtalk_sender import DingTalkSender
from files.attachment_sweep import AttachmentSweeper
from files.attachments import AttachmentFetcher, AttachmentIntake, PendingAttachments
from files.outbox import OutboxClient, OutboxFiles, system_prompt
from tasks.task import Task


def with_file_transfer(config: Config, sender: DingTalkSender, cli: CodeBuddyClient
                       ) -> tuple[OutboxClient, Callable[[Task], object], AttachmentIntake]:
    """`cli` told about outbox/ and wrapped to stage it; the hook that sends the files after an answer; and the
    intake that fetches what people send into each conversation's workspace."""
    workspaces, max_bytes = Workspaces(config.codebuddy_workdir), config.max_attachment_mb * 1024 * 1024
    files = OutboxFiles(sender, workspaces, oapi_endpoint=config.oapi_endpoint, max_bytes=max_bytes,
                        max_files=config.max_files_out, retry_window=config.delivery_retry_window)
    cli.append_system_prompt = system_prompt(config.max_files_out, config.max_attachment_mb)
    intake = AttachmentIntake(AttachmentFetcher(sender, workspaces, config.robot_code, max_bytes=max_bytes),
                              PendingAttachments(workspaces), max_per_message=config.max_attachments_per_message)
    return OutboxClient(cli, files), files.deliver_after, intake


def start_attachment_sweep(config: Config, supervisor: Supervisor) -> AttachmentSweeper:
    """Remove attachments older than ATTACHMENT_RETENTION_DAYS now and every few hours (a supervised thread)."""
    sweeper = AttachmentSweeper(config.codebuddy_workdir, config.attachment_retention_days * 86400)
    supervisor.start("attachment-sweep", sweeper.loop, critical=False)
    return sweeper
