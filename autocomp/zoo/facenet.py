"""MobileFaceNet (Chen et al., 2018): a face-recognition embedding network in plain torch.

The model maps an aligned face crop to an embedding (N x embedding_size), not to class scores;
faces are compared by the cosine similarity of their embeddings. Channel counts scale with
``width`` (64 in the paper): stem and first stage ``width``, middle stages ``2 * width``,
the 1x1 conv before the global depthwise conv ``8 * width``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FaceBottleneck", "MobileFaceNet", "mobilefacenet"]

# expansion factor t, output channels as a multiple of width, repeats n, stride s of the first repeat
# (the paper's Table 1)
_BOTTLENECK_SETTINGS = (
    (2, 1, 5, 2),
    (4, 2, 1, 2),
    (2, 2, 6, 1),
    (4, 2, 1, 2),
    (2, 2, 2, 1),
)


def _conv_bn_prelu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.PReLU(out_channels),
    )


class FaceBottleneck(nn.Module):
    """1x1 expand + BN + PReLU, depthwise 3x3 + BN + PReLU, linear 1x1 project + BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.conv = nn.Sequential(
            _conv_bn_prelu(in_channels, hidden, kernel_size=1),
            _conv_bn_prelu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.stride = stride
        self.use_res_connect = stride == 1 and in_channels == out_channels

    def is_shape_preserving(self) -> bool:
        """True when the block has a residual connection, i.e. stride 1 and as many channels out as in."""
        return self.use_res_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


def _halved(size: int) -> int:
    """Spatial size after a 3x3, stride-2, padding-1 conv."""
    return (size - 1) // 2 + 1


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``features``, global depthwise conv ``gdc``, then ``embedding`` (Linear + BN1d)."""

    def __init__(self, *, embedding_size: int = 128, width: int = 64, in_channels: int = 3, input_size: int = 112):
        super().__init__()
        features: list[nn.Module] = [
            _conv_bn_prelu(in_channels, width, stride=2),
            _conv_bn_prelu(width, width, groups=width),
        ]
        size = _halved(input_size)
        channels = width
        for expand_ratio, width_multiple, repeats, first_stride in _BOTTLENECK_SETTINGS:
            out_channels = width * width_multiple
            for i in range(repeats):
                stride = first_stride if i == 0 else 1
                features.append(FaceBottleneck(channels, out_channels, stride, expand_ratio))
                channels = out_channels
                size = _halved(size) if stride == 2 else size
        features.append(_conv_bn_prelu(channels, 8 * width, kernel_size=1))
        self.features = nn.Sequential(*features)
        # Global depthwise conv: a learned, per-channel weighting of the final feature map, which
        # the paper prefers to average pooling because face crops are aligned.
        self.gdc = nn.Sequential(
            nn.Conv2d(8 * width, 8 * width, size, groups=8 * width, bias=False),
            nn.BatchNorm2d(8 * width),
        )
        self.embedding = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(8 * width, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )
        self.feature_map_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.gdc(self.features(x)))


def mobilefacenet(
    *, embedding_size: int = 128, width: int = 64, in_channels: int = 3, input_size: int = 112
) -> MobileFaceNet:
    """MobileFaceNet for N x in_channels x input_size x input_size faces, giving N x embedding_size.

    The global depthwise conv's kernel covers the whole final feature map (7 x 7 for 112 x 112
    inputs), so the model only accepts images of exactly ``input_size``.
    Raises ValueError when ``input_size`` is below 1.
    """
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, but got input_size={input_size}")
    return MobileFaceNet(
        embedding_size=embedding_size, width=width, in_channels=in_channels, input_size=input_size
    )
