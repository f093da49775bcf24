"""brkeras.nn."""
