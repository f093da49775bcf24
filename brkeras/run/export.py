"""`brkeras export --workdir=DIR`: the trained run as checked TFLite files in DIR/export."""

import os
import shutil
import tempfile

import numpy as np

from brkeras import data
from brkeras.deploy.export import export_tflite
from brkeras.run import config as config_lib
from brkeras.run import lock
from brkeras.run import train as train_lib
from brkeras.run import workdir as workdir_lib


TMP_PREFIX = ".export-tmp-"


def _install(tmp, workdir):
    """Moves tmp/export and tmp/export.json into workdir, replacing the previous export."""
    final = os.path.join(workdir, workdir_lib.EXPORT_DIR)
    if os.path.exists(final):
        os.replace(final, os.path.join(tmp, "previous_export"))
    os.replace(os.path.join(tmp, workdir_lib.EXPORT_DIR), final)
    os.replace(os.path.join(tmp, workdir_lib.EXPORT_JSON), os.path.join(workdir, workdir_lib.EXPORT_JSON))


@lock.locked("export")  # one writer per work dir
def export(workdir, x_rep=None, x_test=None, y_test=None, formats=None, prune=None,
           min_agreement=None, noise_runs=3, noise_examples=200, overrides=None):
    """Exports the trained model of `workdir` to workdir/export/*.tflite and export.json.

    Variants: noise on ("noisy", sigma of the config; converted in its deploy form,
    see deploy_model) and off ("det", sigma = 0), each unpruned and, when
    config.export.prune and pruning removes a channel, pruned (prune.prune_blocks).
    precision "int8_qat": the QAT model is converted directly (one "qat_int8" file
    per variant; the sigma = 0 QAT model is rebuilt and its weights copied by layer
    name), no pruning. x_rep (calibration) defaults to the first
    config.export.representative_examples training images, x_test/y_test to the
    first config.export.parity_examples test examples (float32 in [0, 1]).
    min_agreement: noise-off top-1 bar, default config.export.min_agreement.
    overrides: a config whose export section replaces the stored one (the CLI's --config).

    All files are written to a temp dir inside the work dir; export/ and
    export.json are replaced only when every check passed, so a failure leaves
    the previous export (if any) as it was and no partial files. One export per
    work dir at a time (a new one removes stale temp dirs of killed runs).
    """
    config = config_lib.stage_config(workdir_lib.load_config(workdir), overrides)
    formats = tuple(formats or config.export.formats)
    prune = config.export.prune if prune is None else prune
    if min_agreement is None:
        min_agreement = float(config.export.get("min_agreement", 0.995))
    full = float(config.export.get("min_agreement_full_int8", min_agreement))
    drop = float(config.export.get("max_accuracy_drop_full_int8", 0.01))
    if x_rep is None:
        xr, _ = data.load_arrays(config.data.name, "train", config.export.representative_examples,
                                 config.data.data_dir)
        x_rep = np.asarray(data.to_float(xr))
    if x_test is None:
        xt, y_test = data.load_arrays(config.data.name, "test", config.export.parity_examples,
                                      config.data.data_dir)
        x_test = np.asarray(data.to_float(xt))
    model = train_lib.load(workdir)
    for stale in os.listdir(workdir):
        if stale.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(workdir, stale), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=workdir)
    try:
        result = export_tflite(
            model, os.path.join(tmp, workdir_lib.EXPORT_DIR), formats=formats,
            representative_data=x_rep, parity_data=(x_test, y_test), prune=prune,
            min_agreement=min_agreement, min_agreement_full_int8=full,
            max_accuracy_drop_full_int8=drop, noise_runs=noise_runs,
            noise_examples=noise_examples,
            optional_formats=tuple(config.export.get("optional_formats", ())),
            strip_names=bool(config.export.get("strip_names", True)))
        for e in result["files"]:
            e.pop("path")  # the temp dir's; the files move to export/
        result = dict(workdir=os.path.abspath(workdir), **result)
        workdir_lib.write_json(os.path.join(tmp, workdir_lib.EXPORT_JSON), result)
        _install(tmp, workdir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
