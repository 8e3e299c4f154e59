"""PIIP interaction: deformable cross-attention injectors between adjacent branches."""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from piip_kernels import MSDeformAttn
from piip_kernels.dca.reference import grid_reference_points

from .block import DropPath
from .norm import make_norm


PROJECTION_DTYPES = ("param", "autocast")


def _autocast_on(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()


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
        # "param": every projection outside autocast in the parameters' dtype, as the official
        # interaction runs (fp32 weights: fp32 GEMMs). "autocast": the value and output
        # projections (the large GEMMs) follow an enclosing autocast; the offset and weight
        # projections stay in the parameters' dtype, so sampling positions keep fp32
        # precision (bf16 would round a 10-pixel offset to 1/16 pixel).
        self.projection_dtype = "param"

    def forward(self, x: Tensor, hw: tuple[int, int], feat: Tensor, feat_hw: tuple[int, int]) -> Tensor:
        """x: [B, Hq*Wq, C_q]; feat: [B, Hv*Wv, feat_dim] -> [B, Hq*Wq, C_q]."""
        q, f = self.query_norm(x), self.feat_norm(feat)
        # Sampling runs outside autocast in the parameters' dtype: fp32, as the official
        # interaction does, or the compute dtype FSDP gathers them in (piip.distributed).
        # The reference points are the query grid's cell centres, so the fused op applies.
        dt = self.attn.value_proj.weight.dtype
        # The named range lets profilers (bench/bench_model.py) compare the two paths.
        with torch.profiler.record_function("piip.interaction_attention"):
            if self.projection_dtype == "autocast" and _autocast_on(x.device.type):
                attn = self._attention_autocast(q, hw, f, feat_hw, dt)
            else:
                with _no_autocast(x.device.type):
                    attn = self._attention(q.to(dt), hw, f.to(dt), feat_hw)
        x = x + self.ca_gamma * attn.to(x.dtype)
        if self.with_cffn:
            x = x + self.drop_path(self.cffn_gamma * self.ffn(self.ffn_norm(x), hw))
        return x

    def _attention(self, q: Tensor, hw, f: Tensor, feat_hw) -> Tensor:
        """The attention in the current dtype: fused, or the official unfused steps."""
        if self.unfused_msda is None:
            return self.attn.forward_grid(q, hw, f, feat_hw)
        return self._unfused(q, hw, f, feat_hw)

    def _attention_autocast(self, q: Tensor, hw, f: Tensor, feat_hw, dt: torch.dtype) -> Tensor:
        """projection_dtype "autocast": value and output projections under the enclosing
        autocast, offsets and weights from projections in the parameters' dtype ``dt``."""
        a = self.attn
        value = a.value_proj(f).view(f.shape[0], f.shape[1], a.n_heads, a.value_dim // a.n_heads)
        with _no_autocast(q.device.type):
            q = q.to(dt)
            if self.unfused_msda is None:
                out = a.sample_grid(q, hw, value, feat_hw)
            else:
                out = self._unfused(q, hw, None, feat_hw, value=value)
        return a.output_proj(out)

    def _unfused(self, q: Tensor, hw, f: Tensor | None, feat_hw, value: Tensor | None = None) -> Tensor:
        """The official computation, step by step: grid reference points, offsets scaled by
        the value grid, a softmax, then multi-scale deformable attention on one level.
        With ``value`` given (already projected), returns the attention before output_proj."""
        a = self.attn
        N, Lq, _ = q.shape
        ref = grid_reference_points(hw, q.device, q.dtype)[None, :, None, :].expand(N, Lq, 1, 2)
        shapes = torch.tensor([list(feat_hw)], device=q.device)
        starts = torch.zeros(1, dtype=torch.long, device=q.device)
        project = value is None
        if project:
            value = a.value_proj(f).view(N, f.shape[1], a.n_heads, a.value_dim // a.n_heads)
        loc, weights = a.sampling(q, ref, shapes)
        out = self.unfused_msda(value, shapes, starts, loc, weights)
        return a.output_proj(out) if project else out


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
