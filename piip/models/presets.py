"""Every ViT configuration of the PIIP papers as data.

Names are the official config names (as in the paper's tables and configs). Each row gives
the task, the window layout, and per branch (family, size, resolution, drop-path rate),
branch 1 first (largest model, smallest image). Everything else follows from the family
tables below. ``tests/test_presets.py`` checks every row against the paper's config list.

Model forms: ``create_model(name)`` builds the paper's model (detection and segmentation
presets: the backbone with conv merge and simple feature pyramid; classification presets:
separate heads, averaged). ``official_config`` turns it into what the official code builds,
whose parameter count matches the official one exactly.
"""
from __future__ import annotations

import contextlib
from dataclasses import replace

import torch

from .config import BranchConfig, PIIPConfig, convnext_stage_groups
from .convnext import CONVNEXT_SIZES

# width, depth, heads
SIZES = {"T": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16),
         "H": (1280, 32, 16), "6B": (3200, 48, 25)}

# Per family: implementation class (official key names), pretraining image size (the
# stored position-embedding grid is pretrain // 16), layer-scale init, norm, qk-norm, qkv bias.
FAMILIES = {
    "deit":      dict(family="deit", pretrain=224, layer_scale=1.0),
    "deit3":     dict(family="deit", pretrain=224, layer_scale=1.0),
    "deit3_384": dict(family="deit", pretrain=384, layer_scale=1.0),
    "augreg":    dict(family="internvit", pretrain=384, layer_scale=1.0),
    "mae":       dict(family="internvit", pretrain=224, layer_scale=1.0),
    "dinov2":    dict(family="internvit", pretrain=518, layer_scale=1.0),
    "internvit": dict(family="internvit", pretrain=224, layer_scale=0.1, norm="rmsnorm", qk_norm="rmsnorm", qkv_bias=False),
}


def split_stages(depth: int, stages: int) -> tuple[tuple[int, int], ...]:
    """Blocks per stage as even as possible, the longer stages last (the official split)."""
    base, extra = divmod(depth, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s >= stages - extra else 0)
        out.append((start, start + n - 1))
        start += n
    return tuple(out)


def _windows(spec, depth):
    if spec is None:
        return (None,) * depth
    pattern, size = spec
    return tuple(size if pattern[i % len(pattern)] == "W" else None for i in range(depth))


PRESETS: dict[str, PIIPConfig] = {}


def _branch(i, n, fam, dims, res, window, interactions, run_grid, cls_token, drop_layer_scale=False, **kw):
    """Branch i of n: the family's defaults (FAMILIES), widths ``dims`` = (C, depth, heads), its
    resolution and window spec. ``run_grid``: the position table is stored at the run grid
    (classification and segmentation configs) instead of the pretraining grid (detection)."""
    f = dict(FAMILIES[fam])
    pretrain, family, layer_scale = f.pop("pretrain"), f.pop("family"), f.pop("layer_scale")
    C, depth, heads = dims
    grid = res // 16 if run_grid else pretrain // 16
    return BranchConfig(
        name=f"branch{i + 1}", embed_dim=C, depth=depth, num_heads=heads, image_size=res,
        interaction_indexes=split_stages(depth, interactions) if n > 1 else (),
        window_sizes=_windows(window, depth), layer_scale=None if drop_layer_scale else layer_scale,
        pos_embed_grid=(grid, grid), pos_embed_cls_slot=family == "internvit", cls_token=cls_token, family=family,
        pad_before_qkv=False, **f, **kw)


def _row(name, task, window, branches, interactions=12, speedup=False, fused_mlp=False, dino=False, official_all_fpn=False):
    cls = task == "classification"
    # The AugReg (InternViT-class) classification branches have no layer scale.
    bcs = [_branch(i, len(branches), fam, SIZES[size], res, window, interactions, task in ("classification", "segmentation"),
                   cls, drop_layer_scale=cls and FAMILIES[fam]["family"] == "internvit",
                   mlp_act="gelu_tanh" if fused_mlp else "gelu", drop_path_rate=dpr)
           for i, (fam, size, res, dpr) in enumerate(branches)]
    PRESETS[name] = PIIPConfig(
        branches=tuple(bcs),
        output="classification" if cls else "detection",
        interaction_proj=not speedup, interaction_norm="none" if speedup else "layernorm",
        interaction_drop_path=0.4, fpn_levels=(1, 2, 3) if dino else (0, 1, 2, 3), name=name,
        extra={"task": task, "official_all_fpn": official_all_fpn})


_row("dino_4scale_internvit_h6b_1024_768_fpn_1x_coco_bs32_ms", "detection", None, [("internvit", "6B", 768, 0.4), ("mae", "H", 1024, 0.4)], dino=True)
_row("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms", "detection", None, [("internvit", "6B", 512, 0.4), ("mae", "H", 1024, 0.4)])
_row("mask_rcnn_internvit_h6b_1024_512_fpn_1x_coco_bs16_ms_speedup", "detection", None, [("internvit", "6B", 512, 0.4), ("mae", "H", 1024, 0.4)], speedup=True, fused_mlp=True)
_row("dino_4scale_deit_384_sbl_1792_1120_672_fpn_3x_coco_bs32_ms", "detection", ("WWG", 24), [("deit3_384", "L", 672, 0.4), ("deit3_384", "B", 1120, 0.15), ("deit3_384", "S", 1792, 0.05)], dino=True, official_all_fpn=True)
_row("dino_4scale_internvit_lh6b_1536_1024_512_fpn_2x_coco_bs32_ms", "detection", None, [("internvit", "6B", 512, 0.4), ("mae", "H", 1024, 0.4), ("deit3_384", "L", 1536, 0.4)], interactions=4, speedup=True, fused_mlp=True, dino=True, official_all_fpn=True)
_row("mask_rcnn_internvit_lh6b_1536_1024_512_fpn_1x_coco_bs32_ms", "detection", None, [("internvit", "6B", 512, 0.4), ("mae", "H", 1024, 0.4), ("deit3_384", "L", 1536, 0.4)], interactions=4, speedup=True, fused_mlp=True)
_row("mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16", "detection", ("W", 28), [("augreg", "L", 672, 0.4), ("augreg", "B", 1120, 0.3), ("augreg", "S", 1568, 0.2)])
_row("mask_rcnn_augreg_sbl_1568_1120_672_fpn_1x_coco_bs16_speedup", "detection", ("W", 28), [("augreg", "L", 672, 0.4), ("augreg", "B", 1120, 0.3), ("augreg", "S", 1568, 0.2)], speedup=True, fused_mlp=True)
_row("mask_rcnn_deit_sbl_1120_672_448_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 448, 0.4), ("deit3", "B", 672, 0.15), ("deit3", "S", 1120, 0.05)])
_row("mask_rcnn_deit_sbl_1344_896_448_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 448, 0.4), ("deit3", "B", 896, 0.15), ("deit3", "S", 1344, 0.05)])
_row("mask_rcnn_deit_sbl_1568_1120_672_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 672, 0.4), ("deit3", "B", 1120, 0.15), ("deit3", "S", 1568, 0.05)])
_row("mask_rcnn_deit_sbl_1568_896_672_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 672, 0.4), ("deit3", "B", 896, 0.15), ("deit3", "S", 1568, 0.05)])
_row("mask_rcnn_deit_tsb_1120_896_448_fpn_1x_coco_bs16", "detection", ("W", 14), [("deit3", "B", 448, 0.15), ("deit3", "S", 896, 0.05), ("deit", "T", 1120, 0.05)])
_row("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16", "detection", ("W", 14), [("deit3", "B", 672, 0.15), ("deit3", "S", 1120, 0.05), ("deit", "T", 1568, 0.05)])
_row("mask_rcnn_deit_tsb_1568_896_448_fpn_1x_coco_bs16", "detection", ("W", 14), [("deit3", "B", 448, 0.15), ("deit3", "S", 896, 0.05), ("deit", "T", 1568, 0.05)])
_row("mask_rcnn_dinov2_sbl_1568_1120_672_fpn_1x_coco_bs16", "detection", ("W", 28), [("dinov2", "L", 672, 0.4), ("dinov2", "B", 1120, 0.3), ("dinov2", "S", 1568, 0.2)])
_row("mask_rcnn_mae_sbl_1568_1120_672_fpn_1x_coco_bs16", "detection", ("W", 28), [("mae", "L", 672, 0.4), ("mae", "B", 1120, 0.15), ("deit3", "S", 1568, 0.05)])
_row("mask_rcnn_deit_tsbl_1344_896_672_448_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 448, 0.4), ("deit3", "B", 672, 0.15), ("deit3", "S", 896, 0.05), ("deit", "T", 1344, 0.05)])
_row("mask_rcnn_deit_tsbl_1568_1120_672_448_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 448, 0.4), ("deit3", "B", 672, 0.15), ("deit3", "S", 1120, 0.05), ("deit", "T", 1568, 0.05)])
_row("mask_rcnn_deit_tsbl_1792_1568_1120_448_fpn_1x_coco_bs16", "detection", ("W", 28), [("deit3", "L", 448, 0.4), ("deit3", "B", 1120, 0.15), ("deit3", "S", 1568, 0.05), ("deit", "T", 1792, 0.05)])
_row("mask_rcnn_deit_vit_b_fpn_1x_coco_bs16", "detection", ("WWG", 14), [("deit3", "B", 1024, 0.15)])
_row("mask_rcnn_deit_vit_l_fpn_1x_coco_bs16", "detection", ("WWG", 14), [("deit3", "L", 1024, 0.4)])
_row("mask_rcnn_internvit_6b_fpn_1x_coco_bs16_ms", "detection", None, [("internvit", "6B", 1024, 0.4)])
_row("upernet_internvit_h6b_192_512_80k_ade20k_bs16_lr4e-5", "segmentation", None, [("internvit", "6B", 192, 0.4), ("mae", "H", 512, 0.4)], speedup=True, fused_mlp=True)
_row("upernet_internvit_h6b_256_512_80k_ade20k_bs16_lr4e-5", "segmentation", None, [("internvit", "6B", 256, 0.4), ("mae", "H", 512, 0.4)], speedup=True, fused_mlp=True)
_row("upernet_internvit_h6b_384_512_80k_ade20k_bs16_lr4e-5", "segmentation", None, [("internvit", "6B", 384, 0.4), ("mae", "H", 512, 0.4)], speedup=True, fused_mlp=True)
_row("upernet_internvit_h6b_512_512_80k_ade20k_bs16_lr4e-5", "segmentation", None, [("internvit", "6B", 512, 0.4), ("mae", "H", 512, 0.4)], speedup=True, fused_mlp=True)
_row("upernet_internvit_6b_512_80k_ade20k_bs16_lr4e-5", "segmentation", None, [("internvit", "6B", 512, 0.4)], fused_mlp=True)
_row("piip_3branch_sbl_320-160-96_cls_token_augreg", "classification", None, [("augreg", "L", 96, 0.4), ("augreg", "B", 160, 0.2), ("augreg", "S", 320, 0.05)])
_row("piip_3branch_sbl_384-192-128_cls_token_augreg", "classification", None, [("augreg", "L", 128, 0.4), ("augreg", "B", 192, 0.2), ("augreg", "S", 384, 0.05)])
_row("piip_3branch_tsb_368-192-128_cls_token_deit1", "classification", None, [("deit", "B", 128, 0.2), ("deit", "S", 192, 0.05), ("deit", "T", 368, 0.05)])


# ---------------------------------------------------------------------------------------
# Paper-only rows: configurations the papers report (tables I, II, VIII, X) that have no
# official config file. They are built from the same data and counted the same way;
# ``list_models(paper_only=True)`` lists them. Where the paper leaves a detail open, the
# choice is stated beside the row.
PAPER_ONLY: set[str] = set()


def _paper_row(name, output, branches, interactions=12, window=None, task=None, cls_token=None, windows=None,
               counting=None, **kw):
    """branches: (embed_dim, depth, heads, resolution, family) per branch, branch 1 first;
    ``window`` applies to every branch, ``windows`` gives one spec per branch."""
    cls = output != "detection"
    bcs = [_branch(i, len(branches), fam, (C, depth, heads), res, windows[i] if windows is not None else window,
                   interactions, cls, cls if cls_token is None else cls_token, drop_layer_scale=cls)
           for i, (C, depth, heads, res, fam) in enumerate(branches)]
    PRESETS[name] = PIIPConfig(branches=tuple(bcs), output=output, interaction_drop_path=0.4 if len(bcs) > 1 else 0.0,
                               name=name, extra={"task": task or ("detection" if output == "detection" else "classification"),
                                                 "paper_only": True, **({"counting": counting} if counting else {})}, **kw)
    PAPER_ONLY.add(name)


# Table X: PIIP-B trained from scratch, 512/256/128, widths 640/320/160 (12 layers; 8/4/2
# heads), with the merged classification head that the paper's "Branch Merging" row counts
# (no cls token). The paper does not give the attention layout; its branch-3 figure (4.9G)
# is what window attention of side 16 gives (global attention would be 7.9G); a window of
# 16 covers the whole 8x8 and 16x16 grids of branches 1 and 2, which are global. DeiT-style
# blocks without layer scale (layer scale would add 2C parameters per block).
_paper_row("piip_3branch_b_512-256-128_scratch", "classification_merged",
           [(640, 12, 8, 128, "deit"), (320, 12, 4, 256, "deit"), (160, 12, 2, 512, "deit")],
           windows=(None, None, ("W", 16)), cls_token=False)
# Table X: the single-branch ViT-B trained the same way (224).
_paper_row("vit_b_224_scratch", "classification", [(768, 12, 12, 224, "deit")])
# Table VIII: DeiT-B (224) and ViT-L (224, AugReg) classification baselines.
_paper_row("deit_b_224", "classification", [(768, 12, 12, 224, "deit")])
_paper_row("vit_l_224_augreg", "classification", [(1024, 24, 16, 224, "augreg")])
# Table II: the ViT/ViT/ViT row at 1024/672/448 (225G), a DeiT TSB built like the table's
# hybrid detectors (window 14 in every block, pretraining grids, merges after interactions 0,
# 1 and 10 and the ViT regular FPN) and counted as their script counts them.
_paper_row("mask_rcnn_deit_tsb_1024_672_448_paper", "detection",
           [(768, 12, 12, 448, "deit3"), (384, 12, 6, 672, "deit3"), (192, 12, 3, 1024, "deit")],
           window=("W", 14), task="detection", counting="det", fpn="regular", out_indexes=(0, 1, 10))


# ---------------------------------------------------------------------------------------
# ConvNeXt, hybrid and PIIP-LLaVA rows (the papers' Table II and Tables XI-XIII). A
# ConvNeXt branch's layers are the official flattened list (stage-0 blocks, stage-1
# downsampling layer, stage-1 blocks, ...); its groups are given as in the official configs.

def _groups(start: int, n: int, k: int) -> list[tuple[int, int]]:
    """n layers from ``start`` in k groups as even as possible, the longer groups first."""
    base, extra = divmod(n, k)
    out = []
    for g in range(k):
        size = base + (1 if g < extra else 0)
        out.append((start, start + size - 1))
        start += size
    return out


# The 24-group split of the 13B PIIP-LLaVA configs, as the official files list it (it halves
# the 12 groups, but not by one rule: [3, 6] becomes 2 + 2 layers, [7, 10] 3 + 1).
_CONVNEXT_24 = ((0, 1), (2, 2), (3, 4), (5, 6), (7, 9), (10, 10), (11, 12), (13, 13), (14, 15), (16, 16), (17, 18),
                (19, 19), (20, 21), (22, 22), (23, 24), (25, 25), (26, 27), (28, 28), (29, 30), (31, 31), (32, 33),
                (34, 34), (35, 36), (37, 38))


def _convnext_groups(depths, k: int) -> tuple[tuple[int, int], ...]:
    """The official ConvNeXt splits: 12 groups = stages 0, 1 and 3 whole and stage 2 in 9
    (longer first); 24 (depths 3/3/27/3 only) and 2 (layers 0-19, 20-38) as listed."""
    if k == 2:
        return ((0, 19), (20, sum(depths) + 2))
    if k == 24 and tuple(depths) == (3, 3, 27, 3):
        return _CONVNEXT_24
    if k != 12:
        raise ValueError(f"no official ConvNeXt split into {k} groups for depths {depths}")
    s0, s1, (a, b), s3 = convnext_stage_groups(depths)
    return (s0, s1, *_groups(a, b - a + 1, 9), s3)


def _convnext(i: int, size: str, res: int, groups, layout: str, dpr: float = 0.0, head_hidden=None) -> BranchConfig:
    depths, widths = CONVNEXT_SIZES[size]
    return BranchConfig.convnext(f"branch{i + 1}", depths, widths, res, groups, layout, drop_path_rate=dpr,
                                 head_hidden=head_hidden)


def _clip(i: int, size: str, res: int, stages: int, pretrain: int) -> BranchConfig:
    """CLIP-L/16 (CLIP ViT-L/14 converted to patch 16) or CLIP-B/16; the position table is
    stored for the pretraining side (224 or 336)."""
    C, depth, heads = {"L": (1024, 24, 16), "B": (768, 12, 12)}[size]
    g = pretrain // 16
    return BranchConfig(name=f"branch{i + 1}", kind="clip", family="hf", embed_dim=C, depth=depth, num_heads=heads,
                        image_size=res, interaction_indexes=split_stages(depth, stages), pos_embed_grid=(g, g),
                        cls_token=True)


_DET_CNX = {"T": 0.3, "S": 0.3, "B": 0.4}              # drop-path rates of the ConvNeXt detection branches
_DET_VIT = {"B": ("deit3", 0.15), "S": ("deit3", 0.05), "T": ("deit", 0.05)}


def _hetero_det(name: str, kinds: str):
    """kinds: branch 3, 2, 1 as in the official names, e.g. "CVV" = convnext-t_vit-s_vit-b."""
    bcs = []
    for i, (kind, size, res) in enumerate(zip(reversed(kinds), "BST", (448, 672, 1024))):
        if kind == "C":
            bcs.append(_convnext(i, size, res, _convnext_groups(CONVNEXT_SIZES[size][0], 12), "hf", _DET_CNX[size]))
        else:
            fam, dpr = _DET_VIT[size]
            bcs.append(_branch(i, 3, fam, SIZES[size], res, ("W", 14), 12, False, False, drop_path_rate=dpr))
    PRESETS[name] = PIIPConfig(branches=tuple(bcs), output="detection", fpn="regular", out_indexes=(0, 1, 10),
                               interaction_drop_path=0.4, name=name, extra={"task": "detection", "counting": "det"})


def _llava(name: str, large: str, small_res: int, large_res: int, stages: int, llm_dim: int):
    """PIIP-LLaVA: branch 1 CLIP-L on the small image, branch 2 CLIP-B ("clip-b") or a timm
    ConvNeXt ("convnext-b", "convnext-l" with the MLP head) on the input image."""
    pretrain = 336 if small_res > 256 else 224
    b1 = _clip(0, "L", small_res, stages, pretrain)
    if large == "clip-b":
        b2 = _clip(1, "B", large_res, stages, 224)
    else:
        size = large[-1].upper()
        b2 = _convnext(1, size, large_res, _convnext_groups(CONVNEXT_SIZES[size][0], stages), "timm",
                       head_hidden=1536 if size == "L" else None)
    PRESETS[name] = PIIPConfig(branches=(b1, b2), output="llava", projector_dim=llm_dim, projector_norm="gn",
                               interaction_drop_path=0.4, name=name, extra={"task": "multimodal", "counting": "llava"})


PRESETS["mask_rcnn_convnext-base_1024_regular-fpn"] = PIIPConfig(
    branches=(replace(_convnext(0, "B", 1024, convnext_stage_groups(CONVNEXT_SIZES["B"][0]), "hf"), name="backbone"),),
    output="stages", out_indexes=(0, 1, 2, 3), name="mask_rcnn_convnext-base_1024_regular-fpn",
    extra={"task": "detection", "counting": "det"})
for _kinds, _name in (("CCC", "convnext-tsb"), ("CVV", "convnext-t_vit-s_vit-b"), ("CCV", "convnext-t_convnext-s_vit-b"),
                      ("CVC", "convnext-t_vit-s_convnext-b"), ("VCV", "vit-t_convnext-s_vit-b"),
                      ("VCC", "vit-t_convnext-s_convnext-b"), ("VVC", "vit-t_vit-s_convnext-b")):
    _hetero_det(f"mask_rcnn_{_name}_1024_672_448_regular-fpn", _kinds)
_llava("piip-llava_clip-bl_512-256_7B", "clip-b", 256, 512, 2, 4096)
_llava("piip-llava_clip-bl_512-448_7B", "clip-b", 448, 512, 12, 4096)
_llava("piip-llava_convnext-b_clip-l_640-224_7B", "convnext-b", 224, 640, 2, 4096)
_llava("piip-llava_convnext-b_clip-l_1024-336_7B", "convnext-b", 336, 1024, 12, 4096)
_llava("piip-llava_convnext-b_clip-l_1024-336_13B", "convnext-b", 336, 1024, 24, 5120)
_llava("piip-llava_convnext-l_clip-l_1024-336_7B", "convnext-l", 336, 1024, 12, 4096)
_llava("piip-llava_convnext-l_clip-l_1024-336_13B", "convnext-l", 336, 1024, 24, 5120)

# Official names that share another config file: get_config / create_model accept them,
# list_models lists the file once. (name -> (preset, PIIPConfig overrides))
ALIASES = {
    "piip-llava-plus_convnext-l_clip-l_1024-336_7B": ("piip-llava_convnext-l_clip-l_1024-336_7B", {}),
    # the 13B model uses the 7B config file; only the projector follows the LLM's width
    "piip-llava_clip-bl_512-448_13B": ("piip-llava_clip-bl_512-448_7B", {"projector_dim": 5120}),
}


def list_models(pattern: str | None = None, paper_only: bool = False, include_paper_only: bool = False) -> list[str]:
    """Preset names, optionally filtered by a substring or fnmatch pattern: those of the official
    configs; ``paper_only=True``: only the paper-only rows (configurations the papers report
    without an official config file); ``include_paper_only=True``: both."""
    import fnmatch

    if paper_only and include_paper_only:
        raise ValueError("list_models: paper_only=True lists only the paper-only rows; include_paper_only=True adds them "
                         "to the official ones; pass one of them")
    names = sorted(n for n in PRESETS if (n in PAPER_ONLY) == paper_only or include_paper_only)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern) or pattern in n]
    return names


def get_config(name: str, **overrides) -> PIIPConfig:
    """The PIIPConfig of a preset; keyword overrides replace PIIPConfig fields, and the
    branch fields ``drop_path_rate``, ``pad_before_qkv``, ``mlp_act`` apply to every branch."""
    if name in ALIASES:
        base, alias_kw = ALIASES[name]
        return replace(get_config(base, **{**alias_kw, **overrides}), name=name)
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=3, cutoff=0.3)
        raise KeyError(f"unknown PIIP preset {name!r}" + (f"; did you mean {close}?" if close else "; see piip.list_models()"))
    cfg = PRESETS[name]
    branch_kw = {k: overrides.pop(k) for k in ("drop_path_rate", "pad_before_qkv", "mlp_act") if k in overrides}
    if branch_kw:
        cfg = replace(cfg, branches=tuple(replace(b, **branch_kw) for b in cfg.branches))
    return replace(cfg, **overrides) if overrides else cfg


def create_model(name: str, backend: str | None = None, *, device=None, dtype: torch.dtype | None = None, **overrides):
    """Build a preset: ``piip.create_model("mask_rcnn_deit_tsb_1568_1120_672_fpn_1x_coco_bs16")``.

    ``device``: where the parameters are created (``"meta"``: no memory, e.g. to count
    parameters or to fill from a checkpoint with ``piip.load_official_checkpoint``);
    ``dtype``: a floating-point dtype the parameters are cast to. Keyword overrides go to
    :func:`get_config`.
    """
    return build_model(get_config(name, **overrides), backend=backend, device=device, dtype=dtype)


def build_model(cfg: PIIPConfig, backend: str | None = None, *, device=None, dtype: torch.dtype | None = None):
    """The model class a config needs: :class:`~piip.models.llava.PIIPLLaVA` for
    ``output="llava"``, :class:`~piip.models.piip.PIIP` otherwise; built on ``device`` and cast
    to ``dtype`` (see :func:`create_model`)."""
    from .llava import PIIPLLaVA
    from .piip import PIIP

    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.bfloat16, got {dtype!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = (PIIPLLaVA if cfg.output == "llava" else PIIP)(cfg, backend=backend)
    return model if dtype is None else model.to(dtype)
