"""PIIP interaction: deformable cross-attention injectors between adjacent branches."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from piip_kernels import MSDeformAttn, ms_deform_attn
from piip_kernels.dca.reference import grid_reference_points

from .block import DropPath
from .norm import make_norm


class ConvFFN(nn.Module):
    """Linear C->hidden, 3x3 depthwise conv on the token grid, GELU, Linear hidden->C."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        """x: [B, H*W, C] -> [B, H*W, C]."""
        x = self.fc1(x)
        B, N, Ch = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, Ch, *hw)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class Injector(nn.Module):
    """One direction of an interaction unit: the query branch reads the other branch.

    ``x += ca_gamma * MSDeformAttn(query_norm(x), feat_norm(feat))`` on the query grid's
    cell centres (one fused ``deform_cross_attn`` call), then ``x += DropPath(cffn_gamma * ConvFFN(ffn_norm(x)))``.

    Args:
        dim: query branch width C_q.
        feat_dim: width of ``feat`` (C_q when the unit projects, else the other branch's width).
        norm: "layernorm" or "none" (the speedup configs drop every injector norm).
    """

    def __init__(self, dim: int, feat_dim: int, num_heads: int = 16, n_points: int = 4,
                 deform_ratio: float = 0.5, with_cffn: bool = True, cffn_ratio: float = 0.25,
                 norm: str = "layernorm", drop_path: float = 0.0, gamma_init: float = 0.0,
                 backend: str | None = None):
        super().__init__()
        self.query_norm = make_norm(norm, dim)
        self.feat_norm = make_norm(norm, feat_dim)
        self.attn = MSDeformAttn(dim, n_levels=1, n_heads=num_heads, n_points=n_points,
                                 ratio=deform_ratio, d_feat=feat_dim, backend=backend)
        self.ca_gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))
        self.with_cffn = with_cffn
        if with_cffn:
            self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
            self.ffn_norm = make_norm(norm, dim)
            self.cffn_gamma = nn.Parameter(torch.full((dim,), float(gamma_init)))
            self.drop_path = DropPath(drop_path)
        # None: the fused deform_cross_attn. A function (value, shapes, starts, loc, weights)
        # -> out: the unfused form the official code runs (see PIIP.set_execution).
        self.unfused_msda = None

    def forward(self, x: Tensor, hw: tuple[int, int], feat: Tensor, feat_hw: tuple[int, int]) -> Tensor:
        """x: [B, Hq*Wq, C_q]; feat: [B, Hv*Wv, feat_dim] -> [B, Hq*Wq, C_q]."""
        q, f = self.query_norm(x), self.feat_norm(feat)
        # Sampling runs outside autocast in the parameters' dtype: fp32, as the official
        # interaction does, or the compute dtype FSDP gathers them in (piip.distributed).
        # The reference points are the query grid's cell centres, so the fused op applies.
        no_autocast = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else contextlib.nullcontext()
        dt = self.attn.value_proj.weight.dtype
        # The named range lets profilers (bench/bench_model.py) compare the two paths.
        with no_autocast, torch.profiler.record_function("piip.interaction_attention"):
            if self.unfused_msda is None:
                attn = self.attn.forward_grid(q.to(dt), hw, f.to(dt), feat_hw)
            else:
                attn = self._unfused(q.to(dt), hw, f.to(dt), feat_hw)
        x = x + self.ca_gamma * attn.to(x.dtype)
        if self.with_cffn:
            x = x + self.drop_path(self.cffn_gamma * self.ffn(self.ffn_norm(x), hw))
        return x

    def _unfused(self, q: Tensor, hw, f: Tensor, feat_hw) -> Tensor:
        """The official computation, step by step: grid reference points, offsets scaled by
        the value grid, a softmax, then multi-scale deformable attention on one level."""
        a = self.attn
        N, Lq, _ = q.shape
        ref = grid_reference_points(hw, q.device, q.dtype)[None, :, None, :].expand(N, Lq, 1, 2)
        shapes = torch.tensor([list(feat_hw)], device=q.device)
        starts = torch.zeros(1, dtype=torch.long, device=q.device)
        value = a.value_proj(f).view(N, f.shape[1], a.n_heads, a.value_dim // a.n_heads)
        loc, weights = a.sampling(q, ref, shapes)
        return a.output_proj(self.unfused_msda(value, shapes, starts, loc, weights))


class InteractionUnit(nn.Module):
    """Bidirectional interaction between adjacent branches a (smaller image, wider) and b.

    Both directions read the features from before the unit.
    Parameters: optional ``to_a_proj`` Linear(C_b, C_a) and ``to_b_proj`` Linear(C_a, C_b),
    injectors ``to_a`` (queries from a) and ``to_b`` (queries from b).
    """

    def __init__(self, dim_a: int, dim_b: int, proj: bool = True, **injector_kwargs):
        super().__init__()
        self.to_a_proj = nn.Linear(dim_b, dim_a) if proj else None
        self.to_b_proj = nn.Linear(dim_a, dim_b) if proj else None
        self.to_a = Injector(dim_a, dim_a if proj else dim_b, **injector_kwargs)
        self.to_b = Injector(dim_b, dim_b if proj else dim_a, **injector_kwargs)

    def forward(self, xa: Tensor, hw_a: tuple[int, int], xb: Tensor, hw_b: tuple[int, int]):
        """xa: [B, Na, C_a], xb: [B, Nb, C_b] -> (new xa, new xb)."""
        fb = xb if self.to_a_proj is None else self.to_a_proj(xb)
        fa = xa if self.to_b_proj is None else self.to_b_proj(xa)
        return self.to_a(xa, hw_a, fb, hw_b), self.to_b(xb, hw_b, fa, hw_a)
