"""The run layer and its terminal: progress display, error detail, Ctrl-C, write errors.

Off a terminal (stdout not a TTY, or the CI environment variable set) Keras'
progress bars become backspace-laden lines in a log, so the stages print one line
per epoch (fit verbose=2) and one per attack (Progbar verbose=2) instead.
No TensorFlow import here: the command line uses it before any stage runs.
"""

import contextlib
import errno
import os
import signal
import sys
import threading

from absl import logging

_debug = False


def interactive(stream=None):
    """True if `stream` (default stdout) is a terminal and CI is not set."""
    stream = sys.stdout if stream is None else stream
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_verbose():
    """Keras' `verbose` for fit and Progbar: 1 (bars) on a terminal, else 2 (one line)."""
    return 1 if interactive() else 2


def set_debug(on):
    """The command line's --debug: errors print their traceback too."""
    global _debug
    _debug = bool(on)


def debug():
    """True with --debug or --verbosity >= 1 (absl's DEBUG)."""
    return _debug or logging.level_debug()


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_failure(e):
    """What a failed write `e` (OSError or tf.errors.OpError) means for the user:
    "no space left on device", "permission denied", or None for anything else."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in _DISK_FULL or "No space left on device" in text or "Disk quota exceeded" in text:
        return "no space left on device"
    if (code in _NOT_WRITABLE or type(e).__name__ == "PermissionDeniedError"
            or "Permission denied" in text or "Read-only file system" in text):
        return "permission denied"
    return None


def how_to_fix(reason, directory):
    """The sentence that tells how to get past a `write_failure` reason."""
    if reason == "no space left on device":
        return (f"Free space on the disk of {directory} (or use a --workdir on another disk), "
                "then run the same command again")
    if reason == "permission denied":
        return (f"Make {directory} writable (or use another --workdir), then run the same "
                "command again")
    return "Fix the cause, then run the same command again"


@contextlib.contextmanager
def sigint_deferred():
    """Holds Ctrl-C (SIGINT) until the block has run, then delivers it (KeyboardInterrupt).

    For writes that must not be cut in two, e.g. an epoch's checkpoint and its
    metrics line. Outside the main thread (where Python cannot handle signals) a
    no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    if previous is None:  # a handler not set from Python: restore the default
        previous = signal.SIG_DFL
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, caught[0])  # the default one raises KeyboardInterrupt
            elif previous == signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGINT)
