"""Trains a bundled demo model from a seed: ``python -m captum_layermask.demo.train [--model vit]`` (a few minutes
on 2 CPU cores).

Every training batch is freshly rendered (no image is seen twice); accuracy is measured on 2,000 held-out scenes
rendered from another seed (for the segmentation model: mean IoU over its 7 classes; for the detector: mAP at
IoU 0.5 over the 6 shapes on 1,000 scenes; half of those scenes with two objects). Writes ``shapes_resnet.pt``
(or ``shapes_vit.pt``, ``shapes_hf_vit.pt``, ``shapes_hf_resnet.pt``, ``shapes_segmenter.pt``,
``shapes_detector.pt``; state dict, float32) and, for the ResNet, the demo scene next to this file. The Hugging
Face ViT is distilled from the bundled ResNet (``DISTILLED``); the segmentation model and the detector start from
its trunk. Same seed and thread count, same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..evaluation.dense import confusion
from ..evaluation.dense import mean_iou as dense_mean_iou
from ..evaluation.detection import mean_average_precision
from . import shapes
from .model import (
    DETECTOR_WEIGHTS,
    HF_RESNET_WEIGHTS,
    HF_VIT_WEIGHTS,
    SCENE,
    SEGMENTER_WEIGHTS,
    VIT_WEIGHTS,
    WEIGHTS,
    ShapesResNet,
    ShapesSegmenter,
    load_demo_model,
    shapes_detector,
    shapes_hf_resnet,
    shapes_hf_vit,
    shapes_vit,
)

MODELS = {
    "resnet": (ShapesResNet, WEIGHTS, 3e-3),
    "vit": (shapes_vit, VIT_WEIGHTS, 5e-4),
    "hf-vit": (shapes_hf_vit, HF_VIT_WEIGHTS, 2e-3),
    "hf-resnet": (shapes_hf_resnet, HF_RESNET_WEIGHTS, 3e-3),
    "segmenter": (ShapesSegmenter, SEGMENTER_WEIGHTS, 3e-3),
    "detector": (shapes_detector, DETECTOR_WEIGHTS, 3e-3),
}
"""name: (constructor, weights file, peak learning rate)"""

DISTILLED = {"hf-vit"}
"""Models started from the bundled demo ResNet's trunk and trained to match its predicted probabilities as well
as the labels (a ViT learns the shapes from far fewer scenes that way)."""


def warm_start(model: nn.Module, teacher: ShapesResNet) -> None:
    """Starts a hybrid ViT's convolutional stem (or the segmentation model's trunk) from the demo ResNet's stem
    and stages."""
    if isinstance(model, (ShapesSegmenter, torchvision.models.detection.FCOS)):
        trunk = model.backbone if hasattr(model, "backbone") else model
        trunk.stem.load_state_dict(teacher.stem.state_dict())
        trunk.stages.load_state_dict(teacher.stages.state_dict())
        return
    stem = model.vit.embeddings.patch_embeddings.projection
    for target, source in zip(stem[:4], (teacher.stem, *teacher.stages[:3])):
        target.load_state_dict(source.state_dict())


def logits_of(output: Any) -> Tensor:
    """A model's class scores: the tensor itself, or a Hugging Face output's ``logits``."""
    return output.logits if hasattr(output, "logits") else output


def loss_of(model: nn.Module, teacher: Optional[nn.Module], images: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy with the labels, plus (with a teacher) the KL divergence to its predicted probabilities."""
    logits = logits_of(model(images))
    loss = F.cross_entropy(logits, labels)
    if teacher is not None:
        with torch.no_grad():
            target = F.log_softmax(teacher(images), dim=1)
        loss = loss + F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="batchmean")
    return loss


def mean_iou(model: nn.Module, scenes: shapes.Scenes, batch: int = 100) -> float:
    """Mean over the classes of intersection over union, each summed over all pixels of the scenes."""
    model.eval()
    truth, counts = shapes.pixel_labels(scenes), None
    with torch.no_grad():
        for start in range(0, len(scenes.images), batch):
            predicted = model(shapes.normalize(scenes.images[start : start + batch])).argmax(1)
            part = truth[start : start + batch]
            found = confusion(predicted, part, torch.ones_like(part, dtype=torch.bool), model.classifier.out_channels)
            counts = found if counts is None else counts + found
    return dense_mean_iou(counts)


def detection_map(model: nn.Module, scenes: shapes.Scenes, batch: int = 100) -> float:
    """Mean over the six shape classes of average precision at IoU 0.5 (Pascal VOC's mAP)."""
    model.eval()
    found = []
    with torch.no_grad():
        for start in range(0, len(scenes.images), batch):
            found += model(list(scenes.images[start : start + batch]))
    return mean_average_precision(found, shapes.detection_targets(scenes), range(1, len(shapes.CLASSES) + 1))


def evaluate(model: nn.Module, scenes: shapes.Scenes, batch: int = 250) -> float:
    if isinstance(model, ShapesSegmenter):
        return mean_iou(model, scenes)
    if isinstance(model, torchvision.models.detection.FCOS):
        return detection_map(model, scenes)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(scenes.images), batch):
            logits = logits_of(model(shapes.normalize(scenes.images[start : start + batch])))
            correct += int((logits.argmax(1) == scenes.labels[start : start + batch, 0]).sum())
    return correct / len(scenes.images)


def train(steps: int, batch: int, seed: int, name: str = "resnet") -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    data = torch.Generator().manual_seed(seed)
    build, _, rate = MODELS[name]
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=rate, total_steps=steps, pct_start=0.15)
    teacher = load_demo_model() if name in DISTILLED else None
    if teacher is not None or name in ("segmenter", "detector"):
        warm_start(model, teacher or load_demo_model())
    started = time.time()
    for step in range(steps):
        model.train()
        if name == "segmenter":
            scenes = shapes.segmentation_scenes(batch, data)
            loss = F.cross_entropy(model(shapes.normalize(scenes.images)), shapes.pixel_labels(scenes))
        elif name == "detector":
            scenes = shapes.segmentation_scenes(batch, data)
            loss = sum(model(list(scenes.images), shapes.detection_targets(scenes)).values())
        else:
            scenes = shapes.render(batch, data)
            loss = loss_of(model, teacher, shapes.normalize(scenes.images), scenes.labels[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - started:6.0f} s", flush=True)
    held_out_data = torch.Generator().manual_seed(seed + 1)
    dense = name in ("segmenter", "detector")
    held_out = shapes.segmentation_scenes(1000, held_out_data) if dense else shapes.render(2000, held_out_data)
    return model.eval(), evaluate(model, held_out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the bundled weights: 2)")
    parser.add_argument("--out", type=Path, help="default: the bundled weights file of --model")
    args = parser.parse_args()
    args.out = args.out or MODELS[args.model][1]
    torch.set_num_threads(args.threads)
    model, accuracy = train(args.steps, args.batch, args.seed, args.model)
    torch.save(model.state_dict(), args.out)
    if args.model == "resnet":
        scene = shapes.render(1, torch.Generator().manual_seed(args.seed + 2), objects=2, labels=torch.tensor([[3, 1]]))
        torchvision.utils.save_image(scene.images, SCENE)
    measure = {"segmenter": "mean IoU", "detector": "mAP@0.5"}.get(args.model, "accuracy")
    print(f"held-out {measure} {accuracy:.4f}; weights: {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
