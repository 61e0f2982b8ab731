"""Tests of codebuddy/: the sandbox's parts."""
