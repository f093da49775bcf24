"""brkeras.deploy."""
