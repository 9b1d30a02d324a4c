# Every target sets up .venv on first use (Python 3.11; torch and torchvision from this machine's local wheels).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-output
EVALUATE_OUT ?= evaluate-output
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-slow demo evaluate benchmark train-demo-model clean

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

# The bundled scene holds a star and a square: explain each, then the fill-sensitivity demo on a photo.
demo: setup
	$(VENV)/bin/layermask explain --target 3 --out $(DEMO_OUT)/star
	$(VENV)/bin/layermask explain --target 1 --out $(DEMO_OUT)/square
	$(PY) -m captum_layermask.demo.fill --out $(DEMO_OUT)/fill

# Removal curves, shape bias, LIME metrics and diagnostics of the demo model on 64 held-out scenes (about 7 minutes).
evaluate: setup
	$(VENV)/bin/layermask evaluate --segments patches,slic,quickshift --out $(EVALUATE_OUT)

benchmark: setup
	$(PY) benchmarks/engine_speed.py
	$(PY) benchmarks/captum_lime.py
	$(PY) benchmarks/onnx_speed.py

train-demo-model: setup
	$(PY) -m captum_layermask.demo.train

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(EVALUATE_OUT) .pytest_cache
