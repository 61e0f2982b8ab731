"""Tests of ops/: the doctor, the task table, store admin, metrics, health and the systemd unit."""
