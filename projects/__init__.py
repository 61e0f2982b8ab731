"""Projects: a chat bound to a real git repository, its changes pushed as a branch by git the workspace never steers."""
