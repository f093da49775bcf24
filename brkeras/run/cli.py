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

Examples:
  brkeras train --config=configs/fashion_mnist_enresnet.py:ternary,tradeoff --workdir=runs/t
  brkeras evaluate --workdir=runs/t
  brkeras pipeline --config=configs/fashion_mnist_enresnet.py --workdir=runs/pipeline
"""

import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags


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


class UsageError(Exception):
    pass


def _need_config(command):
    if _CONFIG.value is None:
        raise UsageError(f"`brkeras {command}` needs --config=configs/NAME.py[:ARG]")
    return _CONFIG.value


def _run_command(command, workdir):
    from brkeras.run import pipeline  # pylint: disable=g-import-not-at-top

    if command == "pipeline":
        pipeline.run(_need_config(command), workdir, overwrite=_OVERWRITE.value)
    elif command == "train":
        pipeline.stage_function("train")(_need_config(command), workdir,
                                         overwrite=_OVERWRITE.value)
        print(f"[train] done: {workdir}")
    else:
        pipeline.stage_function(command)(workdir, overrides=_CONFIG.value)


def main(argv):
    from brkeras import errors  # pylint: disable=g-import-not-at-top

    args = argv[1:]
    if len(args) != 1 or args[0] not in COMMANDS:
        got = " ".join(args) or "nothing"
        raise app.UsageError(f"expected one command of {', '.join(COMMANDS)}; got {got}")
    command = args[0]
    if not _WORKDIR.value:
        raise app.UsageError(f"`brkeras {command}` needs --workdir=DIR")
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        _run_command(command, workdir)
    except errors.NonFiniteLossError as e:
        print(f"brkeras {command}: error: {e}", file=sys.stderr)
        return 3
    except (UsageError, ValueError, FileNotFoundError, errors.BrkerasError) as e:
        print(f"brkeras {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run():
    # absl prints the __main__ module's docstring for --help.
    sys.modules["__main__"].__doc__ = __doc__
    app.run(main)


if __name__ == "__main__":
    run()
