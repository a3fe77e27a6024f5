# The commands README promises. Torch is installed first, pinned, so that pip
# takes the CPU wheel instead of resolving a CUDA build for `torch>=2.4`; then
# every other package at the exact version requirements.lock pins (`make lock`
# re-resolves the lock from pyproject.toml's ranges).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
LOCK := requirements.lock
STAMP := $(VENV)/.installed
LOCK_VENV := .lock-venv
# JupyterLab refuses to start as root without --allow-root (containers often run as root)
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: install test unit demo lab lock clean gpu-check

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval-lax notebooks

unit: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

# On a CUDA machine: the family matrix and the attribution benchmark on the GPU, the card's name printed first.
gpu-check: $(STAMP)
	$(PY) -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
	$(PY) -m pytest tests/test_families.py --device cuda -q
	cd benchmarks && ../$(PY) attribution.py --device cuda --only gpt2-small tiny-llama pythia-160m

demo: $(STAMP)
	$(PY) -m interplab.ui.report notebooks reports

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks $(ALLOW_ROOT)

# Re-resolve the newest versions pyproject.toml's ranges allow (dev extra included) in a scratch
# venv and write them to the lock; torch stays at $(TORCH), written without its local label (+cpu).
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet $(TORCH)
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# Exact versions of interplab's whole dependency tree (pyproject.toml's dependencies and its dev extra),"; \
	  echo "# installed by \`make install\` and environment.yml. Regenerate with \`make lock\` (see README)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -i -E '^(pip|interplab)==' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(LOCK)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf reports .pytest_cache
