# The commands README promises. Torch is installed first, pinned, so that pip
# takes the CPU wheel instead of resolving a CUDA build for `torch>=2.4`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test unit demo lab clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests
	$(PY) -m pytest --nbval-lax notebooks

unit: $(STAMP)
	$(PY) -m pytest tests -m "not slow"

demo: $(STAMP)
	$(PY) -m interplab.report notebooks reports

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf reports .pytest_cache
