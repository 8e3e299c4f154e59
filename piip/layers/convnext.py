"""ConvNeXt building blocks (Liu et al. 2022), as the official PIIP code runs them through
transformers' ConvNextModel (detection) and timm's ConvNeXt (PIIP-LLaVA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .block import DropPath


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a [B, C, H, W] map, normalised in fp32 (as both
    reference implementations do), returned in the input's dtype."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float().permute(0, 2, 3, 1), self.normalized_shape, self.weight.float(),
                         self.bias.float(), self.eps)
        return y.permute(0, 3, 1, 2).to(x.dtype)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise conv -> LayerNorm -> Linear C->4C -> GELU -> Linear 4C->C -> layer scale,
    plus the residual (with drop path). [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, dim: int, layer_scale_init: float | None = 1e-6, drop_path: float = 0.0, mlp_ratio: float = 4.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, int(mlp_ratio * dim))
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(int(mlp_ratio * dim), dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(layer_scale_init))) if layer_scale_init else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtDownsample(nn.Sequential):
    """Between stages: LayerNorm over channels, then a 2x2 stride-2 conv (sides floor)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, out_dim, 2, 2))


class ConvNeXtStem(nn.Sequential):
    """4x4 stride-4 patch conv with bias, then LayerNorm over channels."""

    def __init__(self, out_dim: int, in_chans: int = 3, patch: int = 4):
        super().__init__(nn.Conv2d(in_chans, out_dim, patch, patch), LayerNorm2d(out_dim, eps=1e-6))
