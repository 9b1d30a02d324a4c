"""The engine imports torch only: the package imports and converts a model without any optional extra."""

import subprocess
import sys
import textwrap

BLOCKED = (
    "skimage",
    "sklearn",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "torchvision",
    "PIL",
    "timm",
    "transformers",
)

SCRIPT = textwrap.dedent(
    f"""
    import importlib.abc, importlib.machinery, sys

    class Refuse(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        # found (torch._dynamo looks packages up without importing them), but importing one fails
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                return importlib.machinery.ModuleSpec(name, self)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ModuleNotFoundError(f"{{module.__name__}} is blocked")

    sys.meta_path.insert(0, Refuse())
    import torch
    import captum_layermask
    from captum_layermask import LayerMask, layer_masked
    from captum_layermask import evaluation  # its extras are imported only where used

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1)).eval()
    masked = layer_masked(model)
    x, mask = torch.randn(1, 3, 8, 8), torch.ones(1, 1, 8, 8)
    assert torch.allclose(masked(x, mask), model(x), atol=1e-6)
    assert torch.allclose(layer_masked(model, capture="export")(x, mask), model(x), atol=1e-6)
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in {BLOCKED!r})
    print("loaded:", loaded)
    """
)


def test_the_package_imports_and_converts_without_the_extras():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout


def test_the_engine_imports_nothing_else_of_the_project():
    for path in __import__("pathlib").Path(__file__).parent.parent.joinpath("captum_layermask", "core").glob("*.py"):
        text = path.read_text()
        assert "from .." not in text and "import captum_layermask" not in text, path.name


def test_importing_the_package_imports_no_extra_even_where_installed():
    # every Ray worker and command pays for what the package imports: torchvision alone (and torch._dynamo, which
    # it pulls in) took 1.6 s of the 3.7 s; torchvision's rules are loaded when a torchvision model is converted
    script = f"import sys, captum_layermask; print(sorted({{n.split('.')[0] for n in sys.modules}} & set({BLOCKED!r})))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
