# Every target sets up .venv on first use (Python 3.11; torch and torchvision from this machine's local wheels).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-output
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slow demo benchmark clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

demo: setup
	$(PY) -m captum_layermask.demo --out $(DEMO_OUT)

benchmark: setup
	$(PY) benchmarks/engine_speed.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
