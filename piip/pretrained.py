"""Initialising one branch from a plain backbone checkpoint: ViT (DeiT, DeiT III, AugReg;
timm-style names), ConvNeXt (transformers ``ConvNextModel`` / ``ConvNextForImageClassification``,
timm / open_clip) and CLIP vision towers (transformers ``CLIPVisionModel`` / ``CLIPModel``)."""
from __future__ import annotations

import logging
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models.convnext import convnext_official_key
from .models.keys import check_materialized, strip_ddp_prefix
from .models.piip import find_piip

log = logging.getLogger("piip")


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


def load_pretrained_branch(model: nn.Module, branch_index: int, path_or_state_dict, verbose: bool = True,
                           allow_partial: bool = False) -> dict:
    """Load a plain backbone checkpoint into branch ``branch_index`` (0-based).

    ConvNeXt branches take transformers (``ConvNextModel``, ``ConvNextForImageClassification``)
    and timm / open_clip ConvNeXt checkpoints; CLIP branches transformers ``CLIPVisionModel``
    or ``CLIPModel`` ones (see :func:`_convnext_weights`, :func:`_clip_weights`). ViT branches
    take timm / DeiT / DeiT III names: the position embedding is resized bicubically to the branch's stored grid (its cls slot
    kept or dropped as the branch needs), and a patch embedding of another patch size
    (e.g. 14 for InternViT-6B) is resized bilinearly to ours. Layer scales named
    ``gamma_1``/``ls1.gamma`` both load. Files or dicts that hold the weights under
    ``model``, ``state_dict`` or ``module``, and DDP's ``module.`` prefix, are unwrapped.

    ``model`` is a :class:`~piip.PIIP` or any module holding exactly one (a backbone wrapper,
    a task model). The load is all or nothing: unless ``allow_partial=True``, a checkpoint
    that leaves a branch parameter unfilled (missing) or holds backbone weights the branch has
    no place for (unexpected, e.g. a deeper model's blocks, or another branch kind) is refused
    with a ValueError that lists them, and nothing is loaded. What plain checkpoints carry
    beside the backbone (classification heads and their norms, a class or distillation token
    the branch does not use, the rest of a CLIP or LLaVA model) is ignored. A branch built on
    the meta device takes the checkpoint's tensors (assign; copies of a dict passed in, in the
    parameters' dtype) and must be filled completely.

    Returns ``{"loaded", "missing", "unexpected", "ignored", "resized"}``: our names loaded and
    missing, checkpoint names unexpected and ignored, and ``{our name: [checkpoint shape, our
    shape]}`` of the tensors resized. The report is logged (logger ``piip``) and, with
    ``verbose``, printed.
    """
    from .official import read_checkpoint

    target = find_piip(model, "load_pretrained_branch")
    if not 0 <= branch_index < len(target.branches):
        raise IndexError(f"load_pretrained_branch: branch_index {branch_index} is out of range for "
                         f"{len(target.branches)} branches (0-based)")
    sd = read_checkpoint(path_or_state_dict)
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    sd = strip_ddp_prefix(sd)
    where = f"load_pretrained_branch: branch {branch_index + 1}"
    if not sd:
        raise ValueError(f"{where}: the checkpoint is empty (no tensors)")
    branch = target.branches[branch_index]
    read = {"vit": _vit_weights, "convnext": _convnext_weights, "clip": _clip_weights}[branch.cfg.kind]
    new, unexpected, ignored, resized = read(branch, sd)
    ours = branch.state_dict()
    for k, v in new.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise ValueError(f"{where}: {k} has shape {tuple(v.shape)}, the branch expects {tuple(ours[k].shape)}")
    report = {"loaded": sorted(new), "missing": sorted(set(ours) - set(new)), "unexpected": sorted(unexpected),
              "ignored": sorted(ignored), "resized": resized}
    if (report["missing"] or report["unexpected"]) and not allow_partial:
        raise ValueError(f"{where} ({branch.cfg.kind}): the checkpoint does not fit the branch "
                         f"({len(report['missing'])} missing, {len(report['unexpected'])} unexpected); nothing was loaded."
                         + _listed(report, ("missing", "unexpected"))
                         + "\nPass allow_partial=True to load what matches and leave the rest as it is.")
    meta = any(t.is_meta for t in ours.values())
    if meta:  # assigned: in the parameters' dtype, and never shared with a dict the caller keeps
        new = {k: v.to(dtype=ours[k].dtype if v.is_floating_point() else v.dtype, copy=isinstance(path_or_state_dict, dict))
               for k, v in new.items()}
    branch.load_state_dict(new, strict=False, assign=meta)
    if meta:
        check_materialized(branch, where)
    summary = (f"branch {branch_index + 1}: loaded {len(new)} tensors; {len(report['missing'])} missing; "
               f"{len(report['unexpected'])} unexpected; {len(report['ignored'])} ignored; "
               f"resized {', '.join(resized) or 'none'}" + _listed(report, ("missing", "unexpected", "ignored")))
    log.info(summary)
    if verbose:
        print(summary)
    return report


def _listed(report: dict, kinds) -> str:
    return "".join(f"\n  {k}: " + ", ".join(report[k][:20]) + (" ..." if len(report[k]) > 20 else "")
                   for k in kinds if report[k])


# Checkpoint entries (after any wrapper prefix) that plain ViT checkpoints carry beside the
# backbone: classification and distillation heads, their norms and tokens, DINOv2's mask token.
_VIT_EXTRAS = re.compile(r"^(head|head_dist|fc_norm|pre_logits)\.|^(dist_token|mask_token|reg_token|cls_token)$|^norm\.")


def _vit_weights(branch, sd: dict) -> tuple[dict, list, list, dict]:
    """timm / DeiT / DeiT III names; position table and patch embedding resized to the branch's.
    Returns (our name -> tensor, unexpected, ignored, resized)."""
    cfg = branch.cfg
    ours = branch.state_dict()
    new, unexpected, ignored, resized = {}, [], [], {}
    for k, v in sd.items():
        t = k
        t = re.sub(r"^patch_embed\.proj\.", "patch_embed.", t)
        t = re.sub(r"^(blocks\.\d+\.)(?:gamma_|ls)([12])(?:\.gamma)?$", r"\1ls\2", t)
        if t not in ours:
            (ignored if _VIT_EXTRAS.search(t) else unexpected).append(k)
            continue
        src = tuple(v.shape)
        if t == "pos_embed":
            grid_tokens = v.shape[1]
            has_cls = int(round((grid_tokens - 1) ** 0.5)) ** 2 == grid_tokens - 1
            v = _resize_pos_embed(v, cfg.pos_embed_grid, has_cls, cfg.pos_embed_cls_slot)
        elif t == "patch_embed.weight" and v.shape[-1] != cfg.patch_size:
            v = F.interpolate(v.float(), size=(cfg.patch_size, cfg.patch_size), mode="bilinear",
                              align_corners=False).to(v.dtype)
        if tuple(v.shape) != src:
            resized[t] = [src, tuple(v.shape)]
        new[t] = v
    return new, unexpected, ignored, resized


def _strip_to(sd: dict, marker: str) -> tuple[dict, list]:
    """Keys from where ``marker`` starts (dropping a prefix such as ``convnext.``,
    ``vision_model.`` or ``visual.trunk.``); keys without that prefix (the rest of a larger
    model: a classifier, a text tower) are returned to be ignored."""
    hit = next((k for k in sd if k.endswith(marker)), None)
    if hit is None:
        raise ValueError(f"checkpoint has no {marker!r}: not a checkpoint of this branch kind")
    prefix = hit[: -len(marker)]
    kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return kept, [k for k in sd if not k.startswith(prefix)]


def _convnext_weights(branch, sd: dict) -> tuple[dict, list, list, dict]:
    """transformers (``embeddings.*``, ``encoder.stages.*``) or timm / open_clip (``stem.*``,
    ``stages.*``) names; the layer scale may be ``gamma`` or ``weight``. Heads are ignored."""
    hf = any(k.endswith("embeddings.patch_embeddings.weight") for k in sd)
    sd, ignored = _strip_to(sd, "embeddings.patch_embeddings.weight" if hf else "stem.0.weight")
    if not hf:
        sd = {re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k): v for k, v in sd.items()}
    names = {convnext_official_key(k[len("convnext."):], "hf" if hf else "timm"): k for k in branch.state_dict()}
    new, unexpected = {}, []
    for k, v in sd.items():
        if k in names:
            new[names[k]] = v
        else:
            (ignored if k.startswith(("head.", "classifier.")) else unexpected).append(k)
    return new, unexpected, ignored, {}


def _clip_weights(branch, sd: dict) -> tuple[dict, list, list, dict]:
    """transformers CLIP vision names; a patch embedding of another patch size (CLIP-L/14)
    is resized bicubically to the branch's (the official 14-to-16 conversion) and the patch
    rows of the position table bicubically (fp32) to the branch's stored grid."""
    sd, ignored = _strip_to(sd, "embeddings.class_embedding")
    ours = {k[len("clip."):]: k for k in branch.state_dict()}
    emb = branch.clip.embeddings
    new, unexpected, resized = {}, [], {}
    for k, v in sd.items():
        if k == "embeddings.position_ids":  # a buffer of transformers' model, not a weight
            ignored.append(k)
            continue
        if k not in ours:
            unexpected.append(k)
            continue
        src = tuple(v.shape)
        if k == "embeddings.patch_embedding.weight" and v.shape[-1] != emb.patch_size:
            v = F.interpolate(v.float(), size=(emb.patch_size, emb.patch_size), mode="bicubic",
                              align_corners=False).to(v.dtype)
        elif k == "embeddings.position_embedding.weight" and v.shape[0] != emb.grid * emb.grid + 1:
            v = _resize_pos_embed(v[None], (emb.grid, emb.grid), True, True)[0]
        if tuple(v.shape) != src:
            resized[ours[k]] = [src, tuple(v.shape)]
        new[ours[k]] = v
    return new, unexpected, ignored, resized
