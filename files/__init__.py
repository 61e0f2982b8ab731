"""Pictures and files both ways: attachments fetched into the workspace, outbox files sent after an answer."""
