"""House checks: the layers, the lint, the README and the settings table stay true."""
