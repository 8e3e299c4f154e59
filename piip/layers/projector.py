"""The branch-wise MLP projector of PIIP-LLaVA: each branch's map resized to the last
branch's grid, projected by its own two-layer MLP, and summed into image tokens.

It lives in layers/ (not beside PIIPLLaVA) because the N-branch model builds it for
``output="llava"`` and the LLaVA model subclasses that model: both import it from here.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W], without affine parameters (the "ln" projector)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


class _ProjectorBranch(nn.Module):
    """[B, C, H, W] -> Linear(C, D) -> norm -> GELU -> Linear(D, D) -> [B, D, H, W]; norm is
    GroupNorm(32, D) ("gn") or a parameter-free channel LayerNorm ("ln")."""

    def __init__(self, dim: int, out_dim: int, norm: str):
        super().__init__()
        if norm not in ("gn", "ln"):
            raise ValueError(f"projector norm must be 'gn' or 'ln', got {norm!r}")
        if norm == "gn" and out_dim % 32:
            raise ValueError(f"projector: out_dim {out_dim} must be a multiple of 32 (GroupNorm(32))")
        self.fc1 = nn.Linear(dim, out_dim)
        self.norm = nn.GroupNorm(32, out_dim) if norm == "gn" else _ChannelLayerNorm()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.act(self.norm(y))
        return self.fc2(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BranchMLPProjector(nn.Module):
    """The official two-branch MLP projector, for any number of branches: every map but the
    last is resized bilinearly (in fp32) to the last one's grid, each goes through its own
    :class:`_ProjectorBranch`, and the results are summed.

    ``forward(maps)`` with maps [B, C_i, H_i, W_i] -> tokens [B, H_N*W_N, out_dim].
    """

    def __init__(self, dims: list[int], out_dim: int, norm: str = "gn"):
        super().__init__()
        self.norm_kind = norm
        self.branches = nn.ModuleList(_ProjectorBranch(d, out_dim, norm) for d in dims)

    def forward(self, maps: list[Tensor]) -> Tensor:
        if len(maps) != len(self.branches):
            raise ValueError(f"projector: {len(maps)} maps for {len(self.branches)} branches")
        hw = tuple(maps[-1].shape[-2:])
        out = 0
        for proj, x in zip(self.branches, maps):
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False).to(x.dtype)
            out = out + proj(x)
        return out.flatten(2).transpose(1, 2)
