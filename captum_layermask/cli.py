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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from .baseline import LayerMask
from .convert import layer_masked
from .errors import LayerMaskError
from .maskers import IMAGENET_MEAN, IMAGENET_STD, MASKER_NAMES
from .segmentation import SEGMENTER_NAMES, SLIC, Patches, Quickshift, segment_images

EVALUATE_DESCRIPTION = (
    "Measures how much each masking method distorts the model (paper section 4): removal curves of accuracy, class "
    "entropy and unchanged predictions with their AUC, shape bias, and LIME's top-k ablation accuracy, alignment "
    "score and top-k Jaccard. Writes results.md, results.csv and figures. With no arguments it evaluates the bundled "
    "demo model on held-out demo scenes, offline."
)
METHODS = ("lime", "kernelshap", "ablation", "occlusion")
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


def load_model(args: argparse.Namespace) -> tuple:
    """The model of ``--model``/``--weights``, in eval mode, with its class names and normalisation."""
    if args.model == "demo":
        from .demo import model as demo_model
        from .demo import shapes

        model = demo_model.ShapesResNet()
        load_state(model, Path(args.weights) if args.weights else demo_model.WEIGHTS, "the demo model")
        return model.eval(), shapes.CLASSES, shapes.MEAN, shapes.STD
    return load_torchvision(args.model, args.weights, args.num_classes)


def load_subject(args: argparse.Namespace) -> Subject:
    model, classes, mean, std = load_model(args)
    if args.model == "demo":
        from .demo import model as demo_model
        from .demo import shapes

        return Subject(model, read_image(args.image or demo_model.SCENE, args.size or shapes.SIZE), shapes.normalize, classes)
    if args.image is None:
        raise CommandError(f"--image is needed with --model {args.model} (the bundled scene is for the demo model).")
    return Subject(model, read_image(args.image, args.size or 224), _normalizer(mean, std), classes)


def segment(image: Tensor, how: str, file: Optional[Path]) -> Tensor:
    """Segment ids ``(1, 1, H, W)`` of an image in [0, 1]: 16x16 patches, SLIC or quickshift, or from a file."""
    height, width = image.shape[-2:]
    if file is None:
        segmenter = Patches() if how == "patches" else {"slic": SLIC, "quickshift": Quickshift}[how](mean=(0, 0, 0), std=(1, 1, 1))
        return segment_images(image, segmenter)[:, None]
    try:
        segments = torch.from_numpy(np.load(file)).long()
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot read segments {file}: {error}") from None
    if tuple(segments.shape) != (height, width):
        raise CommandError(f"segments in {file} have shape {tuple(segments.shape)}, but the image is {height}x{width}.")
    return segment_images(image, segments[None])[:, None]


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


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A staging folder beside ``out`` whose files move into ``out`` only if the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".layermask-", dir=out.parent))
    try:
        yield staging
        out.mkdir(exist_ok=True)
        for file in staging.iterdir():
            shutil.move(str(file), out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def explain(args: argparse.Namespace) -> Path:
    subject = load_subject(args)
    segments = segment(subject.image, args.segments, args.segments_file)
    with torch.no_grad():
        logits = subject.model(subject.normalize(subject.image))
    target = int(logits.argmax(1)) if args.target is None else args.target
    if not 0 <= target < logits.shape[1]:
        raise CommandError(f"target {target} is out of range: the model has {logits.shape[1]} classes (0 to {logits.shape[1] - 1}).")
    results = attribute(subject, segments, target, args)
    with staged_output(args.out) as staging:
        plot_explanation(subject, segments, results, target, args.top, staging / "explanation.png")
        torch.save({"attributions": results, "segments": segments, "target": target, "image": subject.image}, staging / "attributions.pt")
        for masking, attribution in results.items():
            np.save(staging / f"attributions_{masking}.npy", attribution[0].numpy())
        np.save(staging / "segments.npy", segments[0, 0].numpy())
    print(f"predicted '{subject.class_name(int(logits.argmax(1)))}'; explained '{subject.class_name(target)}'; wrote {args.out}/explanation.png")
    return args.out


# ---------------------------------------------------------------------------------------------------------------
# evaluating


def _image_files(folder: Path) -> List[tuple]:
    """``(path, class index)`` of an ImageNet-style folder: one subfolder per class, in sorted order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not folder.is_dir():
        raise CommandError(f"--images {folder} is not a folder; give a folder with one subfolder of images per class.")
    classes = sorted(entry.name for entry in folder.iterdir() if entry.is_dir())
    files = [(path, index) for index, name in enumerate(classes) for path in sorted((folder / name).iterdir()) if path.suffix.lower() in IMG_EXTENSIONS]
    if not files:
        raise CommandError(f"--images {folder} holds no images in class subfolders (<folder>/<class>/<image>).")
    return files


def read_object_mask(path: Path, size: int) -> Tensor:
    """An object mask image (non-zero on the object) as ``(size, size)`` bool, cropped like :func:`read_image`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as file:
            pixels = torch.from_numpy(np.asarray(file.convert("L")).copy())
    except FileNotFoundError:
        raise CommandError(f"no object mask {path}: --object-masks needs <masks>/<class>/<image name>.png for every image.") from None
    except (OSError, UnidentifiedImageError) as error:
        raise CommandError(f"cannot read object mask {path}: {error}") from None
    side = min(pixels.shape)
    pixels = torchvision.transforms.functional.center_crop(pixels[None], [side, side])
    return F.interpolate(pixels[None].float(), size=(size, size), mode="nearest")[0, 0] > 0


def load_evaluation_data(args: argparse.Namespace, mean: Sequence[float], std: Sequence[float], classes: Optional[Sequence[str]]):
    """The images of ``--images`` (or held-out demo scenes), their labels and optional object masks."""
    from .report import EvaluationData

    if args.images is None:
        if args.model != "demo":
            raise CommandError(f"--images is needed with --model {args.model} (the bundled scenes are for the demo model).")
        from .demo import shapes

        scenes = shapes.render(args.limit or 64, torch.Generator().manual_seed(args.data_seed), objects=1)
        return EvaluationData(shapes.normalize(scenes.images), scenes.labels[:, 0], scenes.object_masks[:, 0], mean, std, classes)
    files = _image_files(args.images)
    if args.limit and args.limit < len(files):
        chosen = torch.randperm(len(files), generator=torch.Generator().manual_seed(args.data_seed))[: args.limit]
        files = [files[i] for i in sorted(chosen.tolist())]
    size = args.size or 224
    images = torch.cat([read_image(path, size) for path, _ in files])
    labels = torch.tensor([label for _, label in files])
    masks = None
    if args.object_masks is not None:
        masks = torch.stack([read_object_mask(args.object_masks / path.parent.name / f"{path.stem}.png", size) for path, _ in files])
    return EvaluationData(_normalizer(mean, std)(images), labels, masks, mean, std, classes)


def evaluate_command(args: argparse.Namespace) -> Path:
    from .report import evaluate

    model, classes, mean, std = load_model(args)
    data = load_evaluation_data(args, mean, std, classes)
    with torch.no_grad():
        width = model(data.images[:1]).shape[1]
    if int(data.labels.max()) >= width:
        raise CommandError(f"labels go up to {int(data.labels.max())}, but the model has {width} classes: check the class folders or --num-classes.")
    report = evaluate(model, data, maskers=args.maskers, segmenters=args.segments, fractions=[i / (args.fractions - 1) for i in range(args.fractions)], lime_images=args.lime_images, diagnostic_images=args.diagnostic_images, n_samples=args.samples, k=args.top_k, batch_size=args.batch_size, seed=args.seed)
    with staged_output(args.out) as staging:
        (staging / "results.md").write_text(report.to_markdown())
        report.to_csv(staging / "results.csv")
        report.save_figures(staging, classes)
    print(report.to_markdown())
    print(f"wrote {args.out}/results.md, results.csv and figures")
    return args.out


# ---------------------------------------------------------------------------------------------------------------
# command line


def _subset(choices: Sequence[str], what: str) -> Callable[[str], List[str]]:
    def parse(value: str) -> List[str]:
        names = [name.strip() for name in value.split(",") if name.strip()]
        if not names or any(name not in choices for name in names):
            raise argparse.ArgumentTypeError(f"{what} are a comma-separated subset of {','.join(choices)}")
        return names

    return parse


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="'demo' (bundled, offline) or a torchvision classifier name, e.g. resnet50")
    parser.add_argument("--weights", help="state-dict file (loaded with weights_only=True) or a torchvision weights name, e.g. IMAGENET1K_V2")
    parser.add_argument("--num-classes", type=int, help="classes of a torchvision model whose weights file has another head")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermask", description="Perturbation-based explanations of CNNs with layer masking.")
    commands = parser.add_subparsers(dest="command", required=True)
    explain_parser = commands.add_parser("explain", help="explain one image under black, grey and layer masking", description=__doc__.split("\n\n")[1])
    _add_model_arguments(explain_parser)
    explain_parser.add_argument("--image", type=Path, help="image file (default: the bundled demo scene)")
    explain_parser.add_argument("--target", type=int, help="class index to explain (default: the top prediction)")
    explain_parser.add_argument("--method", choices=METHODS, default="lime")
    explain_parser.add_argument("--segments", choices=SEGMENTER_NAMES, default="patches", help="16x16 patches, SLIC (196) or quickshift, as in the paper")
    explain_parser.add_argument("--segments-file", type=Path, help=".npy array of shape (H, W) with a segment id per pixel")
    explain_parser.add_argument("--maskings", type=_subset(MASKINGS, "maskings"), default=list(MASKINGS), help="comma-separated subset of black,grey,layer")
    explain_parser.add_argument("--samples", type=int, default=500, help="perturbed samples for Lime and KernelShap (paper: 500)")
    explain_parser.add_argument("--per-eval", type=int, default=16, help="perturbations per forward pass")
    explain_parser.add_argument("--size", type=int, help="input resolution (default: 128 for the demo model, 224 otherwise)")
    explain_parser.add_argument("--top", type=int, default=5, help="segments highlighted each way")
    explain_parser.add_argument("--seed", type=int, default=0)
    explain_parser.add_argument("--out", type=Path, default=Path("explain-output"), help="output folder")
    explain_parser.set_defaults(run=explain)

    evaluate_parser = commands.add_parser("evaluate", help="measure missingness bias: removal curves, shape bias, LIME metrics", description=EVALUATE_DESCRIPTION)
    _add_model_arguments(evaluate_parser)
    evaluate_parser.add_argument("--images", type=Path, help="ImageNet-style folder <images>/<class>/<image> (default: held-out demo scenes)")
    evaluate_parser.add_argument("--object-masks", type=Path, help="folder <masks>/<class>/<image name>.png, non-zero on the object (enables shape bias and LIME alignment)")
    evaluate_parser.add_argument("--limit", type=int, help="evaluate on this many images (a seeded random subset of --images; demo: 64 scenes)")
    evaluate_parser.add_argument("--size", type=int, help="input resolution of --images (default 224)")
    evaluate_parser.add_argument("--maskers", type=_subset(MASKER_NAMES, "maskers"), default=["black", "grey", "layer"], help="comma-separated subset of " + ",".join(MASKER_NAMES))
    evaluate_parser.add_argument("--segments", type=_subset(SEGMENTER_NAMES, "segmenters"), default=["patches"], help="comma-separated subset of patches,slic,quickshift")
    evaluate_parser.add_argument("--fractions", type=int, default=11, help="points of the removal curves, from 0 to 1")
    evaluate_parser.add_argument("--lime-images", type=int, default=32, help="images explained with LIME for its metrics (0: none)")
    evaluate_parser.add_argument("--diagnostic-images", type=int, default=16, help="images for linearity, output collapse and feature magnitude (0: none)")
    evaluate_parser.add_argument("--samples", type=int, default=500, help="LIME samples per image (paper: 500)")
    evaluate_parser.add_argument("--top-k", type=int, help="segments taken by the top-k LIME metrics (default: a tenth of the segments, as the paper's 20 of 196)")
    evaluate_parser.add_argument("--batch-size", type=int, default=64)
    evaluate_parser.add_argument("--seed", type=int, default=0, help="seed of the random removal order and of LIME's samples")
    evaluate_parser.add_argument("--data-seed", type=int, default=1000, help="seed of the demo scenes and of the --limit subset")
    evaluate_parser.add_argument("--out", type=Path, default=Path("evaluate-output"), help="output folder")
    evaluate_parser.set_defaults(run=evaluate_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")  # figures go to files only
    try:
        args.run(args)
    except (CommandError, LayerMaskError) as error:
        print(f"layermask: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
