"""brkeras.quant."""
