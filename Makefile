# Every target sets up .venv on first use (Python 3.11; torch and torchvision from this machine's local wheels).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo-output
EVALUATE_OUT ?= evaluate-output
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup lint format test browser view-screenshot test-cuda test-slow timm-zoo hf-zoo demo evaluate tutorials benchmark train-demo-model clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check captum_layermask onnx_export tests benchmarks
	$(VENV)/bin/ruff format --check captum_layermask onnx_export tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix captum_layermask onnx_export tests benchmarks
	$(VENV)/bin/ruff format captum_layermask onnx_export tests benchmarks

test: lint browser
	$(PY) -m pytest -q

# Debian's chromium and chromium-driver, for the browser test of `layermask view` (skipped, saying why, without them).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium chromium-driver >/dev/null; } || \
	  echo "no chromium here: the browser test of layermask view will be skipped"

# The README's screenshot of `layermask view`.
view-screenshot: setup browser
	$(PY) -m tests.view_screenshot docs/images/view.png

test-cuda: setup
	$(PY) -m pytest -q --device cuda

test-slow: setup
	$(PY) -m pytest -q -m slow

# Every timm architecture: convolutional or not, converted or refused (about an hour; docs/timm.md).
timm-zoo: setup
	$(PY) -m tests.timm_zoo

# Every Hugging Face image classifier at a tiny random configuration: converted or refused (docs/hf.md).
hf-zoo: setup
	$(PY) -m tests.hf_zoo

# The bundled scene holds a star and a square: explain each, then the fill-sensitivity demo on a photo.
demo: setup
	$(VENV)/bin/layermask explain --target 3 --out $(DEMO_OUT)/star
	$(VENV)/bin/layermask explain --target 1 --out $(DEMO_OUT)/square
	$(PY) -m captum_layermask.demo.fill --out $(DEMO_OUT)/fill

# Removal curves, shape bias, LIME metrics and diagnostics of the demo model on 64 held-out scenes (about 5 minutes).
evaluate: setup
	$(VENV)/bin/layermask evaluate --segments patches,slic,quickshift --out $(EVALUATE_OUT)

# Re-executes every tutorial in place, so that the committed notebooks carry their outputs.
tutorials: setup
	cd tutorials && for notebook in *.ipynb; do ../$(VENV)/bin/jupyter-execute --inplace --timeout=600 $$notebook || exit 1; done

benchmark: setup
	$(PY) benchmarks/engine_speed.py
	$(PY) benchmarks/engine_speed.py --model fasterrcnn_mobilenet_v3_large_320_fpn --repeats 9
	for model in timm/tf_efficientnet_b0 efficientnet_b0 timm/mobilenetv3_large_100 timm/convnext_tiny timm/regnety_016 \
		deeplabv3_mobilenet_v3_large; do $(PY) benchmarks/engine_speed.py --model $$model || exit 1; done
	$(PY) benchmarks/captum_lime.py --model efficientnet_b0 --rounds 1
	$(PY) benchmarks/captum_lime.py
	$(PY) benchmarks/engine_speed.py --model vit_b_16
	$(PY) benchmarks/captum_lime.py --model vit_b_16 --rounds 1
	$(PY) benchmarks/dataset_engines.py
	$(PY) benchmarks/tool_scores.py
	$(PY) benchmarks/onnx_speed.py
	$(PY) benchmarks/guard_overhead.py
	$(PY) benchmarks/vanishing_regions.py

train-demo-model: setup
	$(PY) -m captum_layermask.demo.train
	$(PY) -m captum_layermask.demo.train --model vit --steps 8000
	$(PY) -m captum_layermask.demo.train --model hf-vit --steps 600 --threads 1
	$(PY) -m captum_layermask.demo.train --model hf-resnet --steps 800 --threads 1
	$(PY) -m captum_layermask.demo.train --model segmenter --steps 1200 --batch 32 --threads 1
	$(PY) -m captum_layermask.demo.train --model detector --steps 2000 --batch 16 --threads 1

clean:
	rm -rf $(VENV) $(DEMO_OUT) $(EVALUATE_OUT) .pytest_cache
