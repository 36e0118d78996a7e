"""The one batched interface every reward model implements."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch


class RewardError(ValueError):
    """A reward could not be built or could not score its input (bad option, missing file, bad batch)."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto``/None -> cuda when available, else cpu."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``/None -> bf16 on GPU, fp32 on CPU; otherwise the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise RewardError(f"dtype {dtype!r} is not one of {sorted(table)}")
    return table[dtype]


class RewardModel(ABC):
    """Scores a batch of images (float [B, 3, H, W] in [0, 1]) against their prompts.

    Subclasses implement ``_score_batch`` on at most ``batch_size`` images already moved to
    ``self.device``; ``score`` handles validation, chunking and returns float32 [B] on the CPU.
    """

    name: str = "reward"
    needs_reference: bool = False  # True: score() also needs reference images (same shape)
    nonnegative: bool = False  # True: scores can never be negative (allows the gamma^k discount)

    def __init__(self, device: str | torch.device | None = "auto", dtype: str | torch.dtype | None = "auto",
                 batch_size: int = 32) -> None:
        if int(batch_size) < 1:
            raise RewardError(f"{self.name}: batch_size must be >= 1, got {batch_size!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = int(batch_size)

    @abstractmethod
    def _score_batch(self, images: torch.Tensor, prompts: Sequence[str],
                     references: torch.Tensor | None) -> torch.Tensor:
        """Scores for one chunk; ``images`` is float32 on ``self.device``."""

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str],
              references: torch.Tensor | None = None) -> torch.Tensor:
        """Score a batch; returns a float32 tensor of shape [B] on the CPU."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise RewardError(f"{self.name}: images must be a float tensor [B, 3, H, W], got {shape}")
        prompts = list(prompts)
        if len(prompts) != images.shape[0]:
            raise RewardError(f"{self.name}: got {images.shape[0]} images but {len(prompts)} prompts")
        if self.needs_reference:
            if references is None or references.shape != images.shape:
                got = None if references is None else tuple(references.shape)
                raise RewardError(f"{self.name}: needs reference images of shape {tuple(images.shape)}, got {got}")
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            chunk = images[start:start + self.batch_size].to(self.device, torch.float32)
            ref = None
            if references is not None:
                ref = references[start:start + self.batch_size].to(self.device, torch.float32)
            out.append(self._score_batch(chunk, prompts[start:start + self.batch_size], ref).float().cpu())
        if not out:
            return torch.zeros(0)
        return torch.cat(out).reshape(-1)


_REGISTRY: dict[str, type[RewardModel]] = {}


def register_reward(name: str) -> Callable[[type[RewardModel]], type[RewardModel]]:
    """Class decorator: make a reward available to ``build_reward(name, ...)``."""

    def deco(cls: type[RewardModel]) -> type[RewardModel]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def reward_class(name: str) -> type[RewardModel]:
    """Look up a registered reward class by name (one-line error for an unknown name)."""
    from . import _load_builtin_rewards

    _load_builtin_rewards()
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def reward_options(name: str) -> set[str]:
    """The keyword options ``build_reward(name, ...)`` accepts."""
    cls = reward_class(name)
    opts: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            params = inspect.signature(klass.__init__).parameters
            opts |= {p for p, v in params.items() if p != "self" and v.kind is v.KEYWORD_ONLY
                     or (p != "self" and v.kind is v.POSITIONAL_OR_KEYWORD)}
    return opts


def build_reward(name: str, **options) -> RewardModel:
    """Build a reward model by registry name; unknown options give a one-line RewardError."""
    cls = reward_class(name)
    allowed = reward_options(name)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise RewardError(f"reward {name!r}: unknown option {unknown[0]!r}; expected one of {sorted(allowed)}")
    return cls(**options)
