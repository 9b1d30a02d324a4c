"""The timm zoo under layer masking: which architectures are convolutional, and which of them convert.

Run ``python -m tests.timm_zoo`` (``make timm-zoo``) for the report in docs/timm.md; ``tests/test_timm.py``
checks the same in ``make test-slow``.

An architecture is **convolutional** when its forward, traced by ``torch.fx`` with timm's leaves, convolves the
image (``nn.Conv2d``/``F.conv2d``) and mixes positions otherwise only by pooling, padding, resampling and pooled
statistics: no product of two image-dependent tensors by a matrix product (``matmul``, ``bmm``, ``einsum``,
``@``, ``scaled_dot_product_attention``: attention, linear attention included), no ``nn.MultiheadAttention``,
no recurrent layer, none of timm's attention blocks that it keeps whole (:data:`ATTENTION_LEAVES`), and not a
token MLP (timm's ``mlp_mixer`` module: MLP-Mixer, ResMLP, gMLP, whose linear layers run across positions).
This is decided on a model built on the meta device, so that no weights are initialised.
"""

from __future__ import annotations

import argparse
import operator
import time
from typing import Dict, List, Tuple

import timm
import torch
import torch.nn.functional as F
from torch import nn

from captum_layermask import LayerMaskError, layer_masked, trace
from captum_layermask.core.composite import conversion_registry
from captum_layermask.core.dependence import image_dependence
from captum_layermask.testing import check_layer_masking

MATRIX_PRODUCTS = {
    torch.matmul,
    operator.matmul,
    torch.bmm,
    torch.baddbmm,
    torch.einsum,
    F.scaled_dot_product_attention,
}
MATRIX_PRODUCT_METHODS = {"matmul", "bmm", "baddbmm", "__matmul__"}
MIXING_MODULES = (nn.MultiheadAttention, nn.RNNBase)
ATTENTION_LEAVES = {
    "BilinearAttnTransform",
    "ConvAttention",
    "GPSA",
    "LiteMLA",
    "LocalWindowAttention",
    "LocallyGroupedAttn",
    "MobileNetV5MultiScaleFusionAdapter",
    "MobileVitBlock",
    "MobileVitV2Block",
    "NaFlexEmbeds",
    "TinyVitBlock",
}
"""timm's ``torch.fx`` leaves that compute attention (or embed tokens for a transformer)."""
TOKEN_MLP_MODULES = {"mlp_mixer"}


_MODULE_OF: Dict[str, str] = {}


def _modules_by_model() -> Dict[str, str]:
    if not _MODULE_OF:
        for module in timm.list_modules():
            for name in timm.list_models(module=module):
                _MODULE_OF[name] = module
    return _MODULE_OF


def classify(name: str) -> Tuple[bool, str]:
    """``(True, "")`` for a convolutional architecture, else ``(False, why not)``."""
    module = _modules_by_model()[name]
    if module in TOKEN_MLP_MODULES:
        return False, "token MLP"
    model = timm.create_model(name, device="meta").eval()
    try:
        traced = trace(model)
    except LayerMaskError as error:
        return False, f"not traceable by torch.fx: {str(error)[:120]}"
    convolves = False
    for _node, op, _entry in image_dependence(traced, conversion_registry("neighbor", "intersection", None)).steps:
        if op in MATRIX_PRODUCTS or op in MATRIX_PRODUCT_METHODS:
            return False, f"matrix product of activations ({getattr(op, '__name__', op)}): attention"
        if isinstance(op, MIXING_MODULES) or type(op).__name__ in ATTENTION_LEAVES:
            return False, f"attention/recurrent layer {type(op).__name__}"
        convolves = convolves or isinstance(op, nn.Conv2d) or op is F.conv2d
    return (True, "") if convolves else (False, "no convolution on the image")


def input_size(model: nn.Module) -> int:
    """The square size the sweep starts from: the model's fixed size, else 64."""
    config = getattr(model, "pretrained_cfg", None) or {}
    return int(config["input_size"][-1]) if config.get("fixed_input_size") else 64


def _randomize_norm_statistics(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))


def check(name: str) -> None:
    """Builds the model with random weights and checks the properties of tests/test_torchvision.py, at the
    smallest of 64, 96, 128 and 224 pixels that the model itself accepts (or its fixed size).

    Raises:
        LayerMaskError: the conversion's refusal (UnsupportedLayerError/TracingError).
        AssertionError: a property that does not hold.
    """
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    with torch.no_grad():
        _randomize_norm_statistics(model)
    masked = layer_masked(model)
    sizes = [input_size(model)] + [size for size in (96, 128, 224) if size > input_size(model)]
    for size in sizes:
        x, mask = _inputs(size)
        try:
            with torch.no_grad():
                model(x)  # the smallest size the model takes
            break
        except RuntimeError:
            if size == sizes[-1]:
                raise
    check_layer_masking(model, x, mask, masked, rtol=1e-4, check_padding=False)  # the sweep converts once
    with torch.no_grad():
        assert not torch.equal(masked(x, mask), masked(x, torch.ones_like(mask))), "masking changed nothing"


def _inputs(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two images and per-image masks removing about half of the 8x8 patches."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=generator)
    cells = (torch.rand(2, 1, -(-size // 8), -(-size // 8), generator=generator) > 0.5).float()
    mask = cells.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :size, :size]
    return x, mask


def sweep(names: List[str], log: bool = False) -> Dict[str, Dict[str, str]]:
    """Classifies and checks every architecture: ``{name: {"kind", "result", "detail"}}``."""
    results: Dict[str, Dict[str, str]] = {}
    for name in names:
        start = time.perf_counter()
        convolutional, why = classify(name)
        if not convolutional:
            results[name] = {"kind": "other", "result": "skipped", "detail": why}
        else:
            try:
                check(name)
                results[name] = {"kind": "convolutional", "result": "converted", "detail": ""}
            except LayerMaskError as error:
                results[name] = {
                    "kind": "convolutional",
                    "result": "refused",
                    "detail": f"{type(error).__name__}: {error}",
                }
            except AssertionError as error:
                results[name] = {"kind": "convolutional", "result": "failed", "detail": str(error)}
        if log:
            entry = results[name]
            print(
                f"{name:48s} {entry['result']:9s} {time.perf_counter() - start:6.1f}s {entry['detail'][:150]}",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures (default: every one timm lists)")
    parser.add_argument("--classify", action="store_true", help="only say which architectures are convolutional")
    args = parser.parse_args()
    names = args.names or timm.list_models()
    if args.classify:
        for name in names:
            print(name, *classify(name), sep="\t", flush=True)
        return
    results = sweep(names, log=True)
    counts: Dict[str, int] = {}
    for entry in results.values():
        counts[f"{entry['kind']}/{entry['result']}"] = counts.get(f"{entry['kind']}/{entry['result']}", 0) + 1
    print(counts)


if __name__ == "__main__":
    main()
