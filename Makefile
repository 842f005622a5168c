# Two commands set up a fresh machine and run everything:
#   make demo   venv + pinned torch/torchvision + compiled build, then verify and bench
#   make test   the same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A known-good pair; the package itself works with torch >= 2.5.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS := ninja numpy setuptools wheel pillow matplotlib pytest hypothesis onnx onnxscript

.PHONY: demo test build clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) $(DEPS)
	touch $@

# Compiled, editable install: builds resnet_fused/_C*.so in place (ninja, incremental).
build: $(VENV)/.deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m resnet_fused verify --arch all --size 128
	$(PY) -m resnet_fused bench --arch resnet50 --batch-sizes 1,8

test: build
	$(PY) -m pytest -q tests

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so
