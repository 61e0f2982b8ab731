"""End to end: the real SDK against the local DingTalk stand-in, the bot as a real subprocess, the fake CLI."""
