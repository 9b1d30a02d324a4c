"""The package as users install it: a wheel built with ``python -m build``, installed into a fresh virtual
environment without extras, then with ``[all]``, and the README's commands run there (slow: a few minutes)."""

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")  # the set-up's local wheels (Makefile)

# What the README's Python examples leave to the reader: random weights instead of downloaded ones, two images.
PREAMBLE = """
import torch, torchvision
from captum_layermask import patch_segments, random_patch_masks
torch.manual_seed(0)
images, mask = torch.rand(2, 3, 224, 224), random_patch_masks(2, 224, 224, 16, seed=0)
image, label, segments = images[:1], 3, patch_segments(224, 224, 16)
"""


def run(command, cwd, **kwargs):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=1200, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def readme_examples(names):
    """The README's Python blocks under the given section headings, weights left random."""
    text = (ROOT / "README.md").read_text()
    blocks = []
    for name in names:
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
        blocks.append(code.replace("weights=...", "weights=None").replace("resnet50", "resnet18"))
    return blocks


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def test_the_wheel_and_sdist_hold_the_license_the_demo_and_onnx_export(dist):
    from captum_layermask import __version__

    wheel = next(dist.glob("*.whl"))
    assert f"-{__version__}-" in wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "captum_layermask/demo/shapes_resnet.pt",
        "captum_layermask/demo/shapes_vit.pt",
        "captum_layermask/demo/shapes_hf_vit.pt",
        "captum_layermask/demo/shapes_hf_resnet.pt",
        "captum_layermask/demo/shapes_segmenter.pt",
        "captum_layermask/demo/shapes_detector.pt",
        "captum_layermask/demo/demo_scene.png",
        "captum_layermask/view/index.html",
        "captum_layermask/datasets/imagenet_synsets.txt",
        "onnx_export/__main__.py",
    ):
        assert required in names, required
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    sdist = tarfile.open(next(dist.glob("*.tar.gz")))
    members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {
        "LICENSE",
        "README.md",
        "CITATION.cff",
        "captum_layermask/demo/shapes_resnet.pt",
        "onnx_export/export.py",
    } <= members


@pytest.fixture
def venv(tmp_path):
    """A fresh virtual environment, removed afterwards (torch makes it several GB)."""
    path = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(path)], cwd=tmp_path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_a_fresh_environment_runs_the_readme_without_extras_then_with_all(dist, tmp_path, venv):
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    python, layermask = venv / "bin" / "python", venv / "bin" / "layermask"
    run([python, "-m", "pip", "install", "--quiet", *TORCH_PINS], cwd=tmp_path, env=env)
    run([python, "-m", "pip", "install", "--quiet", next(dist.glob("*.whl"))], cwd=tmp_path, env=env)

    from captum_layermask import __version__

    assert run([layermask, "--version"], cwd=tmp_path).stdout.strip() == f"layermask {__version__}"
    run([layermask, "explain", "--samples", "16", "--out", "demo-output"], cwd=tmp_path, env=env)
    assert (tmp_path / "demo-output" / "explanation.png").exists()
    run([python, "-m", "onnx_export", "--model", "demo", "--out", "demo.onnx"], cwd=tmp_path, env=env)
    assert (tmp_path / "demo.onnx").stat().st_size > 0
    sections = ["Layer masking a model", "Explaining with Captum", "Serving with onnxruntime"]
    script = PREAMBLE + "\n".join(readme_examples(sections))
    run([python, "-c", script], cwd=tmp_path, env=env)
    missing = subprocess.run(
        [python, "-c", "from captum_layermask.interop.shap import LayerMaskImage"], capture_output=True, text=True
    )
    assert missing.returncode == 1 and "pip install 'captum-layermask[tools]'" in missing.stderr.splitlines()[-1]

    wheel = next(dist.glob("*.whl"))
    run([python, "-m", "pip", "install", "--quiet", f"captum-layermask[all] @ {wheel.as_uri()}"], cwd=tmp_path, env=env)
    imports = "import timm, ray, shap, lime, quantus; from captum_layermask.interop.shap import LayerMaskImage"
    run([python, "-c", imports], cwd=tmp_path, env=env)
    run([python, "-c", "import captum_layermask.integrations.timm"], cwd=tmp_path, env=env)
