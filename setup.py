"""brkeras: robust, quantized EnResNets in TensorFlow/Keras, shipped as TFLite."""

from setuptools import find_packages, setup

setup(
    name="brkeras",
    version="0.1.0",
    description=("EnResNet + PGD adversarial training + Binary-Relax quantization "
                 "in TensorFlow/Keras, exported to TFLite"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["brkeras", "brkeras.*"]),
    # the fused kernel's source: `python -m brkeras.nn.kernels` builds it after install
    package_data={"brkeras.nn.kernels": ["fk_noise.cc"]},
    # Versions known to install and work together (TF 2.21 on Python 3.11).
    install_requires=[
        "tensorflow==2.21.0",
        "tf-keras==2.21.0",
        "tensorflow-model-optimization==0.8.1",  # pins absl-py ~=1.2
        "tensorflow-datasets==4.9.10",
        "importlib_resources",  # tfds 4.9.10 imports it without declaring it
        "cleverhans==4.0.0",
        "ai-edge-litert==2.3.0",
        "ml-collections",
        "tensorboard==2.21.0",  # TF 2.21 no longer pulls it in; the TensorBoard callback needs it
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["brkeras=brkeras.run.cli:run"]},
)
