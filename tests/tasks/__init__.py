"""Tests of tasks/: the task engine."""
