"""Classifiers, segmentation models and detectors from local weights files: torchvision models and the bundled demo
models.

Used by the ``layermask`` command and by ``python -m onnx_export``. Weights are read with
``torch.load(..., weights_only=True)`` only; nothing is downloaded unless a torchvision weights name is given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torchvision
from torch import nn

from .core.errors import LayerMaskError
from .evaluation.normalization import IMAGENET_MEAN, IMAGENET_STD


class WeightsError(LayerMaskError):
    """A model name, weights file or weights name that cannot be loaded."""


@dataclass
class Classifier:
    """A classifier (or segmentation model) in eval mode with what its inputs need.

    Attributes:
        model: the module.
        classes: the class names, or None (classes shown by index).
        mean, std: the per-channel normalisation its inputs expect.
        size: its default input resolution.
        output: the part of its output that holds the class scores (``"out"`` for torchvision's segmentation
            models), None for the output itself.
        background: a segmentation model's background class, None for a classifier.
    """

    model: nn.Module
    classes: Optional[Sequence[str]]
    mean: Sequence[float]
    std: Sequence[float]
    size: int
    output: Optional[Any] = None
    background: Optional[int] = None


def load_state(model: nn.Module, path: Path, name: str) -> None:
    """Loads a state-dict file into ``model`` with ``weights_only=True``.

    Raises:
        WeightsError: if the file is not a state dict that ``weights_only`` loading reads, or does not fit.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise WeightsError(
            f"cannot load {path}: it is not a state dict that torch.load(weights_only=True) reads."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()] or [str(error)]
        raise WeightsError(f"weights file {path} does not fit {name}: {details[0]} (see --num-classes)") from None


def demo_classifier(weights: Optional[Path] = None) -> Classifier:
    """The bundled demo model (procedural shapes, 128x128), with its bundled weights or a weights file."""
    from .demo import model as demo_model
    from .demo import shapes

    model = demo_model.ShapesResNet()
    load_state(model, Path(weights) if weights else demo_model.WEIGHTS, "the demo model")
    return Classifier(model.eval(), shapes.CLASSES, shapes.MEAN, shapes.STD, shapes.SIZE)


def torchvision_classifier(name: str, weights: Optional[str], num_classes: Optional[int] = None) -> Classifier:
    """A torchvision classifier with weights from a state-dict file or a torchvision weights name.

    Raises:
        WeightsError: for an unknown model, missing weights, a file that does not fit, or a weights name that
            cannot be downloaded.
    """
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise WeightsError(f"unknown model '{name}'; use 'demo' or a torchvision classifier such as resnet50.")
    if weights is None:
        raise WeightsError(
            f"--weights is needed for {name}: a state-dict file or a weights name such as IMAGENET1K_V1."
        )
    path = Path(weights)
    if path.exists():
        model = torchvision.models.get_model(name, **({"num_classes": num_classes} if num_classes else {}))
        load_state(model, path, name)
        return Classifier(model.eval(), None, IMAGENET_MEAN, IMAGENET_STD, 224)
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        raise WeightsError(f"--weights {weights} is neither a file nor a weights name of {name}.") from None
    try:
        model = torchvision.models.get_model(name, weights=enum)
    except OSError as error:  # URLError and other download failures
        reason = getattr(error, "reason", error)
        raise WeightsError(
            f"cannot download the {weights} weights of {name} ({reason}); download them elsewhere and pass the file."
        ) from None
    return Classifier(model.eval(), enum.meta["categories"], IMAGENET_MEAN, IMAGENET_STD, 224)


def load_classifier(name: str, weights: Optional[str] = None, num_classes: Optional[int] = None) -> Classifier:
    """``"demo"`` (the bundled model; ``weights`` optional) or a torchvision classifier name."""
    if name == "demo":
        return demo_classifier(Path(weights) if weights else None)
    return torchvision_classifier(name, weights, num_classes)


def demo_segmenter(weights: Optional[Path] = None) -> Classifier:
    """The bundled demo segmentation model (procedural shapes, 128x128; class 0 is the background)."""
    from .demo import model as demo_model
    from .demo import shapes

    model = demo_model.ShapesSegmenter()
    load_state(model, Path(weights) if weights else demo_model.SEGMENTER_WEIGHTS, "the demo segmentation model")
    classes = demo_model.SEGMENTATION_CLASSES
    return Classifier(model.eval(), classes, shapes.MEAN, shapes.STD, shapes.SIZE, background=0)


def torchvision_segmenter(name: str, weights: Optional[str], num_classes: Optional[int] = None) -> Classifier:
    """A torchvision segmentation model (``fcn_resnet50``, ``deeplabv3_mobilenet_v3_large``, ...) with weights from
    a state-dict file or a torchvision weights name; its scores are its ``"out"`` output, class 0 the background.

    Raises:
        WeightsError: for an unknown model, missing weights or a file that does not fit.
    """
    segmentation = torchvision.models.segmentation
    if name not in torchvision.models.list_models(module=segmentation):
        raise WeightsError(
            f"unknown segmentation model '{name}'; use 'demo' or a torchvision one such as deeplabv3_resnet50."
        )
    if weights is None:
        raise WeightsError(f"--weights is needed for {name}: a state-dict file or a weights name.")
    path = Path(weights)
    if path.exists():
        options = {"num_classes": num_classes} if num_classes else {}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, aux_loss=None, **options)
        load_state(model, path, name)
        return Classifier(model.eval(), None, IMAGENET_MEAN, IMAGENET_STD, 224, output="out", background=0)
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        raise WeightsError(f"--weights {weights} is neither a file nor a weights name of {name}.") from None
    model = torchvision.models.get_model(name, weights=enum)
    categories = enum.meta["categories"]
    return Classifier(model.eval(), categories, IMAGENET_MEAN, IMAGENET_STD, 520, output="out", background=0)


def demo_detector(weights: Optional[Path] = None) -> Classifier:
    """The bundled demo detector (FCOS on procedural shapes, 128x128; label 0 is the background). It takes images
    in [0, 1] and normalises them itself."""
    from .demo import model as demo_model
    from .demo import shapes

    model = demo_model.shapes_detector()
    load_state(model, Path(weights) if weights else demo_model.DETECTOR_WEIGHTS, "the demo detector")
    classes = demo_model.SEGMENTATION_CLASSES
    return Classifier(model.eval(), classes, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), shapes.SIZE, background=0)


def torchvision_detector(name: str, weights: Optional[str], num_classes: Optional[int] = None) -> Classifier:
    """A torchvision detector (``fasterrcnn_mobilenet_v3_large_320_fpn``, ``retinanet_resnet50_fpn``, ...) with
    weights from a state-dict file or a torchvision weights name. It takes images in [0, 1] (its transform
    normalises and resizes them).

    Raises:
        WeightsError: for an unknown model, missing weights or a file that does not fit.
    """
    if name not in torchvision.models.list_models(module=torchvision.models.detection):
        raise WeightsError(
            f"unknown detector '{name}'; use 'demo' or a torchvision one such as retinanet_resnet50_fpn."
        )
    if weights is None:
        raise WeightsError(f"--weights is needed for {name}: a state-dict file or a weights name.")
    path, raw = Path(weights), ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    if path.exists():
        options = {"num_classes": num_classes} if num_classes else {}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **options)
        load_state(model, path, name)
        return Classifier(model.eval(), None, *raw, 512, background=0)
    try:
        enum = torchvision.models.get_model_weights(name)[weights]
    except KeyError:
        raise WeightsError(f"--weights {weights} is neither a file nor a weights name of {name}.") from None
    model = torchvision.models.get_model(name, weights=enum)
    return Classifier(model.eval(), enum.meta["categories"], *raw, 512, background=0)


def load_model(name: str, weights: Optional[str], num_classes: Optional[int], task: str) -> Classifier:
    """A classifier (``task="classification"``), a segmentation model (``"segmentation"``) or a detector
    (``"detection"``) by name."""
    if task == "detection":
        return (
            demo_detector(Path(weights) if weights else None)
            if name == "demo"
            else torchvision_detector(name, weights, num_classes)
        )
    if task == "segmentation":
        return (
            demo_segmenter(Path(weights) if weights else None)
            if name == "demo"
            else torchvision_segmenter(name, weights, num_classes)
        )
    return load_classifier(name, weights, num_classes)
