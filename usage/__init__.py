"""Who used how much: each run's tokens, cost, CPU time and DingTalk calls recorded per user and day, the quotas on
them, and the chat's /usage."""
