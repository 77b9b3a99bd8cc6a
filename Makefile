# Entry points, each doing all set-up on a fresh machine:
#   make bench   — the benchmark comparison on whatever device is here (quick sweep; FULL=1 for the full one)
#   make test    — the test suite
#   make test-triton36 — the triton tests under the GPU image's Triton 3.6, in a second venv (.ci/triton36.sh)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ms_fused-installed

.PHONY: bench test test-triton36 install clean

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
	$(PY) -m pytest tests -q

test-triton36:
	bash .ci/triton36.sh

bench: $(STAMP)
	$(PY) benchmarks/run.py $(if $(FULL),,--quick)

clean:
	rm -rf build *.egg-info ms_fused/*.so
