"""Plumbing every floor uses: how the bot logs, supervised threads, setting values and secret redaction."""
