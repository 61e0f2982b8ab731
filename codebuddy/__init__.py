"""The CodeBuddy side: which CLI runs, the sandbox around it, and the warm CLI processes."""
