"""Devices and dtypes by name: ``auto`` resolved, a device this machine lacks refused in one line."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` / None -> cuda when available, else cpu; anything else as given."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        return device
    check_device("device", str(device))
    return torch.device(device)


class DeviceError(ValueError):
    """A configured device does not exist on this machine."""


def _key(key: str) -> str:
    """The message prefix naming where a device came from: a config key, an option, or nothing."""
    if key.startswith("--"):
        return f"{key} "
    return f"config error: {key}: " if "." in key else f"{key} "


def check_device(key: str, device: str) -> None:
    """One-line error when ``device`` names an accelerator this machine lacks (``auto`` always works)."""
    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise DeviceError(f"{_key(key)}{device!r} is not a torch device (expected auto, cpu, cuda or "
                          "cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise DeviceError(f"{_key(key)}{device!r} requested but this machine has {n} CUDA "
                              "device(s); use auto or cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """A dtype by name (``float32``/``bfloat16``/``float16`` or fp32/bf16/fp16); ``auto`` / None ->
    bf16 on a GPU, fp32 elsewhere. Unknown names raise ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    name = DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES) + sorted(DTYPE_ALIASES)}")
    return DTYPES[name]
