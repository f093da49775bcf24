"""brkeras.run."""
