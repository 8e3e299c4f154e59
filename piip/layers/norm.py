"""Norm layers: LayerNorm (timm/DeiT branches) and RMSNorm (InternViT-6B)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (InternViT-6B's `norm1`, `norm2`, `q_norm`, `k_norm`).

    Deliberately not an ``nn.LayerNorm`` subclass: the paper's FLOP counter hooks modules by
    exact type and does not count this one, and ``piip.flops`` reproduces that.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(kind: str, dim: int, eps: float = 1e-6) -> nn.Module:
    """kind: "layernorm", "rmsnorm" or "none" (Identity, the speedup configs' injectors)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}: expected 'layernorm', 'rmsnorm' or 'none'")
