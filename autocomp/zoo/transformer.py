"""A small Vision Transformer (Dosovitskiy et al., 2021) in plain torch.

Attention is written with matmul and softmax (no ``nn.MultiheadAttention``, no
``F.scaled_dot_product_attention``) so that the model exports to ONNX opset 17 with the legacy
exporter and torch-pruning can trace it. The encoder blocks sit in ``model.blocks`` (an
``nn.ModuleList``): deleting an entry removes that block.

Pruning note: when the ``qkv`` layer of an :class:`Attention` loses heads or head dimensions,
set its ``num_heads`` and ``head_dim`` to the new values (``head_dim = qkv.out_features //
(3 * num_heads)``), as torch-pruning's own ViT example does; ``forward`` reads both.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PatchEmbed", "Attention", "Mlp", "Block", "VisionTransformer", "vit"]


class PatchEmbed(nn.Module):
    """Cuts an image into ``patch_size`` squares and embeds each: N x C x H x W -> N x patches x dim."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection and an output ``proj``."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        # Fixed at construction: pruning head dimensions must not rescale what the weights learned.
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        weights = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    """``fc1`` -> GELU -> ``fc2``, applied to every token."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm encoder block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def is_shape_preserving(self) -> bool:
        """Always True: an encoder block maps N x tokens x dim to the same shape."""
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier: patch embedding, class token, learned positions, ``blocks``, ``norm``, ``head``."""

    def __init__(
        self,
        *,
        image_size: int = 32,
        patch_size: int = 4,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        in_channels: int = 3,
    ):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def vit(
    *,
    image_size: int = 32,
    patch_size: int = 4,
    num_classes: int = 10,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
    in_channels: int = 3,
) -> VisionTransformer:
    """A Vision Transformer for N x in_channels x image_size x image_size images, giving N x num_classes.

    The model only accepts images of exactly ``image_size`` (its position embedding is learned
    for that many patches). Raises ValueError when ``image_size`` is not a multiple of
    ``patch_size`` or ``dim`` is not a multiple of ``heads``.
    """
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(
            f"image_size must be a positive multiple of patch_size, but got image_size={image_size}, "
            f"patch_size={patch_size}"
        )
    if heads < 1 or dim % heads != 0:
        raise ValueError(f"dim must be a multiple of heads, but got dim={dim}, heads={heads}")
    return VisionTransformer(
        image_size=image_size,
        patch_size=patch_size,
        num_classes=num_classes,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
        in_channels=in_channels,
    )
