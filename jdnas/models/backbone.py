"""A static ResNet-like backbone built from an `Arch`.

Module names are stable and plain (`stem.conv`, `stages.2.1.conv1`, ...), so a state_dict
can be sliced by the morphism actions and loaded into any backbone of the same Arch.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from jdnas.models.arch import Arch


def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """3x3 (cin->mid, stride) -> 3x3 (mid->out), plus identity or 1x1 projection."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, mid, 3, stride)
        self.conv2, self.bn2 = conv_bn(mid, cout, 3)
        self.downsample = _projection(cin, cout, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 (cin->mid) -> 3x3 (mid->mid, stride) -> 1x1 (mid->out), plus projection."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(cin, mid, 1)
        self.conv2, self.bn2 = conv_bn(mid, mid, 3, stride)
        self.conv3, self.bn3 = conv_bn(mid, cout, 1)
        self.downsample = _projection(cin, cout, stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    conv, bn = conv_bn(cin, cout, 1, stride)
    return nn.Sequential(conv, bn)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STAGE_STRIDES = (1, 2, 2, 2)  # after the stride-4 stem: C2..C5 at strides 4, 8, 16, 32


class Stem(nn.Module):
    """7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max-pool: stride 4."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv, self.bn = conv_bn(3, width, 7, 2)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.bn(self.conv(x))))


class ResNetBackbone(nn.Module):
    """Stem + 4 stages; returns OrderedDict {"0": C2, "1": C3, "2": C4, "3": C5}."""

    def __init__(self, arch: Arch) -> None:
        super().__init__()
        self.arch = arch
        self.stem = Stem(arch.stem)
        block = BLOCKS[arch.block]
        stages, cin = [], arch.stem
        for spec, stride in zip(arch.stages, STAGE_STRIDES):
            blocks = []
            for i, mid in enumerate(spec.mids):
                blocks.append(block(cin, mid, spec.out, stride if i == 0 else 1))
                cin = spec.out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.out_channels_list = list(arch.widths)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        x = self.stem(x)
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats[str(i)] = x
        return feats


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
