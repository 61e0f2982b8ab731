"""The real CodeBuddy CLI from the wheel against the loopback model server, sandbox escapes included."""
