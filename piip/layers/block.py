"""Pre-norm ViT block with optional layer scale and stochastic depth."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Attention
from .norm import make_norm


def linspace_rates(end: float, n: int) -> list[float]:
    """Stochastic-depth rates 0..end over n layers (plain floats: also works under a meta device context)."""
    return [end * i / (n - 1) for i in range(n)] if n > 1 else [end] * n


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2. ``act="gelu_tanh"`` is the tanh approximation (the fused MLP of
    the speedup and 6B configs)."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        if act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"Mlp: act must be 'gelu' or 'gelu_tanh', got {act!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x += ls1 * Attn(norm1(x)); x += ls2 * Mlp(norm2(x)).

    ``layer_scale`` None means no scale parameters (AugReg classification branches);
    otherwise ``ls1``/``ls2`` are [C] vectors initialised to that value.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm: str = "layernorm", qk_norm: str = "none", layer_scale: float | None = None,
                 window_size: int | None = None, pad_before_qkv: bool = True, mlp_act: str = "gelu",
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, window_size, pad_before_qkv)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp_act)
        if layer_scale is not None:
            self.ls1 = nn.Parameter(torch.full((dim,), float(layer_scale)))
            self.ls2 = nn.Parameter(torch.full((dim,), float(layer_scale)))
        else:
            self.ls1 = self.ls2 = None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """x: [B, N, C] (N = H*W, or 1 + H*W with a cls token and global attention)."""
        y = self.attn(self.norm1(x), hw)
        x = x + self.drop_path(y if self.ls1 is None else self.ls1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path(y if self.ls2 is None else self.ls2 * y)
