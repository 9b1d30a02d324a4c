"""The bundled demo models, trained on the procedural shapes (``shapes.py``): a small torchvision-style ResNet
and a small torchvision ``VisionTransformer``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.resnet import BasicBlock, conv1x1

from . import shapes

WEIGHTS = Path(__file__).with_name("shapes_resnet.pt")
VIT_WEIGHTS = Path(__file__).with_name("shapes_vit.pt")
SCENE = Path(__file__).with_name("demo_scene.png")


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


def load_demo_model(path: Path = WEIGHTS) -> ShapesResNet:
    """The trained demo model in eval mode (weights loaded with ``weights_only=True``)."""
    model = ShapesResNet()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


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
    model = shapes_vit()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
