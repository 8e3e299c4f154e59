"""Initialising one branch from a plain backbone checkpoint: ViT (DeiT, DeiT III, AugReg;
timm-style names), ConvNeXt (transformers ``ConvNextModel`` / ``ConvNextForImageClassification``,
timm / open_clip) and CLIP vision towers (transformers ``CLIPVisionModel`` / ``CLIPModel``)."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.convnext import convnext_official_key
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
    """Load a plain backbone checkpoint into branch ``branch_index`` (0-based).

    ConvNeXt branches take transformers (``ConvNextModel``, ``ConvNextForImageClassification``)
    and timm / open_clip ConvNeXt checkpoints; CLIP branches transformers ``CLIPVisionModel``
    or ``CLIPModel`` ones (see :func:`_convnext_weights`, :func:`_clip_weights`). ViT branches
    take timm / DeiT / DeiT III names: the position embedding is resized bicubically to the branch's stored grid (its cls slot
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
    read = {"vit": _vit_weights, "convnext": _convnext_weights, "clip": _clip_weights}[branch.cfg.kind]
    loaded, unexpected = read(branch, sd)
    return _finish(branch, branch_index, loaded, unexpected, verbose)


def _vit_weights(branch, sd: dict) -> tuple[dict, list]:
    """timm / DeiT / DeiT III names; position table and patch embedding resized to the branch's."""
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
        new[t] = v
    return new, unexpected


def _finish(branch, branch_index: int, new: dict, unexpected: list, verbose: bool) -> dict:
    """Check the shapes of what was read (our names), load it, report missing / unexpected."""
    ours = branch.state_dict()
    for k, v in new.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"branch {branch_index}: {k} has shape {tuple(v.shape)}, the branch expects {tuple(ours[k].shape)}")
    missing = sorted(set(ours) - set(new))
    branch.load_state_dict(new, strict=False)
    if verbose:
        print(f"branch {branch_index}: loaded {len(new)} tensors; missing {missing or 'none'}; unexpected {unexpected or 'none'}")
    return {"missing": missing, "unexpected": unexpected}


def _strip_to(sd: dict, marker: str) -> tuple[dict, list]:
    """Keys from where ``marker`` starts (dropping a prefix such as ``convnext.``,
    ``vision_model.`` or ``visual.trunk.``); keys without that prefix are returned as unexpected."""
    hit = next((k for k in sd if k.endswith(marker)), None)
    if hit is None:
        raise ValueError(f"checkpoint has no {marker!r}: not a checkpoint of this branch kind")
    prefix = hit[: -len(marker)]
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return kept, [k for k in sd if not k.startswith(prefix)]


def _convnext_weights(branch, sd: dict) -> tuple[dict, list]:
    """transformers (``embeddings.*``, ``encoder.stages.*``) or timm / open_clip (``stem.*``,
    ``stages.*``) names; the layer scale may be ``gamma`` or ``weight``. Heads are ignored."""
    hf = any(k.endswith("embeddings.patch_embeddings.weight") for k in sd)
    sd, unexpected = _strip_to(sd, "embeddings.patch_embeddings.weight" if hf else "stem.0.weight")
    if not hf:
        sd = {re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k): v for k, v in sd.items()}
    names = {convnext_official_key(k[len("convnext."):], "hf" if hf else "timm"): k for k in branch.state_dict()}
    new = {}
    for k, v in sd.items():
        if k in names:
            new[names[k]] = v
        else:
            unexpected.append(k)
    return new, unexpected


def _clip_weights(branch, sd: dict) -> tuple[dict, list]:
    """transformers CLIP vision names; a patch embedding of another patch size (CLIP-L/14)
    is resized bicubically to the branch's (the official 14-to-16 conversion) and the patch
    rows of the position table bicubically (fp32) to the branch's stored grid."""
    sd, unexpected = _strip_to(sd, "embeddings.class_embedding")
    ours = {k[len("clip."):]: k for k in branch.state_dict()}
    emb = branch.clip.embeddings
    new = {}
    for k, v in sd.items():
        if k == "embeddings.position_ids" or k not in ours:
            if k != "embeddings.position_ids":
                unexpected.append(k)
            continue
        if k == "embeddings.patch_embedding.weight" and v.shape[-1] != emb.patch_size:
            v = F.interpolate(v.float(), size=(emb.patch_size, emb.patch_size), mode="bicubic",
                              align_corners=False).to(v.dtype)
        elif k == "embeddings.position_embedding.weight" and v.shape[0] != emb.grid * emb.grid + 1:
            v = _resize_pos_embed(v[None], (emb.grid, emb.grid), True, True)[0]
        new[ours[k]] = v
    return new, unexpected
