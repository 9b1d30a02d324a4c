"""The bundled demo models, trained on the procedural shapes (``shapes.py``): a small torchvision-style ResNet,
a small torchvision ``VisionTransformer``, two Hugging Face ``transformers`` models (a ViT distilled from the
ResNet, and a ResNet; they need the ``[hf]`` extra), and a segmentation model on the ResNet's trunk."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import FeaturePyramidNetwork

from . import shapes

WEIGHTS = Path(__file__).with_name("shapes_resnet.pt")
VIT_WEIGHTS = Path(__file__).with_name("shapes_vit.pt")
HF_VIT_WEIGHTS = Path(__file__).with_name("shapes_hf_vit.pt")
HF_RESNET_WEIGHTS = Path(__file__).with_name("shapes_hf_resnet.pt")
SEGMENTER_WEIGHTS = Path(__file__).with_name("shapes_segmenter.pt")
DETECTOR_WEIGHTS = Path(__file__).with_name("shapes_detector.pt")
SCENE = Path(__file__).with_name("demo_scene.png")
SEGMENTATION_CLASSES = ("background", *shapes.CLASSES)
"""The segmentation model's classes: background, then the shapes (class ``k + 1`` is ``shapes.CLASSES[k]``)."""


class ShapesResNet(nn.Module):
    """ResNet-10 style: a 3x3 stride-2 stem, one torchvision ``BasicBlock`` per stage (16-32-64-128 channels),
    global average pooling, a linear classifier. About 0.3M parameters; 128x128 inputs."""

    def __init__(self, num_classes: int = len(shapes.CLASSES), widths: tuple = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        stages, channels = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            downsample = (
                None
                if stride == 1 and channels == width
                else nn.Sequential(conv1x1(channels, width, stride), nn.BatchNorm2d(width))
            )
            stages.append(BasicBlock(channels, width, stride, downsample))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def with_weights(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the state dict of ``path`` (loaded with ``weights_only=True``), in eval mode."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def load_demo_model(path: Path = WEIGHTS) -> ShapesResNet:
    """The trained demo model in eval mode (weights loaded with ``weights_only=True``)."""
    return with_weights(ShapesResNet(), path)


def shapes_vit(num_classes: int = len(shapes.CLASSES)) -> VisionTransformer:
    """torchvision's ``VisionTransformer`` at demo scale: 128x128 inputs, 16x16 patches (64 tokens and the class
    token), 4 layers, 4 heads, width 96. About 0.3M parameters."""
    return VisionTransformer(
        image_size=shapes.SIZE,
        patch_size=16,
        num_layers=4,
        num_heads=4,
        hidden_dim=96,
        mlp_dim=192,
        num_classes=num_classes,
    )


def load_demo_vit(path: Path = VIT_WEIGHTS) -> VisionTransformer:
    """The trained demo ViT in eval mode (weights loaded with ``weights_only=True``)."""
    return with_weights(shapes_vit(), path)


class ConvolutionalStem(nn.Sequential):
    """A hybrid ViT's patch embedding (Dosovitskiy et al. 2021, "ViT-Hybrid"): the stem and first three stages of
    :class:`ShapesResNet` (stride 8, 64 channels), then a 1x1 convolution to the transformer's width. Each token
    then sees beyond its 8x8 patch, as early convolutions let a ViT do (Xiao et al. 2021)."""

    @classmethod
    def of_width(cls, width: int) -> ConvolutionalStem:
        """A stem (random weights) for a transformer of width ``width``."""
        trunk = ShapesResNet()
        return cls(trunk.stem, *trunk.stages[:3], nn.Conv2d(64, width, 1))

    @property
    def weight(self) -> torch.Tensor:
        """The last convolution's weight (Hugging Face's ViT reads its patch projection's dtype)."""
        return self[-1].weight


def _hf_labels() -> dict:
    """The class names of the shapes, as a Hugging Face configuration takes them."""
    return {
        "num_labels": len(shapes.CLASSES),
        "id2label": dict(enumerate(shapes.CLASSES)),
        "label2id": {name: index for index, name in enumerate(shapes.CLASSES)},
    }


def shapes_hf_vit() -> torch.nn.Module:
    """Hugging Face's ``ViTForImageClassification`` at demo scale: 128x128 inputs, 8x8 patches (256 tokens and the
    class token), 4 layers, 4 heads, width 96, its patch projection replaced by a convolutional stem of the same
    stride (:class:`ConvolutionalStem`). About 0.4M parameters. Trained from the demo ResNet's stem and with
    distillation from it (``python -m captum_layermask.demo.train --model hf-vit``)."""
    import transformers

    config = transformers.ViTConfig(
        image_size=shapes.SIZE,
        patch_size=8,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_size=96,
        intermediate_size=192,
        **_hf_labels(),
    )
    model = transformers.ViTForImageClassification(config)
    model.vit.embeddings.patch_embeddings.projection = ConvolutionalStem.of_width(config.hidden_size)
    return model


def shapes_hf_resnet() -> torch.nn.Module:
    """Hugging Face's ``ResNetForImageClassification`` at demo scale: its 7x7 stem and max pooling, one basic
    block per stage (16-32-64-128 channels). About 0.3M parameters."""
    import transformers

    config = transformers.ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        **_hf_labels(),
    )
    return transformers.ResNetForImageClassification(config)


def load_demo_hf_model(name: str) -> torch.nn.Module:
    """A trained Hugging Face demo model, ``"vit"`` or ``"resnet"``, in eval mode (``weights_only=True``)."""
    models = {"vit": (shapes_hf_vit, HF_VIT_WEIGHTS), "resnet": (shapes_hf_resnet, HF_RESNET_WEIGHTS)}
    if name not in models:
        raise ValueError(f"the Hugging Face demo models are 'vit' and 'resnet', got {name!r}.")
    build, path = models[name]
    return with_weights(build(), path)


class ShapesSegmenter(nn.Module):
    """A feature-pyramid FCN on :class:`ShapesResNet`'s trunk (Lin et al. 2017, "FPN"; Long et al. 2015, "FCN"):
    each stage's features (strides 2, 4, 8, 16) projected to 32 channels by a 1x1 convolution, summed top-down
    with bilinear upsampling, a 3x3 convolution, a 1x1 classifier, and bilinear upsampling to the input size.
    Returns ``(N, 7, H, W)`` logits over :data:`SEGMENTATION_CLASSES`. About 0.33M parameters; 128x128 inputs."""

    def __init__(self, num_classes: int = len(SEGMENTATION_CLASSES), width: int = 32) -> None:
        super().__init__()
        trunk = ShapesResNet()
        self.stem, self.stages = trunk.stem, trunk.stages
        self.lateral = nn.ModuleList(nn.Conv2d(stage.conv2.out_channels, width, 1) for stage in self.stages)
        self.fuse = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, y = [], self.stem(x)
        for stage in self.stages:
            y = stage(y)
            features.append(y)
        top = self.lateral[-1](features[-1])
        for feature, lateral in zip(features[-2::-1], list(self.lateral)[-2::-1]):
            top = F.interpolate(top, size=feature.shape[-2:], mode="bilinear", align_corners=False) + lateral(feature)
        logits = self.classifier(self.fuse(top))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def load_demo_segmenter(path: Path = SEGMENTER_WEIGHTS) -> ShapesSegmenter:
    """The trained demo segmentation model in eval mode (weights loaded with ``weights_only=True``)."""
    return with_weights(ShapesSegmenter(), path)


class ShapesBackbone(nn.Module):
    """:class:`ShapesResNet`'s trunk with a feature pyramid (torchvision's ``FeaturePyramidNetwork``) on its last three
    stages: levels ``"0"``, ``"1"``, ``"2"`` at strides 4, 8, 16, ``out_channels`` each (torchvision's backbone
    interface for detectors)."""

    def __init__(self, out_channels: int = 32) -> None:
        super().__init__()
        trunk = ShapesResNet()
        self.stem, self.stages = trunk.stem, trunk.stages
        widths = [stage.conv2.out_channels for stage in self.stages[1:]]
        self.fpn = FeaturePyramidNetwork(widths, out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        y = self.stages[0](self.stem(x))
        levels: OrderedDict[str, torch.Tensor] = OrderedDict()
        for index, stage in enumerate(self.stages[1:]):
            y = stage(y)
            levels[str(index)] = y
        return self.fpn(levels)


def shapes_detector() -> FCOS:
    """An FCOS detector (Tian et al. 2019; torchvision's ``FCOS``) on :class:`ShapesBackbone`: one point per cell of
    each pyramid level, a two-convolution head with GroupNorm. Classes are :data:`SEGMENTATION_CLASSES` (label
    ``k + 1`` is ``shapes.CLASSES[k]``); it takes ``[0, 1]`` images of 128x128 pixels (normalised inside) and
    keeps at most 10 detections scoring 0.3 or more. About 0.4M parameters."""
    anchors = AnchorGenerator(sizes=((4,), (8,), (16,)), aspect_ratios=((1.0,),) * 3)  # FCOS: one point per stride
    head = FCOSHead(32, 1, len(SEGMENTATION_CLASSES), num_convs=2)
    return FCOS(
        ShapesBackbone(32),
        num_classes=len(SEGMENTATION_CLASSES),
        min_size=shapes.SIZE,
        max_size=shapes.SIZE,
        image_mean=list(shapes.MEAN),
        image_std=list(shapes.STD),
        anchor_generator=anchors,
        head=head,
        score_thresh=0.3,
        detections_per_img=10,
    )


def load_demo_detector(path: Path = DETECTOR_WEIGHTS) -> FCOS:
    """The trained demo detector in eval mode (weights loaded with ``weights_only=True``)."""
    return with_weights(shapes_detector(), path)
