"""Tests of common/: logging and redaction."""
