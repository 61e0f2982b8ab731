"""Scheduled prompts (/every, /schedules): kept in the task DB, each fire run once across restarts and hosts."""
