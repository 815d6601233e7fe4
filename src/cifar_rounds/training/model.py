"""ResNet-18 for CIFAR (He et al., 2016, "Deep Residual Learning for Image Recognition").

The CIFAR variant: a 3x3 stride-1 stem and no max-pool, so the 32x32 input
keeps its resolution through the first stage; BasicBlocks [2, 2, 2, 2].
At width 64 and 10 classes it has 11,173,962 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:  # projection shortcut (option B)
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """`memory_format`: a layout the network computes in, its input brought into it (a no-op when it is);
    None computes in whatever layout the input has."""

    def __init__(
        self, num_classes: int = 10, width: int = 64, memory_format: torch.memory_format | None = None
    ) -> None:
        super().__init__()
        self.memory_format = memory_format
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        planes = [width, 2 * width, 4 * width, 8 * width]
        self.layer1 = self._make_layer(width, planes[0], stride=1)
        self.layer2 = self._make_layer(planes[0], planes[1], stride=2)
        self.layer3 = self._make_layer(planes[1], planes[2], stride=2)
        self.layer4 = self._make_layer(planes[2], planes[3], stride=2)
        self.linear = nn.Linear(planes[3], num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is not None:
            x = x.contiguous(memory_format=self.memory_format)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def build_model(width: int, num_classes: int, device: torch.device, memory_format: torch.memory_format) -> ResNet18:
    """ResNet-18 on `device`, computing in `memory_format` (runtime.memory_format chooses it)."""
    model = ResNet18(num_classes=num_classes, width=width, memory_format=memory_format)
    return model.to(device, memory_format=memory_format)


def block_name(param_name: str) -> str:
    """The block a parameter belongs to, for per-block norms: 'stem', 'layer2.1', 'linear'."""
    parts = param_name.split(".")
    if parts[0].startswith("layer"):
        return ".".join(parts[:2])
    return "linear" if parts[0] == "linear" else "stem"
