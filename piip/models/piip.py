"""One N-branch Parameter-Inverted Image Pyramid model (PIIP, arXiv 2406.04330 / 2501.07783).

Branch 1 is the largest model on the smallest image, branch N the smallest model on the
full image. After each stage of blocks, interaction units exchange features between
adjacent branches, from the high-resolution end towards branch 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from piip_kernels import branch_merge, ms_deform_attn

from ..layers import Block, InteractionUnit
from .config import BranchConfig, PIIPConfig


def _init_linear_and_norms(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _linspace(end: float, n: int) -> list[float]:
    """Stochastic-depth rates 0..end over n layers (plain floats: also works under a meta device context)."""
    return [end * i / (n - 1) for i in range(n)] if n > 1 else [end] * n


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
        dpr = _linspace(cfg.drop_path_rate, cfg.depth)
        self.blocks = nn.ModuleList(
            Block(C, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.norm, cfg.qk_norm, cfg.layer_scale,
                  cfg.window_sizes[i], cfg.pad_before_qkv, cfg.mlp_act, dpr[i])
            for i in range(cfg.depth)
        )
        self.norm = self.head = None
        if head_classes is not None:
            from ..layers import make_norm
            self.norm = make_norm(cfg.norm, C)
            self.head = nn.Linear(C, head_classes)
        self.apply(_init_linear_and_norms)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.grad_checkpointing = False

    def embed(self, img: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """img [B, 3, h, w] -> tokens [B, H*W, C] with position embedding, and (H, W) = (h//p, w//p)."""
        x = self.patch_embed(img)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        return x + self.resized_pos_embed((H, W)).to(x.dtype), (H, W)

    def resized_pos_embed(self, hw: tuple[int, int]) -> Tensor:
        """The stored embedding (leading cls slot dropped), bicubically resized in fp32 to hw: [1, H*W, C]."""
        pe = self.pos_embed[:, 1:] if self.cfg.pos_embed_cls_slot else self.pos_embed
        gh, gw = self.cfg.pos_embed_grid
        if (gh, gw) == tuple(hw):
            return pe
        pe = pe.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=hw, mode="bicubic", align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def run_blocks(self, x: Tensor, hw: tuple[int, int], start: int, end: int) -> Tensor:
        for blk in self.blocks[start:end + 1]:
            if self.grad_checkpointing and x.requires_grad:
                x = checkpoint(blk, x, hw, use_reentrant=False)
            else:
                x = blk(x, hw)
        return x


class PIIP(nn.Module):
    """N-branch PIIP. Build it from a :class:`PIIPConfig` (see ``piip.create_model`` for presets).

    ``forward(img)`` with img [B, 3, H, W] (H, W multiples of the patch size) returns
      - detection: a list of feature maps [B, C_1, ...] at 4x, 2x, 1x, 0.5x of the finest token grid
        (the levels in ``cfg.fpn_levels``);
      - classification / classification_merged: logits [B, num_classes] (with cls-token heads
        the units after the last stage cannot reach the logits: they update patch tokens
        only; the official heads read patch token 0 instead, see ``head_reads_first_patch``);
      - features: ``forward_features`` output.
    """

    def __init__(self, cfg: PIIPConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.branches)
        separate = cfg.output == "classification"
        self.branches = nn.ModuleList(ViTBranch(b, cfg.num_classes if separate else None) for b in cfg.branches)
        self.interactions = nn.ModuleList()
        if n > 1:
            S = cfg.num_stages
            dpr = _linspace(cfg.interaction_drop_path, S)
            for s in range(S):
                self.interactions.append(nn.ModuleList(
                    InteractionUnit(cfg.branches[u].embed_dim, cfg.branches[u + 1].embed_dim, cfg.interaction_proj,
                                    num_heads=cfg.deform_num_heads, n_points=cfg.n_points,
                                    deform_ratio=cfg.deform_ratio, with_cffn=cfg.with_cffn,
                                    cffn_ratio=cfg.cffn_ratio, norm=cfg.interaction_norm,
                                    drop_path=dpr[s], backend=backend)
                    for u in range(n - 1)))
            for m in self.interactions.modules():
                if isinstance(m, InteractionUnit):
                    for proj in (m.to_a_proj, m.to_b_proj):
                        if proj is not None:
                            _init_linear_and_norms(proj)
                    for inj in (m.to_a, m.to_b):
                        if inj.with_cffn:
                            inj.ffn.apply(_init_linear_and_norms)
        C1 = cfg.branches[0].embed_dim
        if cfg.output == "detection":
            if C1 % 32:
                raise ValueError(f"detection output: branch 1 width {C1} must be a multiple of 32 (GroupNorm(32))")
            self.merge = nn.ModuleList(
                nn.Sequential(nn.Conv2d(b.embed_dim, C1, 3, padding=1, bias=False), nn.GroupNorm(32, C1), nn.ReLU(inplace=True),
                              nn.Conv2d(C1, C1, 3, padding=1, bias=False), nn.GroupNorm(32, C1), nn.ReLU(inplace=True))
                for b in cfg.branches)
            self.merge_weights = nn.Parameter(torch.ones(n))
            # Only the pyramid levels that are returned get layers, unless the config asks
            # for all of them (two official DINO configs build the unused 4x level).
            build = set(cfg.fpn_levels) | ({0, 1} if cfg.extra.get("build_all_fpn") else set())
            self.fpn1 = nn.Sequential(nn.ConvTranspose2d(C1, C1, 2, 2), nn.GroupNorm(32, C1), nn.GELU(),
                                      nn.ConvTranspose2d(C1, C1, 2, 2)) if 0 in build else None
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(C1, C1, 2, 2)) if 1 in build else None
            self.fpn4 = nn.MaxPool2d(2, 2)
        elif cfg.output == "classification_merged":
            if C1 % 32:
                raise ValueError(f"classification_merged output: branch 1 width {C1} must be a multiple of 32")
            heads = [nn.Sequential(nn.GroupNorm(32, C1))]
            for b in cfg.branches[1:]:
                # 32 groups in every paper config; gcd keeps narrow test models legal.
                heads.append(nn.Sequential(nn.GroupNorm(math.gcd(32, b.embed_dim), b.embed_dim), _TokenLinear(b.embed_dim, C1),
                                           nn.GroupNorm(32, C1)))
            self.merge = nn.ModuleList(heads)
            self.merge_weights = nn.Parameter(torch.ones(n))
            self.cls_norm = nn.LayerNorm(C1, eps=1e-6)
            self.cls_head = nn.Linear(C1, cfg.num_classes)
            for m in (self.merge, self.cls_norm, self.cls_head):
                m.apply(_init_linear_and_norms)
        self.grad_checkpointing = False
        self.eager_merge = False

    # ----------------------------------------------------------------- helpers
    def set_execution(self, path: str = "ours", msda=None) -> None:
        """Which computation runs, with the same weights:
          - "ours": the fused deform_cross_attn in every injector and the fused branch_merge;
          - "official": what the official code runs: grid reference points, offsets and a
            softmax, then ``msda(value, shapes, starts, loc, weights)`` (default: our
            ms_deform_attn on the reference backend, grid_sample), and the eager
            interpolate-and-sum merge. Both compute the same function (the tests check it).
        """
        if path not in ("ours", "official"):
            raise ValueError(f"set_execution: path must be 'ours' or 'official', got {path!r}")
        official = path == "official"
        fn = (msda or (lambda *a: ms_deform_attn(*a, backend="reference"))) if official else None
        for m in self.modules():
            if hasattr(m, "unfused_msda"):
                m.unfused_msda = fn
        self.eager_merge = official

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block and every interaction unit in the backward pass."""
        self.grad_checkpointing = enable
        for b in self.branches:
            b.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay."""
        keys = {"pos_embed", "cls_token", "ls1", "ls2", "ca_gamma", "cffn_gamma", "merge_weights"}
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in keys}

    def freeze_branches(self, indices) -> None:
        """Stop gradients into the given branches (0-based), e.g. to keep pretrained ViTs fixed."""
        for i in indices:
            if not 0 <= i < len(self.branches):
                raise IndexError(f"branch index {i} out of range for {len(self.branches)} branches")
            for p in self.branches[i].parameters():
                p.requires_grad_(False)

    def _check_input(self, img: Tensor) -> None:
        p = self.cfg.branches[-1].patch_size
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"PIIP expects images [B, 3, H, W], got shape {tuple(img.shape)}")
        if img.shape[-2] % p or img.shape[-1] % p:
            raise ValueError(f"PIIP: image size {tuple(img.shape[-2:])} is not a multiple of the patch size {p}")

    def branch_images(self, img: Tensor) -> list[Tensor]:
        """Branch i sees img resized by image_size_i / image_size_N (bilinear, by scale factor,
        so each side is floored, as in the official code)."""
        last = self.cfg.branches[-1].image_size
        out = []
        for b in self.cfg.branches[:-1]:
            out.append(F.interpolate(img, scale_factor=b.image_size / last, mode="bilinear", align_corners=False))
        return out + [img]

    def _unit(self, unit, xa, hwa, xb, hwb):
        if self.grad_checkpointing and (xa.requires_grad or xb.requires_grad):
            return checkpoint(unit, xa, hwa, xb, hwb, use_reentrant=False)
        return unit(xa, hwa, xb, hwb)

    # ----------------------------------------------------------------- forward
    def forward_features(self, img: Tensor) -> dict:
        """img [B, 3, H, W] -> {"tokens": [B, N_i, C_i] per branch, "hw": grid per branch,
        "cls": [B, 1, C_i] or None per branch}."""
        self._check_input(img)
        xs, hws = [], []
        for branch, im in zip(self.branches, self.branch_images(img)):
            x, hw = branch.embed(im)
            xs.append(x)
            hws.append(hw)
        cls = [b.cls_token.expand(img.shape[0], -1, -1) if b.cls_token is not None else None for b in self.branches]
        n = len(self.branches)
        for s in range(self.cfg.num_stages):
            for i, branch in enumerate(self.branches):
                start, end = branch.cfg.interaction_indexes[s] if branch.cfg.interaction_indexes else (0, branch.cfg.depth - 1)
                if cls[i] is None:
                    xs[i] = branch.run_blocks(xs[i], hws[i], start, end)
                else:
                    y = branch.run_blocks(torch.cat([cls[i], xs[i]], 1), hws[i], start, end)
                    cls[i], xs[i] = y[:, :1], y[:, 1:]
            if n > 1:
                for u in reversed(range(n - 1)):
                    xs[u], xs[u + 1] = self._unit(self.interactions[s][u], xs[u], hws[u], xs[u + 1], hws[u + 1])
        return {"tokens": xs, "hw": hws, "cls": cls}

    def forward_head(self, feats: dict):
        out = self.cfg.output
        xs, hws = feats["tokens"], feats["hw"]
        if out == "features":
            return feats
        if out == "classification":
            logits = []
            for b, x, c in zip(self.branches, xs, feats["cls"]):
                if self.cfg.head_reads_first_patch or c is None:
                    t = b.norm(x)[:, 0] if self.cfg.head_reads_first_patch else b.norm(x).mean(1)
                else:
                    t = b.norm(c)[:, 0]
                logits.append(b.head(t))
            return torch.stack(logits, 0).mean(0)
        maps = [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw) for x, hw in zip(xs, hws)]
        merged = self._merge(maps, hws[-1])
        if out == "classification_merged":
            t = self.cls_norm(merged.flatten(2).transpose(1, 2))
            return self.cls_head(t.mean(1))
        level = {0: self.fpn1, 1: self.fpn2, 2: nn.Identity(), 3: self.fpn4}
        return [level[i](merged) for i in self.cfg.fpn_levels]

    def _merge(self, maps: list[Tensor], out_hw: tuple[int, int]) -> Tensor:
        """Per-branch merge layers, then one fused bilinear upsampling (fp32) to out_hw and
        weighted sum: [B, C_1, *out_hw] in fp32 (the weights are fp32)."""
        ys = [m(x) for m, x in zip(self.merge, maps)]
        dtype = torch.promote_types(ys[0].dtype, ys[-1].dtype)
        with torch.profiler.record_function("piip.branch_merge"):  # a named range for profilers
            if self.eager_merge:  # the official form: one interpolate per branch, then multiply-adds
                return sum(w * F.interpolate(y.float(), size=tuple(out_hw), mode="bilinear", align_corners=False)
                           for w, y in zip(self.merge_weights.float().unbind(0), ys))
            return branch_merge([y.to(dtype) for y in ys], self.merge_weights, out_hw)

    def forward(self, img: Tensor):
        return self.forward_head(self.forward_features(img))


class _TokenLinear(nn.Linear):
    """Linear over the channel dim of a [B, C, H, W] map (the merged classification head)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
