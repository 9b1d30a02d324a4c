"""onnxruntime (CPU, 2 threads) against PyTorch eager layer masking: ResNet-50, batch 8, 224x224 (issue: ONNX).

Exports the layer-masked ResNet-50 with ``export_masked`` (verified against PyTorch), then times both on the
same inputs (half of the 16x16 patches removed), alternately; prints medians and the median of per-pair ratios.

    .venv/bin/python benchmarks/onnx_speed.py [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnxruntime
import torch
import torchvision
from _timing import paired_times, parse_arguments, print_medians, ratio_of_pairs

from captum_layermask import layer_masked
from onnx_export import export_masked
from onnx_export.export import verification_masks

BATCH, SIZE = 8, 224


def main() -> None:
    args = parse_arguments(__doc__.splitlines()[0], "--repeats", 10)
    provider = "CUDAExecutionProvider" if args.device.type == "cuda" else "CPUExecutionProvider"
    if provider not in onnxruntime.get_available_providers():
        raise SystemExit(f"--device {args.device}: onnxruntime here has no {provider} (install onnxruntime-gpu).")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    masked = layer_masked(model)
    with tempfile.TemporaryDirectory() as folder:
        path = export_masked(model, Path(folder) / "resnet50.onnx", input_shape=(BATCH, 3, SIZE, SIZE), verify_batch=2)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(str(path), options, providers=[provider])
    image = torch.randn(BATCH, 3, SIZE, SIZE)
    mask = verification_masks(BATCH, SIZE, SIZE)["half removed"]
    feeds = {"image": image.numpy(), "mask": mask.numpy()}
    masked.to(args.device)
    on_device = image.to(args.device), mask.to(args.device)
    runs = {"PyTorch eager": lambda: masked(*on_device), "onnxruntime": lambda: session.run(["logits"], feeds)}
    times = paired_times(runs, args.repeats, device=args.device)
    eager, ort = times.values()
    print(
        f"Layer-masked ResNet-50, batch {BATCH}, {SIZE}x{SIZE}, half of the 16x16 patches removed, {args.device}, {args.threads} threads"
    )
    print_medians(times)
    print(f"  onnxruntime / eager (median of pairs): {ratio_of_pairs(ort, eager):.2f}")


if __name__ == "__main__":
    main()
