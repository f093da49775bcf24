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
