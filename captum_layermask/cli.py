"""The ``layermask`` command (also ``python -m captum_layermask``).

``layermask explain`` explains an image's prediction with Lime, KernelShap, FeatureAblation or Occlusion under
black, grey and layer masking side by side, and writes a figure in the style of the paper's Figure 8 (top
segments for the class in green, against it in red) with the raw attributions. With no arguments it explains
the bundled demo scene with the bundled demo model, offline.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .baseline import LayerMask
from .convert import layer_masked
from .errors import LayerMaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
METHODS = ("lime", "kernelshap", "ablation", "occlusion")
SEGMENTERS = ("patches", "slic", "quickshift")
MASKINGS = ("black", "grey", "layer")


class CommandError(Exception):
    """A user mistake on the command line: reported as one line on stderr, exit status 2."""


@dataclass
class Subject:
    """The model and the image to explain, preprocessed."""

    model: nn.Module
    image: Tensor  # (1, 3, H, W) in [0, 1], what is shown
    normalize: Callable[[Tensor], Tensor]
    classes: Optional[Sequence[str]]  # None: classes are shown by index

    def class_name(self, index: int) -> str:
        return self.classes[index] if self.classes is not None and index < len(self.classes) else str(index)


# ---------------------------------------------------------------------------------------------------------------
# loading


def read_image(path: Path, size: int) -> Tensor:
    """An RGB image file as ``(1, 3, size, size)`` in [0, 1] (center crop to a square, then resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            pixels = np.asarray(file.convert("RGB"))
    except (OSError, UnidentifiedImageError) as error:
        raise CommandError(f"cannot read image {path}: {error}") from None
    image = torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    side = min(image.shape[-2:])
    image = torchvision.transforms.functional.center_crop(image, [side, side])
    image = image[None].float() / 255
    return F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable[[Tensor], Tensor]:
    mean_tensor, std_tensor = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    return lambda image: (image - mean_tensor) / std_tensor


def load_state(model: nn.Module, path: Path, name: str) -> None:
    """Loads a state dict with ``weights_only=True`` into ``model``, with one-line errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise CommandError(f"cannot load {path}: it is not a state dict that torch.load(weights_only=True) reads.") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        raise CommandError(f"weights file {path} does not fit {name}: {details[0]} (see --num-classes)") from None


def load_torchvision(name: str, weights: Optional[str], num_classes: Optional[int]) -> tuple:
    """A torchvision classifier with weights from a local state-dict file or a weights enum name."""
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise CommandError(f"unknown model '{name}'; use 'demo' or a torchvision classifier such as resnet50.")
    if weights is None:
        raise CommandError(f"--weights is needed for {name}: a state-dict file or a weights name such as IMAGENET1K_V1.")
    path = Path(weights)
    if path.exists():
        model = torchvision.models.get_model(name, **({"num_classes": num_classes} if num_classes else {}))
        load_state(model, path, name)
        return model.eval(), None, IMAGENET_MEAN, IMAGENET_STD
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        raise CommandError(f"--weights {weights} is neither a file nor a weights name of {name}.") from None
    model = torchvision.models.get_model(name, weights=enum)
    return model.eval(), enum.meta["categories"], IMAGENET_MEAN, IMAGENET_STD


def load_subject(args: argparse.Namespace) -> Subject:
    if args.model == "demo":
        from .demo import model as demo_model
        from .demo import shapes

        model = demo_model.ShapesResNet()
        load_state(model, Path(args.weights) if args.weights else demo_model.WEIGHTS, "the demo model")
        model.eval()
        image = read_image(args.image or demo_model.SCENE, args.size or shapes.SIZE)
        return Subject(model, image, shapes.normalize, shapes.CLASSES)
    model, classes, mean, std = load_torchvision(args.model, args.weights, args.num_classes)
    if args.image is None:
        raise CommandError(f"--image is needed with --model {args.model} (the bundled scene is for the demo model).")
    return Subject(model, read_image(args.image, args.size or 224), _normalizer(mean, std), classes)


def patch_segments(height: int, width: int, patch: int = 16) -> Tensor:
    """Feature ids of square patches in row-major order, shape ``(1, 1, height, width)``."""
    rows, columns = torch.arange(height) // patch, torch.arange(width) // patch
    return (rows[:, None] * (-(-width // patch)) + columns[None, :])[None, None]


def segment(image: Tensor, how: str, file: Optional[Path]) -> Tensor:
    """Feature ids ``(1, 1, H, W)``: 16x16 patches, SLIC (196 segments) or quickshift (the paper's settings)."""
    height, width = image.shape[-2:]
    if file is not None:
        try:
            segments = torch.from_numpy(np.load(file)).long()
        except (OSError, ValueError) as error:
            raise CommandError(f"cannot read segments {file}: {error}") from None
        if tuple(segments.shape) != (height, width):
            raise CommandError(f"segments in {file} have shape {tuple(segments.shape)}, but the image is {height}x{width}.")
    elif how == "patches":
        segments = patch_segments(height, width)[0, 0]
    else:
        from skimage.segmentation import quickshift, slic

        pixels = image[0].permute(1, 2, 0).double().numpy()
        labels = slic(pixels, n_segments=196, start_label=0) if how == "slic" else quickshift(pixels, kernel_size=2, max_dist=200, ratio=0.2)
        segments = torch.from_numpy(labels).long()
    _, segments = torch.unique(segments, return_inverse=True)  # consecutive ids from 0
    return segments[None, None]


# ---------------------------------------------------------------------------------------------------------------
# explaining


def attribute(subject: Subject, segments: Tensor, target: int, args: argparse.Namespace) -> Dict[str, Tensor]:
    """Attributions of the target class under each masking, with the same random samples."""
    from captum.attr import FeatureAblation, KernelShap, Lime, Occlusion

    x = subject.normalize(subject.image)
    fills = {"black": subject.normalize(torch.zeros(1, 3, 1, 1)), "grey": 0.0, "layer": LayerMask()}
    masked = layer_masked(subject.model)
    results = {}
    for masking in args.maskings:
        forward = masked if masking == "layer" else subject.model
        baseline = fills[masking]
        torch.manual_seed(args.seed)
        common = dict(target=target, baselines=baseline, perturbations_per_eval=args.per_eval, show_progress=True)
        print(f"{args.method}, {masking} masking:", file=sys.stderr)
        if args.method == "lime":
            result = Lime(forward).attribute(x, feature_mask=segments, n_samples=args.samples, **common)
        elif args.method == "kernelshap":
            result = KernelShap(forward).attribute(x, feature_mask=segments, n_samples=args.samples, **common)
        elif args.method == "ablation":
            result = FeatureAblation(forward).attribute(x, feature_mask=segments, **common)
        else:
            result = Occlusion(forward).attribute(x, sliding_window_shapes=(3, 16, 16), strides=(3, 8, 8), **common)
        results[masking] = result.detach()
    return results


def segment_scores(attribution: Tensor, segments: Tensor) -> Tensor:
    """Mean attribution of each segment (summed over channels)."""
    per_pixel = attribution[0].sum(0).flatten()
    ids = segments.flatten()
    count = torch.bincount(ids).clamp(min=1)
    return torch.bincount(ids, weights=per_pixel.double()) / count


def plot_explanation(subject: Subject, segments: Tensor, results: Dict[str, Tensor], target: int, top: int, path: Path) -> None:
    """Paper Figure 8 style: per masking, the top segments for the class in green and against it in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = subject.image[0].permute(1, 2, 0).numpy()
    titles = {"black": "black fill", "grey": "grey fill", "layer": "layer masking"}
    fig, axes = plt.subplots(1, len(results) + 1, figsize=(3.2 * (len(results) + 1), 3.6))
    axes[0].imshow(image)
    axes[0].set_title(f"input; class '{subject.class_name(target)}'")
    for axis, (masking, attribution) in zip(axes[1:], results.items()):
        scores = segment_scores(attribution, segments)
        order = torch.argsort(scores, descending=True)
        positive = [int(s) for s in order[:top] if scores[s] > 0]
        negative = [int(s) for s in order.flip(0)[:top] if scores[s] < 0]
        shown = 0.35 * image + 0.25
        seg = segments[0, 0].numpy()
        for ids, colour in ((positive, (0.1, 0.8, 0.2)), (negative, (0.9, 0.15, 0.1))):
            region = np.isin(seg, ids)
            shown[region] = 0.55 * image[region] + 0.45 * np.array(colour)
        axis.imshow(shown)
        axis.set_title(titles[masking])
    for axis in axes:
        axis.axis("off")
    fig.suptitle(f"top {top} segments for (green) and against (red) '{subject.class_name(target)}'")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def explain(args: argparse.Namespace) -> Path:
    subject = load_subject(args)
    segments = segment(subject.image, args.segments, args.segments_file)
    with torch.no_grad():
        logits = subject.model(subject.normalize(subject.image))
    target = int(logits.argmax(1)) if args.target is None else args.target
    if not 0 <= target < logits.shape[1]:
        raise CommandError(f"target {target} is out of range: the model has {logits.shape[1]} classes (0 to {logits.shape[1] - 1}).")
    results = attribute(subject, segments, target, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".layermask-", dir=args.out.parent))
    try:
        plot_explanation(subject, segments, results, target, args.top, staging / "explanation.png")
        torch.save({"attributions": results, "segments": segments, "target": target, "image": subject.image}, staging / "attributions.pt")
        for masking, attribution in results.items():
            np.save(staging / f"attributions_{masking}.npy", attribution[0].numpy())
        np.save(staging / "segments.npy", segments[0, 0].numpy())
        args.out.mkdir(exist_ok=True)
        for file in staging.iterdir():
            shutil.move(str(file), args.out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"predicted '{subject.class_name(int(logits.argmax(1)))}'; explained '{subject.class_name(target)}'; wrote {args.out}/explanation.png")
    return args.out


# ---------------------------------------------------------------------------------------------------------------
# command line


def _maskings(value: str) -> List[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in MASKINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"maskings are a comma-separated subset of {', '.join(MASKINGS)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermask", description="Perturbation-based explanations of CNNs with layer masking.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain_parser = commands.add_parser("explain", help="explain one image under black, grey and layer masking", description=__doc__.split("\n\n")[1])
    explain_parser.add_argument("--model", default="demo", help="'demo' (bundled, offline) or a torchvision classifier name, e.g. resnet50")
    explain_parser.add_argument("--weights", help="state-dict file (loaded with weights_only=True) or a torchvision weights name, e.g. IMAGENET1K_V2")
    explain_parser.add_argument("--num-classes", type=int, help="classes of a torchvision model whose weights file has another head")
    explain_parser.add_argument("--image", type=Path, help="image file (default: the bundled demo scene)")
    explain_parser.add_argument("--target", type=int, help="class index to explain (default: the top prediction)")
    explain_parser.add_argument("--method", choices=METHODS, default="lime")
    explain_parser.add_argument("--segments", choices=SEGMENTERS, default="patches", help="16x16 patches, SLIC (196) or quickshift, as in the paper")
    explain_parser.add_argument("--segments-file", type=Path, help=".npy array of shape (H, W) with a segment id per pixel")
    explain_parser.add_argument("--maskings", type=_maskings, default=list(MASKINGS), help="comma-separated subset of black,grey,layer")
    explain_parser.add_argument("--samples", type=int, default=500, help="perturbed samples for Lime and KernelShap (paper: 500)")
    explain_parser.add_argument("--per-eval", type=int, default=16, help="perturbations per forward pass")
    explain_parser.add_argument("--size", type=int, help="input resolution (default: 128 for the demo model, 224 otherwise)")
    explain_parser.add_argument("--top", type=int, default=5, help="segments highlighted each way")
    explain_parser.add_argument("--seed", type=int, default=0)
    explain_parser.add_argument("--out", type=Path, default=Path("explain-output"), help="output folder")
    explain_parser.set_defaults(run=explain)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, LayerMaskError) as error:
        print(f"layermask: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
