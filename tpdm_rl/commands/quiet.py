"""Model libraries made quiet before a command loads them: no progress bars, no deprecation noise."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Silence the model libraries' progress bars and warnings (called by the commands that load them)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    if not torch.cuda.is_available():  # skip DeepSpeed's accelerator probe (and its warning) on CPU machines
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deterministic.*")
    for name in ("diffusers", "transformers", "DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass
    try:
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except ImportError:
        pass
