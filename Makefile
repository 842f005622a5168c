# Two commands set up a fresh machine and run everything:
#   make demo   venv + pinned torch/torchvision + compiled build, then verify and bench
#   make test   the same set-up, then the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A known-good pair; the package itself works with torch >= 2.5.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS := ninja numpy setuptools wheel pillow matplotlib pytest hypothesis pyflakes onnx onnxscript safetensors
# ONNX Runtime and OpenVINO: the CPU peers `bench --peers` times side by side.
PEERS := onnxruntime openvino
# CUTLASS's headers (header-only) for the Hopper kernels of csrc/cuda/cutlass_*.cu;
# without its Python package's dependencies, which the build does not use.
CUTLASS := nvidia-cutlass==4.2.0.0

.PHONY: demo test build clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS) $(DEPS) $(PEERS)
	$(PY) -m pip install --quiet --no-deps $(CUTLASS)
	touch $@

# CUTLASS's headers in the source tree, for a machine where nothing installs (setup.py
# looks there first): `make .cutlass`, then carry .cutlass with the tree.
.cutlass: $(VENV)/.deps
	rm -rf $@ && mkdir -p $@/tools/util
	src=$$($(PY) -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('cutlass_library').origin), 'source'))") && \
		cp -r $$src/include $@/ && cp -r $$src/tools/util/include $@/tools/util/

# Compiled, editable install: builds resnet_fused/_C*.so in place (ninja, incremental).
build: $(VENV)/.deps
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m resnet_fused verify --arch all --size 128
	$(PY) -m resnet_fused bench --arch resnet50 --batch-sizes 1,8 --compile --peers
	$(PY) -m resnet_fused bench --arch r3d_18 --compile --peers --repeats 5

# The suite, then the op, model, fuzz and fx tests again as another CPU class would run
# them: AVX2 only (ATen, oneDNN and our kernels capped; on an AVX2 machine this
# is the same path), and with none of our vector kernels.
# Inductor's on-disk cache does not tell ATEN_CPU_CAPABILITY settings apart: code
# compiled in the first pass, reused under the cap, computes garbage or corrupts the
# heap (README, Known issues). So the emulated pass compiles into a cache of its own.
EMULATED_TESTS := tests/test_ops.py tests/test_model.py tests/test_fuzz.py tests/test_graph_fuse.py tests/test_conv3d.py tests/test_video.py
# pyflakes first: undefined names in code that skips here (the CUDA tests) fail now,
# not on the first GPU.
test: build
	$(PY) -m pyflakes resnet_fused tests benchmarks scripts setup.py
	$(PY) -m pytest -q tests
	cache=$$(mktemp -d) && TORCHINDUCTOR_CACHE_DIR=$$cache \
		ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 RESNET_FUSED_CPU_ISA=avx2 \
		$(PY) -m pytest -q $(EMULATED_TESTS); status=$$?; rm -rf $$cache; exit $$status
	RESNET_FUSED_CPU_ISA=none $(PY) -m pytest -q tests/test_ops.py tests/test_conv3d.py

clean:
	rm -rf build *.egg-info resnet_fused/_C*.so
