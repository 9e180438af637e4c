"""MobileNetV2 (Sandler et al., 2018) in plain torch, laid out as torchvision's.

At the defaults it has torchvision's 3,504,872 parameters. Inverted residual blocks keep their
layers in one ``conv`` Sequential and add the shortcut as ``x + out``, which torch-pruning traces.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# expansion factor t, output channels c, repeats n, stride s of the first repeat (the paper's Table 2)
_INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int) -> int:
    """Round a channel count to a multiple of ``divisor``, never going more than 10 % below it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when ``expand_ratio`` is 1), depthwise 3x3, linear 1x1 project."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(in_channels * expand_ratio))
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_relu6(in_channels, hidden, kernel_size=1))
        layers += [
            _conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def is_shape_preserving(self) -> bool:
        """True when the block has a residual connection, i.e. stride 1 and as many channels out as in."""
        return self.use_res_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2: ``features`` (stem, inverted residuals, 1x1 head conv), pool, ``classifier``."""

    def __init__(
        self,
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
        round_nearest: int = 8,
        last_channels: int | None = None,
    ):
        super().__init__()
        channels = _make_divisible(32 * width_mult, round_nearest)
        if last_channels is None:
            last_channels = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [_conv_bn_relu6(in_channels, channels, stride=2)]
        for expand_ratio, c, repeats, first_stride in _INVERTED_RESIDUAL_SETTINGS:
            out_channels = _make_divisible(c * width_mult, round_nearest)
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                features.append(InvertedResidual(channels, out_channels, stride, expand_ratio))
                channels = out_channels
        features.append(_conv_bn_relu6(channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation, so a freshly built model behaves like the reference one.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    in_channels: int = 3,
    round_nearest: int = 8,
    last_channels: int | None = None,
) -> MobileNetV2:
    """MobileNetV2 (3,504,872 parameters at the defaults); takes N x in_channels x H x W images.

    ``width_mult`` scales every layer's channels, which are then rounded to a multiple of
    ``round_nearest``. The final 1x1 conv has ``last_channels`` channels; left as None it is
    the paper's 1280 (scaled up, never down, by ``width_mult``).
    Raises ValueError when ``width_mult`` is not positive, ``round_nearest`` is below 1 or
    ``last_channels`` is below 1.
    """
    if not width_mult > 0:
        raise ValueError(f"width_mult must be > 0, but got width_mult={width_mult}")
    if round_nearest < 1:
        raise ValueError(f"round_nearest must be >= 1, but got round_nearest={round_nearest}")
    if last_channels is not None and last_channels < 1:
        raise ValueError(f"last_channels must be >= 1 or None (1280), but got last_channels={last_channels}")
    return MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        in_channels=in_channels,
        round_nearest=round_nearest,
        last_channels=last_channels,
    )
