"""Counting parameters and FLOPs of PIIP models.

Two conventions, both in multiply-accumulates (MACs; the paper's "FLOPs"):

* :func:`paper_cost` reproduces how the paper's #Param / #FLOPs columns were produced
  (see ``docs/flops.md``): forward hooks on modules of exact type Linear, Conv2d,
  ConvTranspose2d, LayerNorm, GroupNorm, ReLU and MaxPool2d, plus closed-form terms for
  self-attention and deformable sampling, counted on the model form the official script
  builds (:func:`counting_config`), batch 1 at the largest resolution.
* :func:`full_cost` counts the real model: every matrix product (attention included),
  the deformable sampling, merging and pyramid layers, norms and resizes, with a breakdown
  per branch, interactions and merging. It runs ``torch.utils.flop_counter.FlopCounterMode``
  on the meta device, so nothing is computed and full-size models count in about a second.

For fvcore users, :func:`fvcore_handles` returns handles for our ops and for
``scaled_dot_product_attention``; :func:`flop_count_analysis` wraps ``FlopCountAnalysis``
with them. :data:`FLOP_COUNTER_FORMULAS` gives ``FlopCounterMode`` the same formulas for
the ops it does not count by default (norms, bilinear upsampling), so the two agree.
"""
from __future__ import annotations

from dataclasses import replace
from math import prod

import torch
from torch import nn

from piip_kernels.ops import branch_merge_macs, deform_cross_attn_macs, msda_macs

from .models.config import PIIPConfig
from .models.piip import PIIP, _TokenLinear
from .models.presets import get_config

aten = torch.ops.aten

# ------------------------------------------------------------------------------------------
# The paper's convention


def counting_config(cfg: PIIPConfig) -> PIIPConfig:
    """The model the official FLOP script counts for a preset.

    Detection and segmentation presets are first converted to the classification model:
    no cls token, position embeddings stored at the run grid, merged classification head
    (GroupNorm/Linear per branch, LayerNorm, 1000-way head); single-branch baselines get
    the plain ViT head. Window padding follows each class: DeiT branches pad after qkv,
    InternViT-class branches before it (so their qkv is counted on the padded tokens).
    Classification presets are counted as built (heads read patch token 0).
    """
    branches = []
    converted = cfg.output != "classification"
    for b in cfg.branches:
        kw = dict(pad_before_qkv=b.family == "internvit", mlp_act="gelu")
        if converted:
            g = b.image_size // b.patch_size
            kw.update(cls_token=False, pos_embed_grid=(g, g))
        branches.append(replace(b, **kw))
    if not converted:
        output = "classification"
    else:
        output = "classification" if len(branches) == 1 else "classification_merged"
    return replace(cfg, branches=tuple(branches), output=output, num_classes=1000, head_reads_first_patch=True)


def _hook_macs(m: nn.Module, inp, out) -> int:
    x = inp[0]
    t = type(m)
    if t in (nn.Linear, _TokenLinear):
        return x.numel() * m.out_features
    if t is nn.Conv2d:
        n = out.numel() // m.out_channels
        macs = n * m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups) * m.out_channels
        return macs + (out.numel() if m.bias is not None else 0)
    if t is nn.ConvTranspose2d:
        n = x.numel() // m.in_channels
        macs = n * m.kernel_size[0] * m.kernel_size[1] * m.in_channels * (m.out_channels // m.groups)
        return macs + (out.numel() if m.bias is not None else 0)
    if t in (nn.LayerNorm, nn.GroupNorm):
        affine = m.elementwise_affine if t is nn.LayerNorm else m.affine
        return x.numel() * (2 if affine else 1)
    if t is nn.ReLU:
        return out.numel()
    if t is nn.MaxPool2d:
        return x.numel()
    return 0


_HOOKED = (nn.Linear, _TokenLinear, nn.Conv2d, nn.ConvTranspose2d, nn.LayerNorm, nn.GroupNorm, nn.ReLU, nn.MaxPool2d)


def _vit_attention_macs(b) -> int:
    """The official scripts' self-attention term of a ViT branch: 2*n^2*C per global block and
    2*n*w^2*C per window block, n = (s // 16)^2 (padding ignored)."""
    n = (b.image_size // 16) ** 2
    return sum(2 * n * n * b.embed_dim if w is None else 2 * n * w * w * b.embed_dim for w in b.window_sizes)


def _analytic_terms(cfg: PIIPConfig) -> dict[str, int]:
    """Closed-form terms of the official script: self-attention 2*n^2*C per global block and
    2*n*w^2*C per window block (n = (s // 16)^2, padding ignored), and 5*n_q*4*C_q per injector."""
    attn = {f"branch{i + 1}": _vit_attention_macs(b) for i, b in enumerate(cfg.branches)}
    deform = 0
    if len(cfg.branches) > 1:
        per_stage = 0
        for a, b in zip(cfg.branches[:-1], cfg.branches[1:]):
            for q in (a, b):
                per_stage += 5 * (q.image_size // 16) ** 2 * 4 * q.embed_dim
        deform = per_stage * cfg.num_stages
    return {"attention": attn, "deform": deform}


def _prefix_group(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "branches":
        return f"branch{int(parts[1]) + 1}"
    if parts[0] == "interactions":
        return "interactions"
    return "merge_and_head"


def _hooked_forward(model: nn.Module, run, skip=lambda name: False) -> dict[str, int]:
    """MACs of the exact-type hooks (section 2 of docs/flops.md) while ``run()`` executes, per
    group of :func:`_prefix_group`; modules whose name ``skip`` accepts are not hooked."""
    totals: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if type(m) in _HOOKED and not skip(name):
            group = _prefix_group(name)

            def hook(mod, inp, out, group=group):
                totals[group] = totals.get(group, 0) + _hook_macs(mod, inp, out)
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return totals


def _params_by_group(model: nn.Module, skip=lambda name: False) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad and not skip(name):
            group = _prefix_group(name)
            out[group] = out.get(group, 0) + p.numel()
    return out


def paper_cost(cfg_or_name, side: int | None = None) -> dict:
    """#Param and #FLOPs (MACs) as the paper counts them. Returns
    ``{"params", "macs", "hooks", "analytic", "breakdown", "params_breakdown"}``; the
    breakdowns are per branch, interactions and merge/head (MACs with the analytic terms).

    Presets whose published figures come from another official script (``cfg.extra["counting"]``:
    "det" for the ConvNeXt/hybrid detectors, "llava" for the PIIP-LLaVA encoders) are counted
    the way that script counts them: :func:`script_cost`."""
    cfg = get_config(cfg_or_name) if isinstance(cfg_or_name, str) else cfg_or_name
    if cfg.extra.get("counting") in ("det", "llava"):
        return script_cost(cfg, side)
    ccfg = counting_config(cfg)
    side = side or ccfg.branches[-1].image_size
    with torch.device("meta"):
        model = PIIP(ccfg).eval()
        img = torch.empty(1, 3, side, side)
    params_breakdown = _params_by_group(model)
    totals = _hooked_forward(model, lambda: model(img))
    hooks = sum(totals.values())
    terms = _analytic_terms(ccfg)
    breakdown = dict(totals)
    for k, v in terms["attention"].items():
        breakdown[k] = breakdown.get(k, 0) + v
    breakdown["interactions"] = breakdown.get("interactions", 0) + terms["deform"]
    analytic = sum(terms["attention"].values()) + terms["deform"]
    return {"params": sum(params_breakdown.values()), "macs": hooks + analytic, "hooks": hooks, "analytic": analytic,
            "breakdown": breakdown, "params_breakdown": params_breakdown}


def _script_terms(cfg: PIIPConfig) -> dict[str, int]:
    """The analytic terms of mmdetection/get_flops_det.py ("det") and llava/get_flops_llava.py
    ("llava"), docs/flops.md section 8:
      - ViT branches: 2*n*w^2*C per window block, 2*n^2*C per global one (n = (s // 16)^2);
        CLIP branches 2*n^2*C per layer (class token excluded); ConvNeXt branches none;
      - deformable: 5*f^2*4*C_q per injector with f = s_q // stride_q. The detection script
        takes each branch's stride and width at the end of the interaction; the LLaVA script
        the width there but the stride of the *first* interaction for every unit."""
    terms: dict[str, int] = {}
    for i, b in enumerate(cfg.branches):
        if b.kind == "convnext":
            continue
        # CLIP: global attention in every layer, the same term (its class token excluded)
        terms[f"branch{i + 1}"] = _vit_attention_macs(b)
    deform = 0
    if len(cfg.branches) > 1:
        first_stride = [b.layer_strides[b.stage_ends()[0]] for b in cfg.branches]
        for s in range(cfg.num_stages):
            for u in range(len(cfg.branches) - 1):
                for q in (u, u + 1):
                    b = cfg.branches[q]
                    end = b.stage_ends()[s]
                    stride = first_stride[q] if cfg.extra["counting"] == "llava" else b.layer_strides[end]
                    deform += 5 * (b.image_size // stride) ** 2 * 4 * b.layer_widths[end]
    terms["interactions"] = deform
    return terms


def script_cost(cfg: PIIPConfig, side: int | None = None) -> dict:
    """#Param and #FLOPs (MACs) of a ConvNeXt/hybrid detector or a PIIP-LLaVA encoder, as the
    official script that produced its README figure counts them (docs/flops.md section 8):

      - the model as the official code builds it, batch 1 at branch N's resolution;
      - detection (``get_flops_det.py``): the backbone up to the last merge (the pyramid
        layers are not run; their parameters count);
      - LLaVA (``get_flops_llava.py``): the encoder only (the projector is neither run nor counted);
      - exact-type hooks, except ConvNeXt's LayerNorms: the official ConvNeXts use their own
        LayerNorm classes, which the counter does not see;
      - plus :func:`_script_terms`.
    Same return value as :func:`paper_cost`."""
    from .models.presets import build_model
    from .official import official_config

    ocfg = official_config(cfg)
    side = side or ocfg.branches[-1].image_size
    convnext = {f"branches.{i}." for i, b in enumerate(ocfg.branches) if b.kind == "convnext"}

    def skip(name: str) -> bool:
        return name.startswith("projector") or (name.startswith(tuple(convnext)) and name.rsplit(".", 1)[-1] == "norm")

    with torch.device("meta"):
        model = build_model(ocfg).eval()
        img = torch.empty(1, 3, side, side)

    def run():
        if ocfg.output == "llava":
            model.forward_features(img)
        elif ocfg.output == "stages":
            model(img)
        else:
            model.merged_maps(model.forward_features(img))

    params_breakdown = _params_by_group(model, lambda n: n.startswith("projector."))
    totals = _hooked_forward(model, run, skip)
    hooks = sum(totals.values())
    terms = _script_terms(ocfg)
    breakdown = dict(totals)
    for k, v in terms.items():
        breakdown[k] = breakdown.get(k, 0) + v
    analytic = sum(terms.values())
    return {"params": sum(params_breakdown.values()), "macs": hooks + analytic, "hooks": hooks, "analytic": analytic,
            "breakdown": breakdown, "params_breakdown": params_breakdown}


# ------------------------------------------------------------------------------------------
# Full cost of the real model (FlopCounterMode; values are FLOPs = 2 x MACs)


def _numel(shape) -> int:
    return prod(shape) if shape is not None else 0


def _layer_norm_flops(x_shape, normalized_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # 5 per element with an affine (4 without), as fvcore counts norms; x2 for FlopCounterMode's FLOPs.
    return 2 * (5 if weight_shape is not None else 4) * _numel(x_shape)


def _group_norm_flops(x_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * (5 if weight_shape is not None else 4) * _numel(x_shape)


def _upsample_flops(x_shape, *args, out_shape=None, **kwargs) -> int:
    # 4 multiply-adds per output element for bilinear, as fvcore counts it.
    return 2 * 4 * _numel(out_shape)


def _sdpa_cpu_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    # torch registers formulas for the CUDA attention kernels only; the CPU one counts the same.
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q_shape, k_shape, v_shape)


# Keyed by overload packet, which is how FlopCounterMode looks formulas up.
FLOP_COUNTER_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    aten.native_layer_norm: _layer_norm_flops,
    aten.native_group_norm: _group_norm_flops,
    aten.upsample_bilinear2d: _upsample_flops,
}


def _flop_counter(**kw):
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False, custom_mapping=dict(FLOP_COUNTER_FORMULAS), **kw)


def full_cost(model_or_name, side: int | tuple[int, int] | None = None) -> dict:
    """MACs of a real forward at batch 1 (default: the preset's largest resolution), counted on
    the meta device (a model passed in: on its own device, in eval mode; each submodule's
    train/eval mode is restored afterwards). Returns ``{"params", "macs", "by_op", "breakdown"}``."""
    if isinstance(model_or_name, nn.Module):
        model = model_or_name
        cfg = model.cfg
    else:
        cfg = get_config(model_or_name) if isinstance(model_or_name, str) else model_or_name
        from .models.presets import build_model

        with torch.device("meta"):
            model = build_model(cfg)
    side = side or cfg.branches[-1].image_size
    hw = (side, side) if isinstance(side, int) else tuple(side)
    dev = next(model.parameters()).device
    img = torch.empty(1, 3, *hw, device=dev)
    # Counted in eval mode (no drop path); the caller's mode of every submodule comes back,
    # also on error, so a training run that counts keeps training.
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), _flop_counter() as fc:
            model(img)
    finally:
        for m, training in modes:
            m.training = training
    counts = fc.get_flop_counts()
    root = type(model).__name__

    def total(prefix):
        # Counts are inclusive of submodules, and a container whose forward never runs (a
        # branch: its methods are called, not its forward) has no entry: add the outermost
        # entries under the prefix.
        keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
        outer = [k for k in keys if not any(o != k and k.startswith(o + ".") for o in keys)]
        return sum(sum(counts[k].values()) for k in outer) // 2

    macs = sum(counts["Global"].values()) // 2
    breakdown = {f"branch{i + 1}": total(f"{root}.branches.{i}") for i in range(len(cfg.branches))}
    breakdown["interactions"] = total(f"{root}.interactions")
    breakdown["merge"] = total(f"{root}.merge") + total(f"{root}.inter_merge")
    breakdown["pyramid_and_head"] = sum(total(f"{root}.{k}") for k in ("fpn1", "fpn2", "fpn4", "cls_norm", "cls_head", "projector"))
    breakdown["resize_and_upsample"] = macs - sum(breakdown.values())
    by_op = {str(k): v // 2 for k, v in counts["Global"].items()}
    return {"params": sum(p.numel() for p in model.parameters()), "macs": macs, "by_op": by_op, "breakdown": breakdown}


# ------------------------------------------------------------------------------------------
# fvcore


def _shape(v):
    from fvcore.nn.jit_handles import get_shape

    return get_shape(v)


def _msda_handle(inputs, outputs) -> int:
    return msda_macs(_shape(inputs[0]), _shape(inputs[3]))


def _dca_handle(inputs, outputs) -> int:
    return deform_cross_attn_macs(_shape(inputs[0]), _shape(inputs[1]))


def _merge_handle(inputs, outputs) -> int:
    # The maps arrive as one traced list: read the shapes of its elements.
    features = [_shape(v) for v in inputs[0].node().inputs()]
    return branch_merge_macs(features, _shape(outputs[0])[2:])


def _sdpa_handle(inputs, outputs) -> int:
    # q.k^T and attn.v: 2 * B * heads * Lq * Lk * d (the softmax is not counted).
    q, k, v = (_shape(i) for i in inputs[:3])
    return prod(q[:-1]) * k[-2] * q[-1] + prod(q[:-1]) * k[-2] * v[-1]


def fvcore_handles() -> dict:
    """fvcore op handles for our ops and for scaled_dot_product_attention (MACs)."""
    return {
        "piip::ms_deform_attn": _msda_handle,
        "piip::deform_cross_attn": _dca_handle,
        "piip::branch_merge": _merge_handle,
        "aten::scaled_dot_product_attention": _sdpa_handle,
    }


def flop_count_analysis(model: nn.Module, inputs):
    """``fvcore.nn.FlopCountAnalysis`` with our handles installed (counts in MACs)."""
    from fvcore.nn import FlopCountAnalysis

    return FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())
