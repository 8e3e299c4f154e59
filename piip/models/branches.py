"""The branch protocol of the N-branch model, and its three implementations.

A branch is a sequence of layers. The model only uses this interface:

  - ``embed(img) -> (x [B, N, C], (H, W), cls [B, 1, C] | None)``: the stem / patch
    embedding as tokens on an H x W grid, and the class token carried beside them (or None);
  - ``run_layers(x, hw, start, end, cls) -> (x, hw, cls)``: layers ``start..end``
    (inclusive); a layer may change the grid and the width (a CNN's downsampling layer);
  - ``cfg.layer_widths`` / ``cfg.layer_strides``: what each layer outputs, so interaction
    units and merges are sized without running the branch;
  - ``grad_checkpointing``: recompute each layer in the backward pass.

Between layers the state is always tokens [B, H*W, C] plus (H, W), as in the official code,
so interaction units never ask which kind a branch is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..layers import Block, linspace_rates, make_norm
from ..layers.resize import resize_grid_tokens
from .clip import CLIPVisionTransformer
from .config import BranchConfig
from .convnext import ConvNeXt


def init_linear_and_norms(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class ViTBranch(nn.Module):
    """Patch embedding, position embedding, blocks and (for classification) norm and head."""

    def __init__(self, cfg: BranchConfig, head_classes: int | None = None):
        super().__init__()
        self.cfg = cfg
        C, p = cfg.embed_dim, cfg.patch_size
        self.patch_embed = nn.Conv2d(3, C, p, p)
        gh, gw = cfg.pos_embed_grid
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw + int(cfg.pos_embed_cls_slot), C))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C)) if cfg.cls_token else None
        dpr = linspace_rates(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm, cfg.qk_norm, cfg.layer_scale,
                  cfg.window_sizes[i], cfg.pad_before_qkv, cfg.mlp_act, dpr[i])
            for i in range(cfg.depth)
        )
        self.norm = self.head = None
        if head_classes is not None:
            self.norm = make_norm(cfg.norm, C)
            self.head = nn.Linear(C, head_classes)
        self.apply(init_linear_and_norms)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.grad_checkpointing = False
        # "interpolate": F.interpolate (bit for bit the official code); "matmul": the same
        # weights as two small matmuls (piip.layers.resize), equal to rounding, no atomics.
        self.pos_embed_resize = "interpolate"

    def embed(self, img: Tensor) -> tuple[Tensor, tuple[int, int], Tensor | None]:
        """img [B, 3, h, w] -> tokens [B, H*W, C] with position embedding, (H, W) = (h//p, w//p), cls.
        The image is cast to the weights' dtype (an fp32 image into a bf16 model), as the other stems do."""
        x = self.patch_embed(img.to(self.patch_embed.weight.dtype))
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(img.shape[0], -1, -1) if self.cls_token is not None else None
        return x + self.resized_pos_embed((H, W)).to(x.dtype), (H, W), cls

    def resized_pos_embed(self, hw: tuple[int, int]) -> Tensor:
        """The stored embedding (leading cls slot dropped), bicubically resized in fp32 to hw: [1, H*W, C]
        (by ``pos_embed_resize``: "interpolate" or "matmul")."""
        pe = self.pos_embed[:, 1:] if self.cfg.pos_embed_cls_slot else self.pos_embed
        gh, gw = self.cfg.pos_embed_grid
        if (gh, gw) == tuple(hw):
            return pe
        if self.pos_embed_resize == "matmul":
            return resize_grid_tokens(pe.float(), (gh, gw), tuple(hw), "bicubic")
        pe = pe.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=hw, mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def run_blocks(self, x: Tensor, hw: tuple[int, int], start: int, end: int) -> Tensor:
        for blk in self.blocks[start:end + 1]:
            x = _maybe_checkpoint(self.grad_checkpointing, blk, x, hw)
        return x

    def run_layers(self, x: Tensor, hw, start: int, end: int, cls: Tensor | None = None):
        if cls is None:
            return self.run_blocks(x, hw, start, end), hw, None
        y = self.run_blocks(torch.cat([cls, x], 1), hw, start, end)
        return y[:, 1:], hw, y[:, :1]


class ConvNeXtBranch(nn.Module):
    """A ConvNeXt (:class:`piip.models.convnext.ConvNeXt`) run layer by layer over the
    official flattened list: [stage-0 blocks, stage-1 downsampling layer, stage-1 blocks, ...].
    The stem (4x4/4 conv + LayerNorm) is the embedding; there is no class token."""

    def __init__(self, cfg: BranchConfig, head_classes: int | None = None):
        super().__init__()
        if head_classes is not None:
            raise ValueError(f"{cfg.name}: convnext branches have no classification head here")
        self.cfg = cfg
        self.convnext = ConvNeXt(cfg.stage_depths, cfg.stage_widths, layer_scale_init=cfg.layer_scale,
                                 drop_path_rate=cfg.drop_path_rate,
                                 final_norm_eps=1e-12 if cfg.family == "hf" else 1e-6, head_hidden=cfg.head_hidden)
        # A plain list: the modules stay registered once, under convnext.stages.
        self._layers = [m for _, m in self.convnext.layers()]
        self.grad_checkpointing = False

    def embed(self, img: Tensor):
        x = self.convnext.stem(img.to(self.convnext.stem[0].weight.dtype))
        return x.flatten(2).transpose(1, 2), tuple(x.shape[-2:]), None

    def run_layers(self, x: Tensor, hw, start: int, end: int, cls: Tensor | None = None):
        B, _, C = x.shape
        y = x.transpose(1, 2).reshape(B, C, *hw)
        for layer in self._layers[start:end + 1]:
            y = _maybe_checkpoint(self.grad_checkpointing, layer, y)
        return y.flatten(2).transpose(1, 2), tuple(y.shape[-2:]), cls


class CLIPBranch(nn.Module):
    """CLIP's vision transformer (transformers names). ``embed`` applies ``pre_layrnorm`` to
    [class; patches] + positions and splits the class token off (dropped unless
    ``cfg.cls_token``); ``run_layers`` puts it back in front for the layers and splits it
    off again, so it never enters the interactions."""

    def __init__(self, cfg: BranchConfig, head_classes: int | None = None):
        super().__init__()
        if head_classes is not None:
            raise ValueError(f"{cfg.name}: clip branches have no classification head here")
        if cfg.pos_embed_grid[0] != cfg.pos_embed_grid[1]:
            raise ValueError(f"{cfg.name}: CLIP position tables are square, got {cfg.pos_embed_grid}")
        self.cfg = cfg
        self.clip = CLIPVisionTransformer(cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size,
                                          cfg.pos_embed_grid[0] * cfg.patch_size, cfg.mlp_ratio)
        self.grad_checkpointing = False

    def embed(self, img: Tensor):
        x, hw = self.clip.embed(img)
        return x[:, 1:], hw, (x[:, :1] if self.cfg.cls_token else None)

    def run_layers(self, x: Tensor, hw, start: int, end: int, cls: Tensor | None = None):
        y = x if cls is None else torch.cat([cls, x], 1)
        for layer in self.clip.encoder.layers[start:end + 1]:
            y = _maybe_checkpoint(self.grad_checkpointing, layer, y)
        return (y, hw, None) if cls is None else (y[:, 1:], hw, y[:, :1])


BRANCH_KINDS = {"vit": ViTBranch, "convnext": ConvNeXtBranch, "clip": CLIPBranch}


def make_branch(cfg: BranchConfig, head_classes: int | None = None) -> nn.Module:
    return BRANCH_KINDS[cfg.kind](cfg, head_classes)
