"""ConvNeXt as a model of its own (the single-branch detection baseline of the papers'
Table II) and the checked loading of both official key layouts.

Layouts of the official checkpoints:
  - transformers ``ConvNextModel`` (the detection configs, under ``convnext_model.``):
    ``embeddings.patch_embeddings / embeddings.layernorm``, ``encoder.stages.S.downsampling_layer.{0,1}``,
    ``encoder.stages.S.layers.J.{dwconv,layernorm,pwconv1,pwconv2,layer_scale_parameter}``, and the
    final ``layernorm``, which the detection code keeps but never applies;
  - timm ``ConvNeXt`` (PIIP-LLaVA): ``stem.{0,1}``, ``stages.S.downsample.{0,1}``,
    ``stages.S.blocks.J.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`` and ``head.norm``; released
    PIIP-LLaVA checkpoints store the layer scale as ``blocks.J.weight``.
"""
from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from ..layers.convnext import ConvNeXtBlock, ConvNeXtDownsample, ConvNeXtStem
from ..layers.block import linspace_rates
from .keys import check_state_dict

# depths, widths of the four stages
CONVNEXT_SIZES = {
    "T": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "S": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "B": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "L": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


class ConvNeXt(nn.Module):
    """Stem, four stages (a downsampling layer before stages 1-3), and the final norm (plus,
    with ``head_hidden``, timm's pre-logits Linear) that the official code builds but never
    applies (kept so checkpoints load and parameter counts match; they receive no gradient).

    ``forward(img)`` with img [B, 3, H, W] returns the four stage outputs [B, C_s, H/4/2^s, W/4/2^s]
    (strides 4, 8, 16, 32; odd sides floor), with no norm, in fp32, as the official baseline does.
    """

    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), layer_scale_init: float | None = 1e-6,
                 drop_path_rate: float = 0.0, in_chans: int = 3, final_norm_eps: float = 1e-12,
                 head_hidden: int | None = None):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"ConvNeXt: {len(depths)} depths for {len(dims)} widths")
        self.depths, self.dims = tuple(depths), tuple(dims)
        self.stem = ConvNeXtStem(dims[0], in_chans)
        rates = linspace_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        k = 0
        for s, (depth, dim) in enumerate(zip(depths, dims)):
            stage = nn.Module()
            stage.downsample = ConvNeXtDownsample(dims[s - 1], dim) if s > 0 else None
            stage.blocks = nn.ModuleList(ConvNeXtBlock(dim, layer_scale_init, rates[k + j]) for j in range(depth))
            k += depth
            self.stages.append(stage)
        self.norm = nn.LayerNorm(dims[-1], eps=final_norm_eps)
        # timm's MLP-head variants (convnext_large_mlp) store a pre-logits Linear; PIIP-LLaVA
        # keeps it in its checkpoints but never runs the head.
        self.head_fc = nn.Linear(dims[-1], head_hidden) if head_hidden else None

    @classmethod
    def from_size(cls, size: str, **kw) -> "ConvNeXt":
        """ConvNeXt-T/S/B/L."""
        if size not in CONVNEXT_SIZES:
            raise KeyError(f"unknown ConvNeXt size {size!r}; one of {sorted(CONVNEXT_SIZES)}")
        depths, dims = CONVNEXT_SIZES[size]
        return cls(depths, dims, **kw)

    def layers(self) -> list[tuple[str, nn.Module]]:
        """The layers in the official flattened order: stage-0 blocks, stage-1 downsampling
        layer, stage-1 blocks, ... (PIIP's interaction groups index this list)."""
        out = []
        for s, stage in enumerate(self.stages):
            if stage.downsample is not None:
                out.append((f"stages.{s}.downsample", stage.downsample))
            out += [(f"stages.{s}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
        return out

    def forward_features(self, img: Tensor) -> list[Tensor]:
        if img.dim() != 4 or img.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"ConvNeXt expects images [B, {self.stem[0].in_channels}, H, W], got {tuple(img.shape)}")
        if min(img.shape[-2:]) < 32:
            raise ValueError(f"ConvNeXt: image size {tuple(img.shape[-2:])} is below 32, the total stride")
        x = self.stem(img)
        outs = []
        for stage in self.stages:
            if stage.downsample is not None:
                x = stage.downsample(x)
            for blk in stage.blocks:
                x = blk(x)
            outs.append(x)
        return outs

    def forward(self, img: Tensor) -> list[Tensor]:
        return [x.float() for x in self.forward_features(img)]


# ------------------------------------------------------------------------------------------
# Official key layouts

_HF = [
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.", r"encoder.stages.\1.downsampling_layer."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"encoder.stages.\1.layers.\2."),
    (r"^norm\.", "layernorm."),
]
_TIMM = [
    (r"^stages\.(\d+)\.blocks\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.pwconv1\.", r"stages.\1.blocks.\2.mlp.fc1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.pwconv2\.", r"stages.\1.blocks.\2.mlp.fc2."),
    (r"^norm\.", "head.norm."),
    (r"^head_fc\.", "head.pre_logits.fc."),
]


def convnext_official_key(key: str, layout: str) -> str:
    """Our ConvNeXt parameter name -> the official one in the "hf" or "timm" layout."""
    rules = {"hf": _HF, "timm": _TIMM}[layout]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def load_convnext_state_dict(model: ConvNeXt, state_dict: dict[str, Tensor], layout: str | None = None,
                             prefix: str = "") -> None:
    """Fill ``model`` from an official ConvNeXt state dict (keys under ``prefix``, for example
    ``"convnext_model."``); the layout is recognised when not given. Raises listing every
    unused, missing and mis-shaped key. timm's ``blocks.J.weight`` is taken for ``gamma``."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if layout is None:
        layout = "hf" if any(k.startswith("embeddings.") for k in sd) else "timm"
    if layout == "timm":  # released PIIP-LLaVA checkpoints name the layer scale "weight"
        sd = {re.sub(r"^(stages\.\d+\.blocks\.\d+)\.weight$", r"\1.gamma", k): v for k, v in sd.items()}
    ours = model.state_dict()
    target = {convnext_official_key(k, layout): k for k in ours}
    check_state_dict(f"ConvNeXt state dict ({layout} layout)", {k: ours[v].shape for k, v in target.items()}, sd)
    model.load_state_dict({target[k]: v for k, v in sd.items()}, strict=True)


def convnext_from_official(state_dict: dict[str, Tensor], prefix: str = "convnext_model.", **kw) -> ConvNeXt:
    """A ConvNeXt whose depths and widths are read from an official state dict, loaded from it."""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    hf = any(k.startswith("embeddings.") for k in sd)
    blocks = re.compile(r"^(?:encoder\.)?stages\.(\d+)\.(?:layers|blocks)\.(\d+)\.")
    depth: dict[int, int] = {}
    for k in sd:
        m = blocks.match(k)
        if m:
            depth[int(m.group(1))] = max(depth.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    stem = sd["embeddings.patch_embeddings.weight" if hf else "stem.0.weight"]
    dims = [stem.shape[0]]
    for s in range(1, len(depth)):
        w = sd[f"encoder.stages.{s}.downsampling_layer.1.weight" if hf else f"stages.{s}.downsample.1.weight"]
        dims.append(w.shape[0])
    fc = sd.get("head.pre_logits.fc.weight")
    model = ConvNeXt([depth[s] for s in range(len(depth))], dims, in_chans=stem.shape[1],
                     head_hidden=None if fc is None else fc.shape[0], **kw)
    load_convnext_state_dict(model, state_dict, "hf" if hf else "timm", prefix)
    return model
