"""Shared fixtures: keep TensorFlow quiet and small on a 2-core machine."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# The tests assert values of seeded runs, so they need kernels that give the same
# numbers every run. TensorFlow's Eigen kernels do; its oneDNN kernels, which brkeras
# turns on for users (brkeras/__init__.py), did not on an AVX2 EPYC: one seeded
# 2-epoch training reached 0.525-0.625 natural accuracy over six processes, and
# Eigen 0.65 every time (README, "oneDNN on CPUs without AVX-512"). A user's own
# TF_ENABLE_ONEDNN_OPTS=1 still wins (`TF_ENABLE_ONEDNN_OPTS=1 make test`).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import brkeras  # noqa: E402,F401  (chooses tf_keras before TensorFlow is imported)
