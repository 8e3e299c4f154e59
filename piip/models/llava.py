"""The PIIP-LLaVA vision encoder: a multi-branch PIIP (CLIP-L on the small image, CLIP-B or a
CLIP-trained ConvNeXt on the large one) followed by the branch-wise MLP projector, plus the
official input preprocessing.

In a LLaVA-1.5-style code base the model replaces ``vision_tower`` + ``mm_projector``:
``image_features = model(pixel_values)`` gives the image tokens [B, H_N*W_N, llm_dim]
(``encode_images`` is an alias), and :func:`preprocess` turns images into ``pixel_values``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..layers.projector import BranchMLPProjector  # noqa: F401  (kept importable from here)
from .piip import PIIP

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
