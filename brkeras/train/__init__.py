"""brkeras.train."""
