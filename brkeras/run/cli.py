"""brkeras: train, evaluate and ship robust, quantized EnResNets.

Usage:
  brkeras <command> --config=configs/NAME.py[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

Commands:
  train      adversarial training with Binary-Relax quantization (resumes an
             unfinished work dir; --overwrite to start a finished one again)
  evaluate   robust evaluation (FGSM, IFGSM-20, PGD-20, CW, EOT), sparsity, report
  export     TFLite files (float32, int8), pruned, with Keras parity checks
  benchmark  LiteRT latency of the exported files on this host
  pipeline   every stage in order for each model of the config, then a summary

Flags:
  --config     configs/NAME.py[:ARG]; ARG = comma-separated tokens such as
               ternary,tradeoff,en2,d20 (see the config's docstring)
  --config.X   override one config field, e.g. --config.optim.epochs=3
  --workdir    the run's work dir (for pipeline: the pipeline dir)
  --overwrite  train a finished work dir again from scratch
  --debug      print the traceback of an error (as --verbosity=1 does)

Errors are one line on stderr; exit 2: usage, config, data or work dir (in use
by another process, full disk), 3: the loss became NaN or Inf, 130: Ctrl-C
(finished epochs and stages are kept; the same command resumes). Off a terminal
(or with CI set) the logs show one line per epoch or attack, not progress bars.

Examples:
  brkeras train --config=configs/fashion_mnist_enresnet.py:ternary,tradeoff --workdir=runs/t
  brkeras evaluate --workdir=runs/t
  brkeras pipeline --config=configs/fashion_mnist_enresnet.py --workdir=runs/pipeline
"""

import contextlib
import inspect
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from ml_collections import config_flags


from brkeras.run import console
from brkeras.run import lock
from brkeras.run import workdir as workdir_lib
from brkeras.run.pipeline import STAGES

# The stages of run/pipeline.py's table, and the pipeline itself.
COMMANDS = tuple(STAGES) + ("pipeline",)


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/NAME.py[:ARG]; override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir of the run (or of the pipeline).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start a finished work dir again from scratch (deletes its "
    "checkpoints and metrics).")
_DEBUG = flags.DEFINE_bool("debug", False, "On an error, print its traceback too.")


class UsageError(Exception):
    pass


def _need_config(command):
    if _CONFIG.value is None:
        raise UsageError(f"`brkeras {command}` needs --config=configs/NAME.py[:ARG]")
    return _CONFIG.value


def _one_line(message):
    """The lines of `message` joined into one ("a:\n  b\n  c" -> "a: b; c")."""
    out = ""
    for line in (l.strip() for l in str(message).splitlines()):
        if line:
            out += line if not out else (" " if out.endswith(":") else "; ") + line
    return out


def _debug_requested(argv=()):
    try:
        return _DEBUG.value or console.debug()
    except flags.Error:  # flags not parsed (a parse error): look at the arguments
        return any(re.fullmatch(r"--debug(=(true|1))?|-?-v(erbosity)?=?[1-9]\d*", a)
                   for a in argv)


def _fail(command, message, code=2, argv=()):
    """Prints the one-line error (after the traceback, if asked for); returns `code`."""
    if _debug_requested(argv) and sys.exc_info()[0] is not None:
        traceback.print_exc()
    print(f"brkeras{' ' + command if command else ''}: error: {_one_line(message)}",
          file=sys.stderr, flush=True)
    return code


def _chain(e):
    """`e` and the exceptions it was raised from, outermost first."""
    out = [e]
    while out[-1].__cause__ is not None or out[-1].__context__ is not None:
        out.append(out[-1].__cause__ or out[-1].__context__)
    return out


def _config_arg(argv):
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _where(e, path):
    """" (PATH:LINE)" of the innermost frame of `e` in the config file `path`, or ""."""
    if isinstance(e, SyntaxError) and e.filename:
        return f" ({e.filename}:{e.lineno})"
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if path and os.path.abspath(f.filename) == os.path.abspath(path)]
    return f" ({path}:{frames[-1].lineno})" if frames else ""


def _config_error(e, argv):
    """One line for an error of loading --config or applying --config.FIELD=VALUE."""
    arg = _config_arg(argv) or "?"
    path = arg.split(":", 1)[0]
    if isinstance(e, OSError) and not os.path.isfile(path):
        return (f"--config={arg}: no such file {path!r} (relative to {os.getcwd()}); give a "
                "config file such as configs/smoke.py")
    chain = _chain(e)
    root = chain[-1]
    if isinstance(root, KeyError):  # an unknown field: ml_collections' did-you-mean text
        keys = [str(k.args[0]) for k in chain if isinstance(k, KeyError) and k.args]
        key = max(keys, key=len, default="")
        name = key.splitlines()[0].strip("'\"") if key else "?"
        flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.")
                     and name in a.split("=", 1)[0].split(".")), "--config." + name)
        hint = " ".join(key.splitlines()[1:]).strip()
        return (f"{flag}: the config has no field {name!r}" + (f"; {hint}" if hint else "")
                + f" (the fields are in {path} and brkeras/run/config.py base_config())")
    what = "" if type(root) is ValueError else f"{type(root).__name__}: "
    return f"--config={arg}: {what}{root}{_where(root, path)}"


def _parse_flags(argv):
    """absl's flag parsing, with every error (config files included) as one line, exit 2."""
    command = next((a for a in argv[1:] if a in COMMANDS), None)
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _CONFIG.value.keys()  # a config that failed to load raises here (ml_collections)
        console.set_debug(_DEBUG.value)
        return rest
    except flags.Error as e:
        if "Error whilst parsing config file" in str(e):
            sys.exit(_fail(command, _config_error(e, argv), argv=argv))
        sys.exit(_fail(command, f"{_one_line(e)} (see brkeras --help)", argv=argv))
    except Exception as e:  # pylint: disable=broad-except  # the config file's own errors
        sys.exit(_fail(command, _config_error(e, argv), argv=argv))


def _run_command(command, workdir):
    # The work dir's lock before the seconds-long TensorFlow import, so that a second
    # writer is refused at once; the stage takes it again (re-entrant). Not with
    # TF_CONFIG: of a multi-worker run only the chief locks the shared dir (train does).
    early = contextlib.nullcontext() if "TF_CONFIG" in os.environ else lock.hold(workdir, command)
    with early:
        _run_stage(command, workdir)


def _run_stage(command, workdir):
    from brkeras.run import pipeline  # pylint: disable=g-import-not-at-top

    verbose = console.progress_verbose()
    if command == "pipeline":
        pipeline.run(_need_config(command), workdir, overwrite=_OVERWRITE.value, verbose=verbose)
    elif command == "train":
        config = _need_config(command)
        pipeline.stage_function("train")(config, workdir, overwrite=_OVERWRITE.value,
                                         verbose=verbose)
        print(f"[train] done: {workdir}")
    else:
        fn = pipeline.stage_function(command)
        more = {"verbose": verbose} if "verbose" in inspect.signature(fn).parameters else {}
        fn(workdir, overrides=_CONFIG.value, **more)


def _interrupted(command, workdir):
    """The one line after Ctrl-C: what is kept, how to go on."""
    if command == "pipeline":
        return f"interrupted; the finished stages and epochs in {workdir} are kept; run the " \
               "same command to resume"
    if command != "train":
        return f"interrupted; run the same command again ({workdir} keeps its earlier outputs)"
    try:
        done = int(workdir_lib.read_state(workdir)["completed_epochs"])
    except Exception:  # pylint: disable=broad-except
        done = None
    kept = ("the finished epochs are kept" if done is None else "no epoch had finished"
            if done == 0 else "epoch 1 is kept" if done == 1 else f"epochs 1-{done} are kept")
    return f"interrupted; {kept} in {workdir}; run the same command to resume"


def main(argv):
    from brkeras import errors  # pylint: disable=g-import-not-at-top

    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        got = " ".join(args) or "nothing"
        return _fail(None, f"expected one command of {', '.join(COMMANDS)}; got {got} "
                     "(see brkeras --help)")
    command = args[0]
    if not _WORKDIR.value:
        return _fail(command, f"`brkeras {command}` needs --workdir=DIR")
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        _run_command(command, workdir)
    except KeyboardInterrupt:
        print(f"brkeras {command}: {_interrupted(command, workdir)}", file=sys.stderr, flush=True)
        return 130
    except errors.NonFiniteLossError as e:
        return _fail(command, e, 3)
    except (UsageError, ValueError, errors.BrkerasError) as e:
        return _fail(command, e, 2)
    except Exception as e:  # pylint: disable=broad-except
        reason = console.write_failure(e)
        if reason is not None:  # OSError or tf.errors.OpError of a write
            return _fail(command, f"{reason} ({_one_line(e)}). "
                         f"{console.how_to_fix(reason, workdir)}", 2)
        if isinstance(e, FileNotFoundError):
            return _fail(command, e, 2)
        return _fail(command, f"{type(e).__name__}: {e} (unexpected; --debug shows the "
                     "traceback)", 1)
    return 0


def run():
    # absl prints the __main__ module's docstring for --help.
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
