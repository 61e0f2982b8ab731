"""Operator tooling: the command line, start-up checks, the doctor, health, metrics, the status server and systemd."""
