"""Shared fixtures: keep TensorFlow quiet and small on a 2-core machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import brkeras  # noqa: E402,F401  (chooses tf_keras before TensorFlow is imported)
