"""``python -m onnx_export --model resnet50 --weights path.pth --out model.onnx``.

Exports a torchvision classifier (or the bundled demo model) with layer masking, checks the ONNX model, and
verifies it in onnxruntime against PyTorch (full, half and 90% removed masks) before writing the file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from captum_layermask import LayerMaskError
from captum_layermask.weights import load_classifier

from .export import SUPPORTED_OPSETS, ExportError, export_masked


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def build_parser() -> argparse.ArgumentParser:
    description = " ".join(__doc__.strip().split("\n\n")[1].split())
    parser = argparse.ArgumentParser(prog="python -m onnx_export", description=description)
    parser.add_argument(
        "--model", required=True, help="'demo' (the bundled model) or a torchvision classifier name, e.g. resnet50"
    )
    parser.add_argument(
        "--weights", help="state-dict file (weights_only=True) or a torchvision weights name (needed except for demo)"
    )
    parser.add_argument(
        "--num-classes", type=_positive, help="classes of a weights file whose head differs from ImageNet's"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the .onnx file to write (an existing file is kept unless --overwrite)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument(
        "--size", type=_positive, help="input height and width (default: the model's, 224 or 128 for demo)"
    )
    parser.add_argument(
        "--batch", type=_positive, default=1, help="batch size of the example input (the batch stays dynamic)"
    )
    parser.add_argument(
        "--opset", type=int, help=f"default-domain opset, {SUPPORTED_OPSETS.start} to {SUPPORTED_OPSETS.stop - 1}"
    )
    parser.add_argument("--static-batch", action="store_true", help="fix the batch size instead of making it dynamic")
    return parser


def main(argv=None) -> int:
    """Runs the command; mistakes print one ``onnx_export: error:`` line and return 2."""
    args = build_parser().parse_args(argv)
    try:
        if args.out.is_dir():
            raise ExportError(f"--out {args.out} is a folder; give the path of the .onnx file to write.")
        if args.out.exists() and not args.overwrite:
            raise ExportError(f"{args.out} exists; pass --overwrite to replace it, or choose another --out.")
        classifier = load_classifier(args.model, args.weights, args.num_classes)
        size = args.size or classifier.size
        path = export_masked(
            classifier.model,
            args.out,
            input_shape=(args.batch, 3, size, size),
            opset=args.opset,
            dynamic_batch=not args.static_batch,
        )
    except (LayerMaskError, ExportError) as error:
        print(f"onnx_export: error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): inputs image, mask; output logits; verified against PyTorch"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
