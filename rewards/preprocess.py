"""Tensor-only image preprocessing for the reward models, run on the model's device.

Every reward gets float images [B, 3, H, W] in [0, 1]; the reference implementations go through
PIL (resize the shortest side bicubic, centre crop, ``ToTensor``, normalise). This module does the
same on the whole batch at once with ``torchvision.transforms.v2.functional`` (bicubic, antialias),
so there is no per-image loop and no trip through the CPU. The result is clamped to [0, 1] before
normalising, as PIL's uint8 output would be (bicubic overshoots at hard edges).

``resize_longest_and_pad`` is HPSv2's own rule (open_clip's ``ResizeMaxSize``, used by the
``hpsv2`` package with ``resize_longest_max=True``): longest side to the model size, zero padding.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = InterpolationMode.BICUBIC


def _pair(size: int | Sequence[int]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
               dtype: torch.dtype | None) -> torch.Tensor:
    """Clamp to [0, 1] (PIL's uint8 range), normalise, cast to ``dtype`` (default float32)."""
    x = TF.normalize(images.clamp(0.0, 1.0), [float(m) for m in mean], [float(s) for s in std])
    return x.to(dtype or torch.float32).contiguous()


def clip_preprocess(images: torch.Tensor, size: int, crop: int | tuple[int, int] | None = None,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Resize shortest side to ``size`` (bicubic, antialias), centre crop ``crop`` (default ``size``;
    zero-padded when larger), clamp to [0, 1], normalise; computed in float32, returned in ``dtype``
    (default float32)."""
    x = TF.resize(images.float(), [int(size)], interpolation=BICUBIC, antialias=True)
    x = TF.center_crop(x, _pair(crop if crop is not None else int(size)))
    return _normalize(x, mean, std, dtype)


def resize_longest_and_pad(images: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize(size, fill)`` on a batch [..., H, W]: bicubic (antialias) resize so that
    the longest side is ``size`` (other side ``round(side * size / longest)``), then pad with ``fill``
    to ``size`` x ``size``: ``pad_w // 2`` left, ``pad_h // 2`` top, the rest right / bottom.

    Unlike the original, an image whose longest side already is ``size`` is still padded to a square
    (the original returns it unpadded, which the model cannot take)."""
    h, w = images.shape[-2:]
    scale = int(size) / float(max(h, w))
    new_h, new_w = (max(1, round(dim * scale)) for dim in (h, w))
    if (new_h, new_w) != (h, w):
        images = TF.resize(images, [new_h, new_w], interpolation=BICUBIC, antialias=True)
    pad_h, pad_w = int(size) - new_h, int(size) - new_w
    if pad_h or pad_w:
        images = TF.pad(images, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=fill)
    return images


def resize_longest_preprocess(images: torch.Tensor, size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                              std: Sequence[float] = OPENAI_CLIP_STD, fill: float = 0.0,
                              dtype: torch.dtype | None = None) -> torch.Tensor:
    """``resize_longest_and_pad`` (computed in float32), clamp to [0, 1], normalise, cast to ``dtype``.
    For square images this equals ``clip_preprocess(images, size, ...)`` exactly."""
    return _normalize(resize_longest_and_pad(images.float(), int(size), fill), mean, std, dtype)


class PromptFeatureCache:
    """Text features per prompt: a batch encodes each distinct, not yet cached prompt once.

    ``get(prompts, encode)`` returns features [len(prompts), D] in prompt order; ``encode`` maps a
    list of distinct prompts to a [N, D] tensor. Text features do not depend on the image, so an RL
    group (several images per prompt) and repeated prompts across iterations cost one text pass.
    Least-recently-used entries beyond ``max_size`` are dropped.
    """

    def __init__(self, max_size: int = 4096) -> None:
        self.max_size = int(max_size)
        self._store: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        self._store.clear()

    def get(self, prompts: Sequence[str], encode) -> torch.Tensor:
        unique = list(dict.fromkeys(prompts))
        todo = [p for p in unique if p not in self._store]
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            feats = encode(todo)
            fresh = {p: feats[i] for i, p in enumerate(todo)}
        table = []
        for p in unique:
            if p in fresh:
                table.append(fresh[p])
            else:
                self._store.move_to_end(p)
                table.append(self._store[p])
        if self.max_size > 0:
            for p, f in fresh.items():
                self._store[p] = f
            while len(self._store) > self.max_size:
                self._store.popitem(last=False)
        index = {p: i for i, p in enumerate(unique)}
        rows = torch.tensor([index[p] for p in prompts], device=table[0].device)
        return torch.stack(table).index_select(0, rows)
