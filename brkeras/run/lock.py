"""One writer per work dir: an OS lock (fcntl.flock) on DIR/.lock, held for a whole stage.

Every stage that writes a work dir holds `hold(workdir, stage)` (train, evaluate,
export, benchmark; the pipeline holds its pipeline dir, and each of its stages
then its model dir). A second writer fails at once with `WorkdirBusyError`,
naming the holder: its PID, host, command line and start time, which the holder
writes into the lock file. The lock is the kernel's, so it dies with its process
(kill -9 and power loss included): a lock file left behind never blocks anyone.
Readers (summary, load) take no lock.

The lock file exists while it is held: the holder removes it (still locked) at
the end, so a work dir holds no extra file between stages. A process that locks
a file just removed (it opened it before the removal) sees that the path is no
longer its file and tries again. flock locks belong to an open file description,
so a second open() of the same file in the same process would refuse the process
itself: a process that holds a dir already (the pipeline calling a stage, a
stage calling another) only counts the nesting.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import threading

from absl import logging

from brkeras.errors import WorkdirError
from brkeras.run import workdir as workdir_lib


class WorkdirBusyError(WorkdirError):
    """Another process is writing the work dir."""


_HELD = {}  # real path of a held dir -> [fd, created (by the lock), nesting depth]
_MUTEX = threading.Lock()


def holder(directory):
    """The holder info of `directory`'s lock file (a dict, {} if none or unreadable)."""
    try:
        with open(os.path.join(directory, workdir_lib.LOCK)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _describe(info):
    if not info:  # locked, but the holder has not written its details yet
        return "another process (it is just starting)"
    return (f"`{info.get('command', '?')}` (PID {info.get('pid', '?')} on "
            f"{info.get('host', '?')}, since {info.get('since', '?')})")


def _acquire(directory, stage):
    """(fd, created): locks directory/LOCK, creating the dir (created: it was not there)."""
    created = not os.path.isdir(directory)
    path = os.path.join(directory, workdir_lib.LOCK)
    while True:
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise WorkdirError(f"cannot create the lock file {path}: {e.strerror}; make "
                               f"{directory} writable or choose another --workdir") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusyError(
                f"{directory} is being written by {_describe(holder(directory))}; wait for "
                "it to finish (or stop it), or choose another --workdir") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            # A file system without flock (some network mounts): run, but unprotected.
            logging.warning("cannot lock %s (%s): nothing stops a second writer", path,
                            e.strerror)
            return fd, created
        if _is_file_of(fd, path):
            break
        os.close(fd)  # its holder removed it between our open and our lock: again
    info = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage,
            "command": " ".join([os.path.basename(sys.argv[0] or "python")] + sys.argv[1:]),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        os.ftruncate(fd, 0)  # a holder killed with -9 left its details
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:  # a full disk: the lock holds without the details
        pass
    return fd, created


def _is_file_of(fd, path):
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _release(directory, fd, created):
    path = os.path.join(directory, workdir_lib.LOCK)
    with contextlib.suppress(OSError):
        if _is_file_of(fd, path):
            os.remove(path)  # while still locked
    if created:  # a stage that wrote nothing leaves no empty dir behind
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # fails unless empty
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def hold(directory, stage):
    """Holds the write lock of `directory` for the block; raises WorkdirBusyError at
    once if another process holds it. Re-entrant within a process."""
    key = os.path.realpath(directory)
    with _MUTEX:
        entry = _HELD.get(key)
        if entry is None:
            entry = _HELD[key] = [*_acquire(key, stage), 0]
        entry[2] += 1
    try:
        yield
    finally:
        with _MUTEX:
            entry[2] -= 1
            if entry[2] == 0:
                del _HELD[key]
                _release(key, entry[0], entry[1])


def locked(stage, dir_arg="workdir"):
    """Decorator: the stage function holds the lock of its `dir_arg` argument while it runs."""
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            directory = signature.bind(*args, **kwargs).arguments[dir_arg]
            with hold(os.fspath(directory), stage):
                return fn(*args, **kwargs)
        return run
    return wrap
