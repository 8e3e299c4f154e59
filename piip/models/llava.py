"""The PIIP-LLaVA vision encoder: a multi-branch PIIP (CLIP-L on the small image, CLIP-B or a
CLIP-trained ConvNeXt on the large one) followed by the branch-wise MLP projector, plus the
official input preprocessing.

In a LLaVA-1.5-style code base the model replaces ``vision_tower`` + ``mm_projector``:
``image_features = model(pixel_values)`` gives the image tokens [B, H_N*W_N, llm_dim]
(``encode_images`` is an alias), and :func:`preprocess` turns images into ``pixel_values``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .piip import PIIP

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W], without affine parameters (the "ln" projector)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


class _ProjectorBranch(nn.Module):
    """[B, C, H, W] -> Linear(C, D) -> norm -> GELU -> Linear(D, D) -> [B, D, H, W]; norm is
    GroupNorm(32, D) ("gn") or a parameter-free channel LayerNorm ("ln")."""

    def __init__(self, dim: int, out_dim: int, norm: str):
        super().__init__()
        if norm not in ("gn", "ln"):
            raise ValueError(f"projector norm must be 'gn' or 'ln', got {norm!r}")
        if norm == "gn" and out_dim % 32:
            raise ValueError(f"projector: out_dim {out_dim} must be a multiple of 32 (GroupNorm(32))")
        self.fc1 = nn.Linear(dim, out_dim)
        self.norm = nn.GroupNorm(32, out_dim) if norm == "gn" else _ChannelLayerNorm()
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        y = self.act(self.norm(y))
        return self.fc2(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class BranchMLPProjector(nn.Module):
    """The official two-branch MLP projector, for any number of branches: every map but the
    last is resized bilinearly (in fp32) to the last one's grid, each goes through its own
    :class:`_ProjectorBranch`, and the results are summed.

    ``forward(maps)`` with maps [B, C_i, H_i, W_i] -> tokens [B, H_N*W_N, out_dim].
    """

    def __init__(self, dims: list[int], out_dim: int, norm: str = "gn"):
        super().__init__()
        self.norm_kind = norm
        self.branches = nn.ModuleList(_ProjectorBranch(d, out_dim, norm) for d in dims)

    def forward(self, maps: list[Tensor]) -> Tensor:
        if len(maps) != len(self.branches):
            raise ValueError(f"projector: {len(maps)} maps for {len(self.branches)} branches")
        hw = tuple(maps[-1].shape[-2:])
        out = 0
        for proj, x in zip(self.branches, maps):
            if tuple(x.shape[-2:]) != hw:
                x = F.interpolate(x.float(), size=hw, mode="bilinear", align_corners=False).to(x.dtype)
            out = out + proj(x)
        return out.flatten(2).transpose(1, 2)


class PIIPLLaVA(PIIP):
    """PIIP-LLaVA vision tower plus projector (a :class:`PIIP` whose config has
    ``output="llava"``).

      - ``forward_features(img)``: the branches' maps after the last interaction, [B, C_i, H_i, W_i]
        (no final norm; CLIP's class token is dropped);
      - ``forward_head(maps)``: the projector, tokens [B, H_N*W_N, projector_dim];
      - ``forward(img)`` = ``encode_images(img)``: both.

    img is ``pixel_values`` [B, 3, S, S] at branch N's resolution (see :meth:`preprocess`).
    """

    def __init__(self, cfg, backend: str | None = None):
        if cfg.output != "llava":
            raise ValueError(f"PIIPLLaVA needs a config with output='llava', got {cfg.output!r}")
        super().__init__(cfg, backend)

    def forward_features(self, img: Tensor) -> list[Tensor]:
        feats = super().forward_features(img)
        return self.maps(feats["tokens"], feats["hw"])

    def forward_head(self, maps: list[Tensor]) -> Tensor:
        return self.projector(maps)

    def encode_images(self, pixel_values: Tensor) -> Tensor:
        return self(pixel_values)

    def preprocess(self, images) -> Tensor:
        """Images (PIL, or uint8 [H, W, 3] arrays / tensors) -> pixel_values [B, 3, S, S] at
        branch N's resolution, the official way (see :func:`preprocess`)."""
        return preprocess(images, self.cfg.branches[-1].image_size)


def _to_pil(image):
    import numpy as np

    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in requirements-dev
        raise ImportError("piip.models.llava.preprocess needs Pillow (pip install pillow)") from e
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"preprocess expects PIL images or uint8 [H, W, 3] arrays, got {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def preprocess(images, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, pad_to_square: bool = True) -> Tensor:
    """The official PIIP-LLaVA input pipeline -> float32 [B, 3, size, size]:

      1. pad to a square with the background ``int(255 * mean)``, image centred
         (LLaVA's ``expand2square``, image_aspect_ratio "pad"; skipped with ``pad_to_square=False``);
      2. resize the shorter side to ``size`` (PIL bicubic) and centre-crop ``size`` x ``size``
         (what ``CLIPImageProcessor`` does with size = crop = ``size``);
      3. x / 255 (computed in float64, as the processor does), then (x - mean) / std with the
         **ImageNet** statistics, which the official encoder uses instead of CLIP's.
    """
    import numpy as np
    from PIL import Image

    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for image in images:
        im = _to_pil(image)
        if pad_to_square and im.width != im.height:
            side = max(im.width, im.height)
            square = Image.new(im.mode, (side, side), tuple(int(m * 255) for m in mean))
            square.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
            im = square
        short, long = sorted((im.width, im.height))
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if im.width == short else (new_long, size), resample=Image.BICUBIC)
        top, left = (im.height - size) // 2, (im.width - size) // 2
        arr = np.asarray(im)[top:top + size, left:left + size]
        x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))))
    return torch.stack(out)
