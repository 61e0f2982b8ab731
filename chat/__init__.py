"""The chat app: what a message from a person becomes (a command, a refusal or a task), rate limits and the console."""
