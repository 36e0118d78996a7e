"""Tensor-only image preprocessing for the reward models, run on the model's device.

Every reward gets float images [B, 3, H, W] in [0, 1]; the reference implementations go through
PIL (resize the shortest side bicubic, centre crop, ``ToTensor``, normalise). This module does the
same on the whole batch at once with ``torch.nn.functional.interpolate`` (bicubic, antialias), so
there is no per-image loop and no trip through the CPU. The result is clamped to [0, 1] before
normalising, as PIL's uint8 output would be (bicubic overshoots at hard edges).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output (h, w) of resizing the shortest side to ``shortest`` (torchvision ``Resize(int)`` rule)."""
    if height <= width:
        return shortest, max(1, int(shortest * width / height))
    return max(1, int(shortest * height / width)), shortest


def resize_shortest(images: torch.Tensor, shortest: int) -> torch.Tensor:
    """Bicubic (antialiased) resize so that the shortest side is ``shortest``; a no-op when it already is."""
    h, w = images.shape[-2:]
    size = resized_size(h, w, shortest)
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Centre crop to ``size`` (torchvision's rounding); smaller inputs are zero-padded first."""
    ch, cw = (size, size) if isinstance(size, int) else size
    h, w = images.shape[-2:]
    if h < ch or w < cw:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        images = F.pad(images, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = images.shape[-2:]
    top = int(round((h - ch) / 2.0))
    left = int(round((w - cw) / 2.0))
    return images[..., top:top + ch, left:left + cw]


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def clip_preprocess(images: torch.Tensor, size: int, crop: int | tuple[int, int] | None = None,
                    mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Resize shortest side to ``size`` (bicubic, antialias), centre crop ``crop`` (default ``size``),
    clamp to [0, 1], normalise; computed in float32, returned in ``dtype`` (default float32)."""
    x = images.float()
    x = resize_shortest(x, int(size))
    x = center_crop(x, crop if crop is not None else int(size))
    x = normalize(x.clamp(0.0, 1.0), mean, std)
    return x.to(dtype or torch.float32).contiguous()


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
