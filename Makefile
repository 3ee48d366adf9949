# Two commands do all set-up on a fresh machine: `make demo` (the main job) and `make test`.
# Both create or reuse .venv and install the project into it. Where no torch is importable, the CPU build
# torch==2.13.0 is installed first, so pip never pulls a multi-GB CUDA build; a torch you already have
# (a CUDA build in the system site-packages) is kept: the venv sees it through --system-site-packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.memplan-installed

.PHONY: demo test gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/memplan plan flux-dev --budget 8GB --gpu rtx-4090 --ram 64GB -o plans/flux-dev-8GB.json

test: $(STAMP)
	$(PY) -m pytest -q -x

gpu-check: $(STAMP)
	$(PY) -m benchmarks.gpu_check

clean:
	rm -rf $(VENV) .pytest_cache
