"""Tests of dingtalk/ and of the DingTalk stand-in the other suites use."""
