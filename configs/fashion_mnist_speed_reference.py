"""The default job as of commit 084a4ca, on today's code: the speed reference of issue 11.

Runs:
  brkeras pipeline --config=configs/fashion_mnist_speed_reference.py --workdir=runs/speed_ref
  (or `make run CONFIG=configs/fashion_mnist_speed_reference.py WORKDIR=runs/speed_ref`)

The same work as `make run` at 084a4ca (2026-11-27): the five models float,
ternary, 4-bit and tfmot int8 QAT with the trade-off loss and ternary with the
plain PGD loss, the data, epochs and fine-tune schedule of
configs/fashion_mnist_enresnet.py, the attacks of that day (FGSM, IFGSM-20,
PGD-20, CW; PGD-20 also with EOT; no APGD), the three export formats, and the
stages train, evaluate, export and benchmark (no `evaluate_tflite`, no channel
sparsity). Only the code in between differs, so its wall time against a fresh
clone of 084a4ca running `make run`, in one sitting, is what issue 11's
"main job in half its time" bar compares. The measured figures are in
README.md ("Training speed and bfloat16").
"""

import os

from brkeras.run import config as config_lib


def _default_config():
    return config_lib.from_file(
            os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion_mnist_enresnet.py"))


def get_config(arg=None):
    c = _default_config()
    c.adv.method = "pgd"  # 084a4ca's training attack, PGD-3, whatever the default becomes
    c.eval.attacks = ("fgsm", "ifgsm20", "pgd20", "cw")
    c.eval.eot_attacks = ("pgd20",)
    c.export.formats = ("float32", "dynamic_int8", "full_int8")
    c.export.optional_formats = ("full_int8",)
    c.pipeline.models = ("float,tradeoff", "ternary,tradeoff", "4bit,tradeoff",
                         "ternary,pgd", "int8_qat,tradeoff")
    c.pipeline.stages = ("train", "evaluate", "export", "benchmark")
    c.pipeline.finetune.sources = ()  # every model from the float one, as then
    return config_lib.apply_arg(c, arg)
