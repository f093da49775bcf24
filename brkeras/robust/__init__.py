"""brkeras.robust."""
