"""Cost of layer masking: ResNet-50 (or any torchvision/timm model), batch 8, 224x224, half of the 16x16 patches
removed.

Times the plain and the layer-masked forward pass side by side (no_grad, each masked pass right after a plain
one; the time ratio is the median of the per-pair ratios, which cancels the slow drifts of a shared machine)
and each one's peak tensor memory (bytes held by tensors allocated during the pass, from the profiler's
allocation events; the model's weights and the inputs are not counted). Ratios are what stays
comparable across machines.

    .venv/bin/python benchmarks/engine_speed.py [--model resnet50 | --model timm/tf_efficientnet_b0]
        [--repeats 15] [--threads 2] [--device cpu | cuda] [--channels-last]
    .venv/bin/python benchmarks/engine_speed.py --model hf/vit   # a Hugging Face model at its default config
        (ViT-Base/16 for vit), captured by torch.export: the first call's capture is reported separately
    .venv/bin/python benchmarks/engine_speed.py --model deeplabv3_mobilenet_v3_large   # a segmentation model
    .venv/bin/python benchmarks/engine_speed.py --model fasterrcnn_mobilenet_v3_large_320_fpn   # a detector, at
        320x320 (converted by parts; a list of 8 images and their masks)
"""

from __future__ import annotations

import statistics
import time

import torch
import torchvision
from _timing import paired_times, parse_arguments, ratio_of_pairs, synchronize
from torch.profiler import ProfilerActivity, profile

from captum_layermask import layer_masked
from captum_layermask.core import native

BATCH, SIZE, PATCH = 8, 224, 16
SEGMENTATION = torchvision.models.list_models(module=torchvision.models.segmentation)
DETECTION = torchvision.models.list_models(module=torchvision.models.detection)
DETECTION_SIZE = 320


def build(name: str) -> torch.nn.Module:
    """A torchvision model by name, a timm one as ``timm/<name>`` or a Hugging Face classifier as
    ``hf/<model type>`` (its default configuration), with random weights."""
    if name.startswith("hf/"):
        import transformers

        config = transformers.AutoConfig.for_model(name.removeprefix("hf/"))
        return transformers.AutoModelForImageClassification.from_config(config).eval()
    if name.startswith("timm/"):
        import timm

        return timm.create_model(name.removeprefix("timm/")).eval()
    if name in SEGMENTATION or name in DETECTION:
        return torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    return torchvision.models.get_model(name).eval()


def size_of(name: str) -> int:
    return DETECTION_SIZE if name in DETECTION else SIZE


def setup(
    seed: int = 0, name: str = "resnet50", device: torch.device = torch.device("cpu"), channels_last: bool = False
):
    torch.manual_seed(seed)
    model, size = build(name).to(device), size_of(name)
    x = torch.randn(BATCH, 3, size, size).to(device)
    if channels_last:  # the weights and the input in channels-last memory (both models)
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    grid = torch.rand(BATCH, 1, size // PATCH, size // PATCH).argsort(-1).argsort(-1) < (size // PATCH) // 2
    mask = grid.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).to(device)  # half of each row of patches
    if name.startswith("hf/"):
        return (lambda images: model(images).logits), layer_masked(model, output="logits"), x, mask
    if name in DETECTION:  # images in [0, 1], as lists (the detector's transform resizes them to 320)
        masked = layer_masked(model)
        return (
            lambda images: model(list(images.sigmoid())),
            lambda images, masks: masked(list(images.sigmoid()), list(masks)),
            x,
            mask,
        )
    if name in SEGMENTATION:  # the per-pixel logits, after the final upsampling
        return (lambda images: model(images)["out"]), layer_masked(model, output="out"), x, mask
    return model, layer_masked(model), x, mask


def peak_tensor_memory_mib(function, device: torch.device = torch.device("cpu")) -> float:
    """Peak of the bytes held by tensors allocated during one call, from the profiler's allocation events (on a
    GPU: CUDA's peak allocation during the call, above what was allocated before it)."""
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        function()
    changes = []
    for event in profiler.events():
        if event.name == "[memory]":  # frees, recorded on their own
            changes.append((event.time_range.start, event.cpu_memory_usage))
        elif event.self_cpu_memory_usage:
            changes.append((event.time_range.start, event.self_cpu_memory_usage))
    held = peak = 0
    for _, change in sorted(changes):
        held += change
        peak = max(peak, held)
    return peak / 2**20


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], "--repeats", 15, model="resnet50")
    model, masked, x, mask = setup(name=args.model, device=args.device, channels_last=args.channels_last)
    with torch.no_grad():
        start = time.perf_counter()
        masked(x, mask)  # a model captured by torch.export converts at its first call
        synchronize(args.device)
        first = time.perf_counter() - start
    runs = {"plain": lambda: model(x), "masked": lambda: masked(x, mask)}
    times = paired_times(runs, args.repeats, warmup=2, device=args.device)
    with torch.no_grad():
        plain_mem = peak_tensor_memory_mib(lambda: model(x), args.device)
        layer_mem = peak_tensor_memory_mib(lambda: masked(x, mask), args.device)
    plain, layer = statistics.median(times["plain"]), statistics.median(times["masked"])
    time_ratio = ratio_of_pairs(times["masked"], times["plain"])
    print(
        f"{args.model}, batch {BATCH}, {size_of(args.model)}x{size_of(args.model)}, half of the {PATCH}x{PATCH} "
        "patches removed, "
        f"{args.device}, {args.threads} threads, torch {torch.__version__}"
        + (", channels-last" if args.channels_last else "")
        + f"; neighbor padding: {native.status()}"
    )
    print(f"{'':29}{'plain':>10}{'layer-masked':>14}{'ratio':>8}")
    print(f"{'forward time (s)':29}{plain:>10.3f}{layer:>14.3f}{time_ratio:>8.2f}")
    print(f"{'peak tensor memory (MiB)':29}{plain_mem:>10.0f}{layer_mem:>14.0f}{layer_mem / plain_mem:>8.2f}")
    print(f"first masked call (s): {first:.2f} (capture and conversion included where the model is exported)")


if __name__ == "__main__":
    main()
