"""Multi-head self-attention with optional windows and qk-norm."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .norm import make_norm


class Attention(nn.Module):
    """ViT self-attention over a token grid, global or in non-overlapping windows.

    Args:
        dim: width C; num_heads: heads (head dim C / heads).
        qkv_bias: bias on the qkv projection.
        qk_norm: "none" or "rmsnorm"/"layernorm" over the full width C of q and k
            (InternViT-6B normalises all heads together, before splitting them).
        window_size: None for global attention, else the window side w.
        pad_before_qkv: windows need the grid padded to a multiple of w. True pads the
            normed tokens with zeros *before* qkv, so padded tokens carry the qkv bias
            (what the official detection code does); False pads q, k and v after the
            projection, so padded keys and values are exactly zero. Neither masks them.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: str = "none",
                 window_size: int | None = None, pad_before_qkv: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.window_size, self.pad_before_qkv = num_heads, window_size, pad_before_qkv
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.has_qk_norm = qk_norm != "none"
        if self.has_qk_norm:
            self.q_norm = make_norm(qk_norm, dim)
            self.k_norm = make_norm(qk_norm, dim)

    def _attend(self, qkv: Tensor) -> Tensor:
        """qkv [B, N, 3C] -> [B, N, C]."""
        B, N, C3 = qkv.shape
        C = C3 // 3
        q, k, v = qkv.view(B, N, 3, C).unbind(2)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        h = self.num_heads
        q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(B, N, C)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """x: [B, H*W, C] on an H x W grid -> [B, H*W, C]."""
        w = self.window_size
        if w is None:
            return self.proj(self._attend(self.qkv(x)))
        B, N, _ = x.shape
        H, W = hw
        ph, pw = (-H) % w, (-W) % w
        if self.pad_before_qkv:
            y = F.pad(x.view(B, H, W, -1), (0, 0, 0, pw, 0, ph))
            y = self.qkv(y)
        else:
            y = F.pad(self.qkv(x).view(B, H, W, -1), (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        C3 = y.shape[-1]
        # [B, Hp, Wp, 3C] -> [B * windows, w*w, 3C]
        y = y.view(B, Hp // w, w, Wp // w, w, C3).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C3)
        y = self._attend(y)
        C = C3 // 3
        y = y.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
        y = y[:, :H, :W].reshape(B, N, C)
        return self.proj(y)
