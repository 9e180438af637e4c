"""ResNets in plain torch: the ImageNet family (18/34/50) and the CIFAR family (20/56).

Layouts follow He et al. (2016) as implemented by torchvision (stride on the 3x3 conv of a
Bottleneck, "ResNet v1.5"), so the standard sizes have the well-known parameter counts.
Every residual add is written ``out + identity`` so torch-pruning can trace the coupling
between a block's output channels and its shortcut.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "CifarResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "cifar_resnet",
    "resnet20",
    "resnet56",
]


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The 1x1 conv + BN projection a block needs when its shape changes, else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; output has ``channels`` channels."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride)
        self.stride = stride

    def is_shape_preserving(self) -> bool:
        """True when the block maps its input to a tensor of the same shape (so it can be removed)."""
        return (
            self.downsample is None
            and self.stride == 1
            and self.conv1.in_channels == self.bn2.num_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, with a residual connection."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_channels, out_channels, stride)
        self.stride = stride

    def is_shape_preserving(self) -> bool:
        """True when the block maps its input to a tensor of the same shape (so it can be removed)."""
        return (
            self.downsample is None
            and self.stride == 1
            and self.conv1.in_channels == self.bn3.num_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_BlockClass = type[BasicBlock] | type[Bottleneck]


def _stage(block: _BlockClass, in_channels: int, channels: int, blocks: int, stride: int) -> nn.Sequential:
    """``blocks`` residual blocks; only the first one changes stride or width."""
    layers = [block(in_channels, channels, stride)]
    layers += [block(channels * block.expansion, channels) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> None:
    # torchvision's initialisation, so a freshly built model behaves like the reference one.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNet(nn.Module):
    """ImageNet-layout ResNet: 7x7/2 stem, max-pool, four stages, global average pool, ``fc``."""

    def __init__(
        self,
        block: _BlockClass,
        blocks_per_stage: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        width: int = 64,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = width
        stages = []
        for i, blocks in enumerate(blocks_per_stage):
            stage_width = width * 2**i
            stages.append(_stage(block, channels, stage_width, blocks, stride=1 if i == 0 else 2))
            channels = stage_width * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CifarResNet(nn.Module):
    """CIFAR-layout ResNet: 3x3 stem, three stages of BasicBlocks, global average pool, ``fc``."""

    def __init__(self, blocks_per_stage: int, *, num_classes: int = 10, width: int = 16, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = _stage(BasicBlock, width, width, blocks_per_stage, stride=1)
        self.layer2 = _stage(BasicBlock, width, 2 * width, blocks_per_stage, stride=2)
        self.layer3 = _stage(BasicBlock, 2 * width, 4 * width, blocks_per_stage, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(4 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(*, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-18 (11,689,512 parameters at the defaults); takes N x in_channels x H x W images."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, width=width, in_channels=in_channels)


def resnet34(*, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-34 (21,797,672 parameters at the defaults); takes N x in_channels x H x W images."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, width=width, in_channels=in_channels)


def resnet50(*, num_classes: int = 1000, width: int = 64, in_channels: int = 3) -> ResNet:
    """ResNet-50 (25,557,032 parameters at the defaults); takes N x in_channels x H x W images."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, width=width, in_channels=in_channels)


def cifar_resnet(*, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet of the given depth (20, 32, 44, 56, 110, ...), for 32 x 32 images.

    Raises ValueError when ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(
            f"a CIFAR ResNet's depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), but got depth={depth}"
        )
    return CifarResNet((depth - 2) // 6, num_classes=num_classes, width=width, in_channels=in_channels)


def resnet20(**kwargs) -> CifarResNet:
    """CIFAR ResNet-20 (about 0.27 M parameters at the defaults); keyword arguments as :func:`cifar_resnet`."""
    return cifar_resnet(depth=20, **kwargs)


def resnet56(**kwargs) -> CifarResNet:
    """CIFAR ResNet-56 (about 0.85 M parameters at the defaults); keyword arguments as :func:`cifar_resnet`."""
    return cifar_resnet(depth=56, **kwargs)

