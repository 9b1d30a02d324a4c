"""``python -m onnx_export --model resnet50 --weights path.pth --out model.onnx``.

Exports a torchvision classifier with layer masking, checks the ONNX model, and verifies it in onnxruntime
against PyTorch (full, half and 90% removed masks) before reporting success.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captum_layermask import LayerMaskError
from captum_layermask.cli import CommandError, load_torchvision

from .export import ExportError, export_masked


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnx_export", description=__doc__.strip().splitlines()[2])
    parser.add_argument("--model", required=True, help="a torchvision classifier name, e.g. resnet50")
    parser.add_argument("--weights", required=True, help="state-dict file (weights_only=True) or a torchvision weights name")
    parser.add_argument("--num-classes", type=int, help="classes of a weights file whose head differs from ImageNet's")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of the example input (the batch stays dynamic)")
    parser.add_argument("--opset", type=int, help="default-domain opset, 18 to 23")
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of making it dynamic")
    args = parser.parse_args(argv)
    try:
        model, _, _, _ = load_torchvision(args.model, args.weights, args.num_classes)
        path = export_masked(model, args.out, input_shape=(args.batch, 3, args.size, args.size), opset=args.opset, dynamic_batch=not args.static_batch)
    except (CommandError, LayerMaskError, ExportError) as error:
        print(f"onnx_export: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): inputs image, mask; output logits; verified against PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
