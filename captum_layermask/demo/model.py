"""The bundled demo model: a small torchvision-style ResNet trained on the procedural shapes (``shapes.py``)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1

from . import shapes

WEIGHTS = Path(__file__).with_name("shapes_resnet.pt")
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
