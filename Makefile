# Entry points, each doing all set-up on a fresh machine:
#   make bench   — the benchmark comparison on whatever device is here (quick sweep; FULL=1 for the full one)
#   make test    — the quick test tier: every module, backend and contract case, tests marked `slow` left out (minutes)
#   make test-slow — the slow tier: the `slow` tests (compiles, fresh venvs, training, examples), the CPU matrix
#                  (.ci/cpu_matrix.sh) and the triton tests under Triton 3.6 (.ci/triton36.sh; TRITON36_OPTS=--fresh
#                  recreates its venv)
#   make test-triton36 — the triton tests under the GPU image's Triton 3.6, in a second venv (.ci/triton36.sh)
#   make vendor  — pml's wheels into benchmarks/.vendor, for gpu_check.sh on the GPU machine (no registry there)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ms_fused-installed

.PHONY: bench test test-slow test-triton36 vendor install clean

$(STAMP): setup.py requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# CPU build from the local wheel here; elsewhere PyPI's torch==2.13.0 (CUDA-enabled on Linux)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest tests -q -m slow
	PY=$(PY) bash .ci/cpu_matrix.sh
	bash .ci/triton36.sh $(TRITON36_OPTS)

test-triton36:
	bash .ci/triton36.sh

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(FULL),,--quick)

# pytorch-metric-learning and pytest for the GPU machine, which reaches no registry: wheels for its Python (3.12), carried
# with the run (carry: ["benchmarks/.vendor"]) and unpacked by gpu_check.sh. Importing pml's losses and miners
# also needs tqdm and scipy (utils/common_functions.py), which a bare torch image lacks; scikit-learn is
# only for its accuracy calculator and testers. scipy: the newest for VENDOR_PYTHON (for 3.12: 1.18.1, which takes
# numpy 2.0-2.7; the image has 2.5).
VENDOR_DIR ?= benchmarks/.vendor
VENDOR_PYTHON ?= 3.12
VENDOR_PLATFORM ?= manylinux_2_28_x86_64
VENDOR_WHEELS ?= pytorch-metric-learning==2.9.0 tqdm==4.70.1 'scipy>=1.16' pytest==9.0.3 pluggy iniconfig packaging pygments

vendor:
	rm -f $(VENDOR_DIR)/*.whl
	python3 -m pip download --no-deps --only-binary=:all: --python-version $(VENDOR_PYTHON) --implementation cp \
		--platform $(VENDOR_PLATFORM) -d $(VENDOR_DIR) $(VENDOR_WHEELS)

clean:
	rm -rf build *.egg-info ms_fused/*.so
