# Two entry points for a fresh machine (see README):
#   make run    set up everything, then run the main job (brkeras pipeline)
#   make test   set up everything, then run the test suite
# Both are idempotent: the venv and the data are reused when present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/fashion_mnist_enresnet.py
WORKDIR ?= runs/pipeline
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup run test data clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Offline Fashion-MNIST from Debian's package, where apt is available.
data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
	  || echo "note: could not install dataset-fashion-mnist; tfds will need internet"; \
	else echo "note: $(FMNIST_DIR) missing; run 'sudo apt-get install dataset-fashion-mnist' or let tfds download"; fi

# The fused noise kernel (brkeras/nn/kernels), compiled against the venv's
# TensorFlow; without g++ training runs the TF-op path (same values, slower).
KERNEL := brkeras/nn/kernels/_fk_noise.so
$(KERNEL): brkeras/nn/kernels/fk_noise.cc brkeras/nn/kernels/__init__.py $(VENV)/.installed
	@$(PY) -m brkeras.nn.kernels 2>/dev/null \
	  || echo "note: the fused noise kernel did not build (python -m brkeras.nn.kernels says why); training runs the slower TF-op path"

setup: $(VENV)/.installed $(KERNEL) data

run: setup
	$(VENV)/bin/brkeras pipeline --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) *.egg-info $(KERNEL)
