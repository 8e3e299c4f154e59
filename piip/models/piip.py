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

from ..layers import InteractionUnit
from ..layers.projector import BranchMLPProjector
from .branches import init_linear_and_norms as _init_linear_and_norms
from .branches import make_branch
from .config import PIIPConfig


class PIIP(nn.Module):
    """N-branch PIIP. Build it from a :class:`PIIPConfig` (see ``piip.create_model`` for presets).

    Branches are ViT, ConvNeXt or CLIP models behind one protocol (``piip.models.branches``);
    the interaction units of stage s are sized by each branch's width after its stage-s
    layers and sample on the live grids, so a CNN branch may change width and stride
    inside a stage.

    ``forward(img)`` with img [B, 3, H, W] (H, W multiples of branch N's patch / stem size) returns
      - detection, simple FPN: a list of feature maps [B, C_1, ...] at 4x, 2x, 1x, 0.5x of
        branch N's final grid (the levels in ``cfg.fpn_levels``);
      - detection, regular FPN: four maps, the merges after the stages in ``cfg.out_indexes``
        and after the last stage, at branch N's strides (CNN branch N: 4/8/16/32 of the
        image) or deconvolved / pooled from its stride-16 grid (ViT branch N);
      - classification / classification_merged: logits [B, num_classes] (with cls-token heads
        the units after the last stage cannot reach the logits: they update patch tokens
        only; the official heads read patch token 0 instead, see ``head_reads_first_patch``);
      - stages: the single branch's map after each stage in ``cfg.out_indexes``, fp32;
      - llava: the projector's tokens (see :class:`piip.models.llava.PIIPLLaVA`);
      - features: ``forward_features`` output.
    """

    def __init__(self, cfg: PIIPConfig, backend: str | None = None):
        super().__init__()
        self.cfg = cfg
        n = len(cfg.branches)
        separate = cfg.output == "classification"
        self.branches = nn.ModuleList(make_branch(b, cfg.num_classes if separate else None) for b in cfg.branches)
        S = cfg.num_stages
        # widths[i][s]: branch i's width after its stage-s layers (constant for ViT/CLIP).
        widths = [[b.layer_widths[e] for e in b.stage_ends()] for b in cfg.branches]
        self.interactions = nn.ModuleList()
        if n > 1:
            # Every unit gets the same rate, as in the official code (no depth schedule).
            for s in range(S):
                self.interactions.append(nn.ModuleList(
                    InteractionUnit(widths[u][s], widths[u + 1][s], cfg.interaction_proj,
                                    num_heads=cfg.deform_num_heads, n_points=cfg.n_points,
                                    deform_ratio=cfg.deform_ratio, with_cffn=cfg.with_cffn,
                                    cffn_ratio=cfg.cffn_ratio, norm=cfg.interaction_norm,
                                    drop_path=cfg.interaction_drop_path, backend=backend)
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
        self.fpn1 = self.fpn2 = self.fpn4 = None
        self.pyramid_native = False
        if cfg.output == "detection" and cfg.fpn == "simple":
            if C1 % 32:
                raise ValueError(f"detection output: branch 1 width {C1} must be a multiple of 32 (GroupNorm(32))")
            self.merge = nn.ModuleList(_merge_layers(b.embed_dim, C1, convs=2) for b in cfg.branches)
            self.merge_weights = nn.Parameter(torch.ones(n))
            # Only the pyramid levels that are returned get layers, unless the config asks
            # for all of them (two official DINO configs build the unused 4x level).
            build = set(cfg.fpn_levels) | ({0, 1} if cfg.extra.get("build_all_fpn") else set())
            self.fpn1 = _fpn_up4(C1) if 0 in build else None
            self.fpn2 = nn.Sequential(nn.ConvTranspose2d(C1, C1, 2, 2)) if 1 in build else None
            self.fpn4 = nn.MaxPool2d(2, 2)
        elif cfg.output == "detection":  # regular FPN
            d1 = [widths[0][s] for s in cfg.out_indexes]
            if any(d % 32 for d in d1 + [C1]):
                raise ValueError(f"regular FPN: branch 1 widths {d1 + [C1]} at the merges must be multiples of 32 (GroupNorm(32))")
            # Branch 1 is only normalised; the others are projected to branch 1's current width.
            self.inter_merge = nn.ModuleList(
                nn.ModuleList(_merge_layers(widths[j][s], d, convs=int(j > 0)) for j in range(n))
                for s, d in zip(cfg.out_indexes, d1))
            self.inter_merge_weights = nn.Parameter(torch.ones(len(d1), n))
            self.merge = nn.ModuleList(_merge_layers(b.embed_dim, C1, convs=int(j > 0)) for j, b in enumerate(cfg.branches))
            self.merge_weights = nn.Parameter(torch.ones(n))
            last = cfg.branches[-1]
            strides = [last.layer_strides[last.stage_ends()[s]] for s in (*cfg.out_indexes, cfg.num_stages - 1)]
            # A branch N whose strides already differ between the four merges (a CNN) gives
            # the pyramid as it is; one on a single grid (a ViT) is deconvolved and pooled.
            self.pyramid_native = len(set(strides)) == 4
            if not self.pyramid_native:
                self.fpn1 = _fpn_up4(d1[0])
                self.fpn2 = nn.Sequential(nn.ConvTranspose2d(d1[1], d1[1], 2, 2))
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
        elif cfg.output == "llava":
            self.projector = BranchMLPProjector([b.embed_dim for b in cfg.branches], cfg.projector_dim, cfg.projector_norm)
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

    def set_pos_embed_resize(self, method: str = "interpolate") -> None:
        """How ViT and CLIP branches resize their position embeddings to the live grid:
          - "interpolate" (default): ``F.interpolate`` bicubic, bit for bit the official code;
          - "matmul": the same interpolation weights as two small matmuls
            (``piip.layers.resize``): equal to ``F.interpolate`` to fp32 rounding, forward and
            backward, with a dense backward instead of the bicubic kernel's atomics.
        """
        if method not in ("interpolate", "matmul"):
            raise ValueError(f"set_pos_embed_resize: method must be 'interpolate' or 'matmul', got {method!r}")
        for m in self.modules():
            if hasattr(m, "pos_embed_resize"):
                m.pos_embed_resize = method

    def set_interaction_projections(self, dtype: str = "param") -> None:
        """The dtype of the interaction injectors' projections:
          - "param" (default, as the official code): outside autocast, in the parameters'
            dtype (fp32 GEMMs when the weights are fp32, even under bf16 autocast);
          - "autocast": the value and output projections follow an enclosing autocast (bf16
            GEMMs); offsets and attention logits stay in the parameters' dtype, so the
            sampling positions keep their precision. Without autocast nothing changes.
        """
        from ..layers.interaction import PROJECTION_DTYPES

        if dtype not in PROJECTION_DTYPES:
            raise ValueError(f"set_interaction_projections: dtype must be one of {PROJECTION_DTYPES}, got {dtype!r}")
        for m in self.modules():
            if hasattr(m, "projection_dtype"):
                m.projection_dtype = dtype

    def compile_blocks(self, **compile_kwargs) -> dict:
        """Regional ``torch.compile``: every block and interaction unit, one graph per distinct
        signature (see :func:`piip.compile.compile_blocks`, which takes the same arguments)."""
        from ..compile import compile_blocks

        return compile_blocks(self, **compile_kwargs)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block and every interaction unit in the backward pass."""
        self.grad_checkpointing = enable
        for b in self.branches:
            b.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names that conventionally get no weight decay."""
        keys = {"pos_embed", "cls_token", "ls1", "ls2", "ca_gamma", "cffn_gamma", "merge_weights", "inter_merge_weights",
                "gamma", "class_embedding"}
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in keys}

    def freeze_branches(self, indices) -> None:
        """Stop gradients into the given branches (0-based), e.g. to keep pretrained ViTs fixed."""
        for i in indices:
            if not 0 <= i < len(self.branches):
                raise IndexError(f"branch index {i} out of range for {len(self.branches)} branches")
            for p in self.branches[i].parameters():
                p.requires_grad_(False)

    def _check_input(self, img: Tensor) -> None:
        last = self.cfg.branches[-1]
        if img.dim() != 4 or img.shape[1] != 3:
            raise ValueError(f"PIIP expects images [B, 3, H, W], got shape {tuple(img.shape)}")
        p = last.patch_size
        if img.shape[-2] % p or img.shape[-1] % p:
            kind = " (stem stride)" if last.kind == "convnext" else ""
            raise ValueError(f"PIIP: image size {tuple(img.shape[-2:])} is not a multiple of the patch size {p}{kind} "
                             f"of branch {len(self.cfg.branches)}")
        for i, b in enumerate(self.cfg.branches):
            # Every branch must keep a non-empty grid through its last (coarsest) layer.
            side = min(math.floor(s * b.image_size / last.image_size) for s in img.shape[-2:])
            if side // max(b.layer_strides) < 1:
                raise ValueError(f"PIIP: image size {tuple(img.shape[-2:])} gives branch {i + 1} a {side}-pixel side, "
                                 f"below its total stride {max(b.layer_strides)}")

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
        "cls": [B, 1, C_i] or None per branch, "taps": (tokens, hw) of every branch after
        each stage in ``cfg.out_indexes``}."""
        self._check_input(img)
        xs, hws, cls = [], [], []
        for branch, im in zip(self.branches, self.branch_images(img)):
            x, hw, c = branch.embed(im)
            xs.append(x)
            hws.append(hw)
            cls.append(c)
        n = len(self.branches)
        taps = []
        for s in range(self.cfg.num_stages):
            for i, branch in enumerate(self.branches):
                start, end = branch.cfg.interaction_indexes[s] if branch.cfg.interaction_indexes else (0, branch.cfg.depth - 1)
                xs[i], hws[i], cls[i] = branch.run_layers(xs[i], hws[i], start, end, cls[i])
            if n > 1:
                for u in reversed(range(n - 1)):
                    xs[u], xs[u + 1] = self._unit(self.interactions[s][u], xs[u], hws[u], xs[u + 1], hws[u + 1])
            if s in self.cfg.out_indexes:
                taps.append((list(xs), list(hws)))
        return {"tokens": xs, "hw": hws, "cls": cls, "taps": taps}

    @staticmethod
    def maps(tokens: list[Tensor], hws: list[tuple[int, int]]) -> list[Tensor]:
        """Tokens [B, H*W, C] per branch -> maps [B, C, H, W]."""
        return [x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *hw) for x, hw in zip(tokens, hws)]

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
        if out == "stages":
            return [self.maps(t[:1], h[:1])[0].float() for t, h in feats["taps"]]
        if out == "llava":
            return self.projector(self.maps(xs, hws))
        if out == "classification_merged":
            merged = self._merge(self.maps(xs, hws), hws[-1], self.merge, self.merge_weights)
            t = self.cls_norm(merged.flatten(2).transpose(1, 2))
            return self.cls_head(t.mean(1))
        merged = self.merged_maps(feats)
        if self.cfg.fpn == "regular":
            if self.pyramid_native:
                return merged
            return [self.fpn1(merged[0]), self.fpn2(merged[1]), merged[2], self.fpn4(merged[3])]
        level = {0: self.fpn1, 1: self.fpn2, 2: nn.Identity(), 3: self.fpn4}
        return [level[i](merged[0]) for i in self.cfg.fpn_levels]

    def merged_maps(self, feats: dict) -> list[Tensor]:
        """Detection: the merged maps before the pyramid layers, [B, C_1(s), H_N, W_N] (fp32 with fp32 weights) on
        branch N's grid: the final merge (simple FPN), or the merges after the stages in
        ``cfg.out_indexes`` followed by the final one (regular FPN)."""
        xs, hws = feats["tokens"], feats["hw"]
        final = self._merge(self.maps(xs, hws), hws[-1], self.merge, self.merge_weights)
        if self.cfg.fpn != "regular":
            return [final]
        return [self._merge(self.maps(t, h), h[-1], mods, w)
                for (t, h), mods, w in zip(feats["taps"], self.inter_merge, self.inter_merge_weights)] + [final]

    def _merge(self, maps: list[Tensor], out_hw: tuple[int, int], layers: nn.ModuleList, weights: Tensor) -> Tensor:
        """Per-branch merge layers, then one fused bilinear upsampling (fp32) to out_hw and
        weighted sum: [B, C_1, *out_hw] in the maps' and weights' promoted dtype (fp32 with fp32
        weights; bf16 when the whole model is bf16)."""
        ys = [m(x) for m, x in zip(layers, maps)]
        dtype = torch.promote_types(ys[0].dtype, ys[-1].dtype)
        with torch.profiler.record_function("piip.branch_merge"):  # a named range for profilers
            if self.eager_merge:  # the official form: one interpolate per branch, then multiply-adds
                merged = sum(w * F.interpolate(y.float(), size=tuple(out_hw), mode="bilinear", align_corners=False)
                             for w, y in zip(weights.float().unbind(0), ys))
                # In fp32, returned in branch_merge's dtype (bf16 when weights and maps are bf16).
                return merged.to(torch.promote_types(dtype, weights.dtype))
            return branch_merge([y.to(dtype) for y in ys], weights, out_hw)

    def forward(self, img: Tensor):
        return self.forward_head(self.forward_features(img))


def find_piip(module: nn.Module, what: str = "load") -> PIIP:
    """The one :class:`PIIP` model in ``module``: the module itself, or the only PIIP among its
    submodules (a backbone wrapper such as ``piip.hf.PIIPBackbone``, or a whole task model).
    Raise TypeError when there is none, ValueError when there are several."""
    if isinstance(module, PIIP):
        return module
    if not isinstance(module, nn.Module):
        raise TypeError(f"{what}: expected a piip.PIIP model or a module holding one, got {type(module).__name__}")
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, PIIP)]
    # A PIIP inside another PIIP is part of it: keep the outermost ones.
    found = [(n, m) for n, m in found if not any(o != n and n.startswith(o + ".") for o, _ in found)]
    if not found:
        raise TypeError(f"{what}: {type(module).__name__} holds no piip.PIIP model")
    if len(found) > 1:
        raise ValueError(f"{what}: {type(module).__name__} holds {len(found)} piip.PIIP models ({', '.join(n for n, _ in found)}); "
                         "pass the one to fill")
    return found[0][1]


def _merge_layers(cin: int, cout: int, convs: int) -> nn.Sequential:
    """``convs`` x (conv 3x3 without bias -> GroupNorm(32) -> ReLU); convs=0: GroupNorm(32) -> ReLU
    on the map as it is (branch 1 of the regular-FPN merges)."""
    layers = []
    for k in range(convs):
        layers += [nn.Conv2d(cin if k == 0 else cout, cout, 3, padding=1, bias=False), nn.GroupNorm(32, cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*(layers or [nn.GroupNorm(32, cout), nn.ReLU(inplace=True)]))


def _fpn_up4(c: int) -> nn.Sequential:
    """4x up: ConvT 2x2/2 -> GroupNorm(32) -> GELU -> ConvT 2x2/2."""
    return nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2), nn.GroupNorm(32, c), nn.GELU(), nn.ConvTranspose2d(c, c, 2, 2))


class _TokenLinear(nn.Linear):
    """Linear over the channel dim of a [B, C, H, W] map (the merged classification head)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
