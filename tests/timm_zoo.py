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
import json
import operator
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


SMALL = 64
"""The size that architectures with a fixed input size are built for when they take ``img_size=`` (ViTs)."""


def _built_small(name: str) -> Tuple[Optional[nn.Module], List[int]]:
    """The architecture built for ``SMALL`` pixels, if it has a fixed input size, takes ``img_size=`` and runs at
    that size (a ViT's position embeddings are then made for it); else ``(None, [])``."""
    config = timm.get_pretrained_cfg(name)
    if config is None or not getattr(config, "fixed_input_size", False) or config.input_size[-1] <= SMALL:
        return None, []
    try:
        model = timm.create_model(name, num_classes=10, img_size=SMALL).eval()
        with torch.no_grad():
            model(_inputs(SMALL)[0])
    except Exception:  # the architecture cannot be built or run at that size: its own size is used
        return None, []
    return model, [SMALL]


def check(name: str) -> str:
    """Builds the model with random weights and checks the properties of tests/test_torchvision.py, at the
    smallest of 64, 96, 128 and 224 pixels (and the multiple of its patch size above 64) that the model itself
    accepts (a model with a fixed size: built for 64 pixels where it takes ``img_size=``, else at its size).

    Two things about random weights are corrected, each only where it would make a check meaningless: a model
    whose output does not depend on its input at initialisation (timm initialises layer scales at 1e-5 and some
    heads at zero, and the signal vanishes) has those parameters revived (:func:`_revive`); a model whose own
    float32 output is as far from its float64 output as the masked model's (deep attention stacks at random
    weights) is checked in float64.

    Returns:
        str: what was adjusted ("" when nothing was), for the record.

    Raises:
        LayerMaskError: the conversion's refusal (UnsupportedLayerError/TracingError).
        AssertionError: a property that does not hold.
    """
    torch.manual_seed(0)
    model, sizes = _built_small(name)
    if model is None:
        model = timm.create_model(name, num_classes=10).eval()
        sizes = _sizes(model)
    with torch.no_grad():
        _randomize_norm_statistics(model)
    x, mask = _inputs(_smallest_size(model, sizes))
    notes = []
    if _input_independent(model, x):
        _revive(model)
        notes.append("vanishing parameters revived")
    try:
        _check_at(model, x, mask)
    except AssertionError as error:
        if "property 1" not in str(error) or not _ill_conditioned(model, x):
            raise
        _check_at(model.double(), x.double(), mask.double())
        notes.append(f"checked in float64 (float32: {error})")
    return "; ".join(notes)


def _check_at(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> None:
    masked = layer_masked(model)
    check_layer_masking(model, x, mask, masked, rtol=1e-4, check_padding=False)  # the sweep converts once
    with torch.no_grad():
        assert not torch.equal(masked(x, mask), masked(x, torch.ones_like(mask))), "masking changed nothing"


def _sizes(model: nn.Module) -> List[int]:
    start = input_size(model)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    aligned = [-(-start // patch) * patch] if isinstance(patch, int) and start % patch else []
    return sorted({start, *aligned, *(size for size in (96, 128, 224) if size > start)})


def _smallest_size(model: nn.Module, sizes: List[int]) -> int:
    for size in sizes:
        try:
            with torch.no_grad():
                model(_inputs(size)[0])
            return size
        except (RuntimeError, ValueError, AssertionError):
            if size == sizes[-1]:
                raise
    raise ValueError("no sizes to try")


def _input_independent(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(model(x), model(torch.flip(x, dims=(-1,)) + 1))


def _revive(model: nn.Module) -> None:
    """Sets parameters that initialisation leaves (almost) zero to values that pass a signal: scales (1-D, not
    biases: layer scales, zero-initialised norms) to one, weight tensors (zero-initialised heads) to
    ``N(0, 1/fan_in)``."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or parameter.abs().max() >= 1e-3:
                continue
            if parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / fan_in**0.5)


def _ill_conditioned(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the model's own float32 output is off its float64 output by more than the sweep's tolerance."""
    with torch.no_grad():
        single = model(x)
        double = model.double()(x.double())
    model.float()
    return float((single.double() - double).abs().max() / double.abs().max()) > 1e-4


def _inputs(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two images and per-image masks removing about half of the 8x8 patches."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=generator)
    cells = (torch.rand(2, 1, -(-size // 8), -(-size // 8), generator=generator) > 0.5).float()
    mask = cells.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :size, :size]
    return x, mask


RUN_LIMIT = 1_000_000_000
"""Parameters above which an architecture is converted on the meta device but not run (4 GB of float32 weights,
several copies during the checks: more than this 24 GiB machine holds for the largest ones)."""


def parameter_count(name: str) -> int:
    """The number of parameters of an architecture (built on the meta device: nothing is allocated)."""
    return sum(parameter.numel() for parameter in timm.create_model(name, device="meta").parameters())


def convert_only(name: str) -> None:
    """Converts the architecture built on the meta device (``torch.fx``: the rules are looked up, nothing runs).

    Raises:
        LayerMaskError: the conversion's refusal.
    """
    layer_masked(timm.create_model(name, num_classes=10, device="meta").eval(), capture="fx")


def _outcome(name: str, kind: str) -> Dict[str, str]:
    try:
        parameters = parameter_count(name) if kind == "other" else 0
        if parameters > RUN_LIMIT:
            convert_only(name)
            return {"kind": kind, "result": "converted, not run", "detail": f"{parameters:,} parameters"}
        adjusted = check(name)
    except LayerMaskError as error:
        return {"kind": kind, "result": "refused", "detail": f"{type(error).__name__}: {error}"}
    except AssertionError as error:
        return {"kind": kind, "result": "failed", "detail": str(error)}
    except Exception as error:  # the model itself fails to build or run at every size: reported, the sweep goes on
        if kind == "convolutional":
            raise
        return {"kind": kind, "result": "error", "detail": f"{type(error).__name__}: {str(error)[:300]}"}
    return {"kind": kind, "result": "converted", "detail": adjusted}


def sweep(
    names: List[str], log: bool = False, other: bool = False, record: Optional[Path] = None
) -> Dict[str, Dict[str, str]]:
    """Classifies and checks every architecture: ``{name: {"kind", "result", "detail"}}``.

    Args:
        names: the architectures.
        log: print one line per architecture.
        other: check the architectures that are not convolutional too (transformers, hybrids, token MLPs),
            through whichever capture path takes them (``layer_masked``'s ``capture="auto"``).
        record: a JSON-lines file: architectures already in it are not run again, new results are appended
            (a sweep of the 1,371 architectures takes hours and can be resumed).
    """
    results: Dict[str, Dict[str, str]] = read_record(record) if record is not None and record.exists() else {}
    for name in names:
        if name in results:
            continue
        start = time.perf_counter()
        convolutional, why = classify(name)
        if convolutional:
            results[name] = _outcome(name, "convolutional")
        elif other:
            results[name] = {**_outcome(name, "other"), "why": why}
        else:
            results[name] = {"kind": "other", "result": "skipped", "detail": why}
        results[name]["seconds"] = f"{time.perf_counter() - start:.1f}"
        if record is not None:
            with record.open("a") as file:
                file.write(json.dumps({"name": name, **results[name]}) + "\n")
        if log:
            entry = results[name]
            print(f"{name:48s} {entry['result']:9s} {entry['seconds']:>6s}s {entry['detail'][:150]}", flush=True)
    return results


def read_record(record: Path) -> Dict[str, Dict[str, str]]:
    """The results a sweep appended to ``record``."""
    entries = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return {entry.pop("name"): entry for entry in entries}


def report(results: Dict[str, Dict[str, str]]) -> str:
    """A markdown summary of a sweep's results: counts per kind and result, and each refusal or failure."""
    counts: Dict[Tuple[str, str], int] = {}
    for entry in results.values():
        counts[(entry["kind"], entry["result"])] = counts.get((entry["kind"], entry["result"]), 0) + 1
    lines = ["| kind | result | architectures |", "| --- | --- | --- |"]
    lines += [f"| {kind} | {result} | {count} |" for (kind, result), count in sorted(counts.items())]
    lines += ["", "| architecture | result | why |", "| --- | --- | --- |"]
    for name, entry in sorted(results.items()):
        if entry["result"] in ("refused", "failed", "error"):
            why = entry["detail"].split(". ")[0].replace("|", "/")[:220]
            lines.append(f"| {name} | {entry['result']} | {why} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="architectures (default: every one timm lists)")
    parser.add_argument("--classify", action="store_true", help="only say which architectures are convolutional")
    parser.add_argument("--all", action="store_true", help="check the architectures that are not convolutional too")
    parser.add_argument("--record", type=Path, help="JSON-lines file of results: resumed from, appended to")
    parser.add_argument("--report", action="store_true", help="print the markdown summary of --record and stop")
    args = parser.parse_args()
    if args.report:
        print(report(read_record(args.record)))
        return
    names = args.names or timm.list_models()
    if args.classify:
        for name in names:
            print(name, *classify(name), sep="\t", flush=True)
        return
    results = sweep(names, log=True, other=args.all, record=args.record)
    counts: Dict[str, int] = {}
    for entry in results.values():
        counts[f"{entry['kind']}/{entry['result']}"] = counts.get(f"{entry['kind']}/{entry['result']}", 0) + 1
    print(counts)


if __name__ == "__main__":
    main()
