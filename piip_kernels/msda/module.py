"""Drop-in ``MSDeformAttn`` module with the parameter names and initialisation of
Deformable DETR / ViT-Adapter / PIIP, so their state dicts load unchanged."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .api import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer.

    Args:
        d_model: query width C.
        n_levels: number of feature levels L.
        n_heads: attention heads M.
        n_points: sampling points per head and level P.
        ratio: value width is ``int(d_model * ratio)`` (PIIP and ViT-Adapter use 0.5).
        d_feat: width of ``input_flatten`` (default d_model).
        backend: forwarded to :func:`piip_kernels.ms_deform_attn` (None chooses).

    Parameters (names as in the original module): ``sampling_offsets`` Linear(C, M*L*P*2),
    ``attention_weights`` Linear(C, M*L*P), ``value_proj`` Linear(d_feat, V),
    ``output_proj`` Linear(V, C), with V = int(C * ratio).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, ratio=1.0, d_feat=None, backend=None):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads != 0:
            raise ValueError(f"MSDeformAttn: value width int(d_model * ratio) = {value_dim} must be divisible by n_heads = {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.ratio, self.value_dim, self.backend = ratio, value_dim, backend
        d_feat = d_model if d_feat is None else d_feat
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_feat, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self._reset_parameters()

    def _reset_parameters(self):
        # Offsets start on a ring: head h points in direction 2*pi*h/M, scaled so the
        # larger coordinate is 1, and point p sits p+1 pixels out along it.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        ring = torch.stack([angles.cos(), angles.sin()], -1)
        ring = ring / ring.abs().max(-1, keepdim=True).values
        grid = ring.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def sampling(self, query: Tensor, reference_points: Tensor, input_spatial_shapes: Tensor):
        """Sampling locations [N, Lq, M, L, P, 2] and softmaxed weights [N, Lq, M, L, P]."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1).to(offsets.dtype)
            loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # Boxes (cx, cy, w, h): offsets are relative to half the box size.
            loc = reference_points[:, :, None, :, None, :2] + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"MSDeformAttn: reference_points must end in 2 or 4, got shape {tuple(reference_points.shape)}")
        return loc, weights

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: [N, Lq, C].
            reference_points: [N or 1, Lq, L, 2] normalised (x, y), or [N or 1, Lq, L, 4] boxes (cx, cy, w, h).
            input_flatten: [N, S, d_feat], the levels flattened and concatenated.
            input_spatial_shapes: [L, 2] (H, W) per level.
            input_level_start_index: [L].
            input_padding_mask: [N, S], True at padded positions (their values are zeroed).

        Returns:
            [N, Lq, C].
        """
        N, Lq, _ = query.shape
        S = input_flatten.shape[1]
        if query.dim() != 3 or input_flatten.dim() != 3 or input_flatten.shape[0] != N:
            raise ValueError(f"MSDeformAttn: query must be [N, Lq, C] and input_flatten [N, S, d_feat], got {tuple(query.shape)} and {tuple(input_flatten.shape)}")
        if reference_points.dim() != 4 or reference_points.shape[1:3] != (Lq, self.n_levels):
            raise ValueError(f"MSDeformAttn: reference_points must be [N, {Lq}, {self.n_levels}, 2 or 4], got {tuple(reference_points.shape)}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, S, self.n_heads, self.value_dim // self.n_heads)
        loc, weights = self.sampling(query, reference_points, input_spatial_shapes)
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, loc, weights, backend=self.backend)
        return self.output_proj(out)

    def forward_grid(self, query: Tensor, query_hw, input_flatten: Tensor, input_hw) -> Tensor:
        """The PIIP interaction case in one fused op: one level, reference points at the
        cell centres of the query grid (see :func:`piip_kernels.deform_cross_attn`).

        Args:
            query: [N, Hq*Wq, C]; query_hw: (Hq, Wq).
            input_flatten: [N, Hv*Wv, d_feat]; input_hw: (Hv, Wv).

        Returns:
            [N, Hq*Wq, C], equal to ``forward`` with the grid reference points.
        """
        N, M = input_flatten.shape[0], self.n_heads
        value = self.value_proj(input_flatten).view(N, input_flatten.shape[1], M, self.value_dim // M)
        return self.output_proj(self.sample_grid(query, query_hw, value, input_hw))

    def sample_grid(self, query: Tensor, query_hw, value: Tensor, input_hw) -> Tensor:
        """``forward_grid`` between the projections: offsets and weights from ``query``,
        sampling of the already projected ``value`` [N, Hv*Wv, M, D] -> [N, Hq*Wq, M*D], before
        ``output_proj`` (callers that run the projections in another dtype use it)."""
        from ..dca.api import deform_cross_attn  # dca builds on msda: import at call time

        if self.n_levels != 1:
            raise ValueError(f"MSDeformAttn.forward_grid needs n_levels == 1, this module has {self.n_levels}")
        N, Lq, _ = query.shape
        M, P = self.n_heads, self.n_points
        offsets = self.sampling_offsets(query).view(N, Lq, M, P, 2)
        logits = self.attention_weights(query).view(N, Lq, M, P)
        return deform_cross_attn(value, input_hw, offsets, logits, query_hw, backend=self.backend)
