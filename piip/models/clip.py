"""CLIP's vision transformer as PIIP-LLaVA uses it, with the official (transformers
``CLIPVisionModel.vision_model``) parameter names, so released weights load by name.

Differences from a DeiT-style branch: a class embedding, a patch conv without bias, a
position table with a leading class slot (the patch part resized bicubically in fp32 when
the token grid differs from the stored one), ``pre_layrnorm`` before the encoder, separate
q/k/v projections, quick-GELU MLPs, and a ``post_layernorm`` that is built (checkpoints hold
it) but not on the output path PIIP uses, so it gets no gradient.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.resize import resize_grid_tokens


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"CLIP attention: width {dim} not divisible by {heads} heads")
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, C] -> [B, N, C], global attention."""
        B, N, C = x.shape
        q, k, v = (p(x).view(B, N, self.heads, C // self.heads).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class CLIPMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = CLIPAttention(dim, heads)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = CLIPMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, dim: int, patch: int, grid: int):
        super().__init__()
        self.patch_size, self.grid = patch, grid
        self.class_embedding = nn.Parameter(torch.randn(dim) * dim ** -0.5)
        self.patch_embedding = nn.Conv2d(3, dim, patch, patch, bias=False)
        self.position_embedding = nn.Embedding(grid * grid + 1, dim)
        # "interpolate" (F.interpolate, as transformers) or "matmul" (piip.layers.resize:
        # the same weights as two small matmuls, equal to rounding, no atomic backward).
        self.pos_embed_resize = "interpolate"

    def position_table(self, hw: tuple[int, int]) -> Tensor:
        """[1 + H*W, C]: the class slot, then the patch table resized bicubically in fp32 to hw
        (by ``pos_embed_resize``: "interpolate" or "matmul")."""
        table = self.position_embedding.weight
        if tuple(hw) == (self.grid, self.grid):
            return table
        if self.pos_embed_resize == "matmul":
            patches = resize_grid_tokens(table[None, 1:].float(), (self.grid, self.grid), tuple(hw), "bicubic")[0]
        else:
            patches = table[1:].float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
            patches = F.interpolate(patches, size=tuple(hw), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)[0]
        return torch.cat([table[:1], patches.to(table.dtype)], 0)

    def forward(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """img [B, 3, h, w] -> tokens [B, 1 + H*W, C] (class token first) and (H, W)."""
        x = self.patch_embedding(img.to(self.patch_embedding.weight.dtype))
        hw = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], 1) + self.position_table(hw).to(x.dtype), hw


class CLIPEncoder(nn.Module):
    def __init__(self, dim, depth, heads, mlp_ratio, eps):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(dim, heads, mlp_ratio, eps) for _ in range(depth))


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower. ``forward(img)`` -> tokens [B, 1 + H*W, C] after the last layer
    (no ``post_layernorm``); ``embed`` and ``run_layers`` run it piecewise, as a PIIP branch.

    Sizes: CLIP-B/16 (768, 12 layers, 12 heads), CLIP-L (1024, 24, 16)."""

    def __init__(self, dim: int = 1024, depth: int = 24, heads: int = 16, patch: int = 14, image_size: int = 336,
                 mlp_ratio: float = 4.0, eps: float = 1e-5):
        super().__init__()
        self.embeddings = CLIPEmbeddings(dim, patch, image_size // patch)
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)
        self.encoder = CLIPEncoder(dim, depth, heads, mlp_ratio, eps)
        self.post_layernorm = nn.LayerNorm(dim, eps=eps)

    def embed(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x, hw = self.embeddings(img)
        return self.pre_layrnorm(x), hw

    def run_layers(self, x: Tensor, start: int, end: int) -> Tensor:
        """Layers start..end (inclusive) on tokens [B, 1 + N, C]."""
        for layer in self.encoder.layers[start:end + 1]:
            x = layer(x)
        return x

    def forward(self, img: Tensor) -> Tensor:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"CLIP expects images [B, 3, H, W], got {tuple(img.shape)}")
        p = self.embeddings.patch_size
        if img.shape[-2] % p or img.shape[-1] % p:
            raise ValueError(f"CLIP: image size {tuple(img.shape[-2:])} is not a multiple of the patch size {p}")
        x, _ = self.embed(img)
        return self.run_layers(x, 0, len(self.encoder.layers) - 1)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor], prefix: str = "", heads: int | None = None,
                        eps: float = 1e-5) -> "CLIPVisionTransformer":
        """Built from an official state dict's shapes (keys under ``prefix``) and loaded
        strictly. The head count is not in the weights: 64-channel heads unless given."""
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        sd.pop("embeddings.position_ids", None)  # a non-persistent buffer in recent transformers
        dim, _, patch, _ = sd["embeddings.patch_embedding.weight"].shape
        grid = math.isqrt(sd["embeddings.position_embedding.weight"].shape[0] - 1)
        depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
        hidden = sd["encoder.layers.0.mlp.fc1.weight"].shape[0]
        model = cls(dim, depth, heads or dim // 64, patch, grid * patch, hidden / dim, eps)
        model.load_state_dict(sd, strict=True)
        return model
