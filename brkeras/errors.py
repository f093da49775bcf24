"""brkeras's error types: each message says what went wrong and how to fix it."""


class BrkerasError(RuntimeError):
    """Base of the errors the command line reports without a traceback."""


class WorkdirError(BrkerasError):
    """A work dir that cannot be used as asked."""


class DataError(BrkerasError):
    """A data set that cannot be read or prepared."""


class NonFiniteLossError(BrkerasError):
    """The training loss became NaN or Inf."""


class ExportError(BrkerasError):
    """An export that cannot be trusted (weights not exact, parity failed)."""


class ParityError(ExportError):
    """The TFLite model does not compute what the Keras model computes."""
