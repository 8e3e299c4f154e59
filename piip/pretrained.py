"""Initialising one branch from a plain ViT checkpoint (DeiT, DeiT III, AugReg; timm-style names)."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.piip import PIIP


def _resize_pos_embed(pe: Tensor, grid: tuple[int, int], has_cls_in: bool, want_cls: bool) -> Tensor:
    """[1, (1+)g*g, C] -> [1, (1+)gh*gw, C], bicubic in fp32."""
    cls = pe[:, :1] if has_cls_in else None
    tok = pe[:, 1:] if has_cls_in else pe
    n = tok.shape[1]
    g = int(round(n ** 0.5))
    if g * g != n:
        raise ValueError(f"position embedding with {n} tokens is not a square grid")
    if (g, g) != tuple(grid):
        tok = F.interpolate(tok.float().reshape(1, g, g, -1).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                            align_corners=False).flatten(2).transpose(1, 2).to(pe.dtype)
    if want_cls:
        cls = cls if cls is not None else torch.zeros_like(tok[:, :1])
        tok = torch.cat([cls, tok], 1)
    return tok


def load_pretrained_branch(model: PIIP, branch_index: int, path_or_state_dict, verbose: bool = True) -> dict:
    """Load a ViT checkpoint (timm / DeiT / DeiT III names) into branch ``branch_index`` (0-based).

    The position embedding is resized bicubically to the branch's stored grid (its cls slot
    kept or dropped as the branch needs), and a patch embedding of another patch size
    (e.g. 14 for InternViT-6B) is resized bilinearly to ours. Layer scales named
    ``gamma_1``/``ls1.gamma`` both load. Heads and final norms of classification
    checkpoints are ignored unless the branch has them.

    Returns ``{"missing": [...], "unexpected": [...]}`` (our names / checkpoint names) and prints them.
    """
    sd = path_or_state_dict
    if not isinstance(sd, dict):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    branch = model.branches[branch_index]
    cfg = branch.cfg
    ours = branch.state_dict()
    new, unexpected = {}, []
    for k, v in sd.items():
        t = k
        t = re.sub(r"^patch_embed\.proj\.", "patch_embed.", t)
        t = re.sub(r"^(blocks\.\d+\.)(?:gamma_|ls)([12])(?:\.gamma)?$", r"\1ls\2", t)
        if t == "pos_embed":
            grid_tokens = v.shape[1]
            has_cls = int(round((grid_tokens - 1) ** 0.5)) ** 2 == grid_tokens - 1
            v = _resize_pos_embed(v, cfg.pos_embed_grid, has_cls, cfg.pos_embed_cls_slot)
        elif t == "patch_embed.weight" and v.shape[-1] != cfg.patch_size:
            v = F.interpolate(v.float(), size=(cfg.patch_size, cfg.patch_size), mode="bilinear",
                              align_corners=False).to(v.dtype)
        if t not in ours:
            unexpected.append(k)
            continue
        if tuple(v.shape) != tuple(ours[t].shape):
            raise ValueError(f"branch {branch_index}: {k} has shape {tuple(v.shape)}, the branch expects {tuple(ours[t].shape)}")
        new[t] = v
    missing = sorted(set(ours) - set(new))
    branch.load_state_dict(new, strict=False)
    if verbose:
        print(f"branch {branch_index}: loaded {len(new)} tensors; missing {missing or 'none'}; unexpected {unexpected or 'none'}")
    return {"missing": missing, "unexpected": unexpected}
