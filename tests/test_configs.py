"""Every shipped config loads, validates, and documents how to run it."""

import glob
import importlib.util
import os

import pytest

from brkeras.run import config as config_lib
from brkeras.run import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_configs_are_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"smoke.py", "fashion_mnist_enresnet.py", "fashion_mnist_long.py",
            "cifar10_enresnet.py"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_for_every_pipeline_model(path):
    module = load(path)
    doc = module.__doc__ or ""
    assert "Runs:" in doc and "brkeras " in doc, f"{path}: docstring must give the command"
    base = module.get_config()
    config_lib.validate(base)
    pipeline._check(base, "/tmp/pipeline")  # pipeline section, sources included; no I/O
    for arg in base.pipeline.models:
        c = pipeline.model_config(base, arg, "/tmp/pipeline")
        assert c.pipeline.models == (arg,)
        assert c.quant.precision in config_lib.PRECISIONS


def test_long_config_extends_the_default():
    default = load(os.path.join(ROOT, "configs", "fashion_mnist_enresnet.py")).get_config()
    long = load(os.path.join(ROOT, "configs", "fashion_mnist_long.py")).get_config("ternary,pgd")
    assert long.quant.precision == "ternary" and long.loss.name == "pgd"
    assert long.model.width == 2 * default.model.width
    assert long.data.max_train_examples == 0 and long.optim.epochs > default.optim.epochs
    # What the default's ternary result rests on carries over.
    assert long.quant.keep_float == default.quant.keep_float
    assert long.optim.bn_reestimate_batches == default.optim.bn_reestimate_batches


def test_speed_reference_is_the_084a4ca_job():
    """The work of `make run` at 084a4ca (issue 11's time bar), nothing added since."""
    default = load(os.path.join(ROOT, "configs", "fashion_mnist_enresnet.py")).get_config()
    ref = load(os.path.join(ROOT, "configs", "fashion_mnist_speed_reference.py")).get_config()
    assert ref.pipeline.models == ("float,tradeoff", "ternary,tradeoff", "4bit,tradeoff",
                                   "ternary,pgd", "int8_qat,tradeoff")
    assert ref.pipeline.stages == ("train", "evaluate", "export", "benchmark")
    assert ref.eval.attacks == ("fgsm", "ifgsm20", "pgd20", "cw")
    assert ref.eval.eot_attacks == ("pgd20",)
    assert ref.export.formats == ("float32", "dynamic_int8", "full_int8")
    for arg in ref.pipeline.models:
        assert not pipeline.model_config(ref, arg, "/tmp/p").sparsity.enabled
    # Data, model, training and fine-tuning as in the default.
    for section in ("data", "model", "adv", "optim", "quant"):
        assert ref[section].to_dict() == default[section].to_dict(), section
    ref_ft, default_ft = ref.pipeline.finetune.to_dict(), default.pipeline.finetune.to_dict()
    assert ref_ft.pop("sources") == ()  # every model from the float one, as at 084a4ca
    default_ft.pop("sources")
    assert ref_ft == default_ft
    assert ref.eval.max_examples == default.eval.max_examples
    assert ref.eval.eot_samples == default.eval.eot_samples
