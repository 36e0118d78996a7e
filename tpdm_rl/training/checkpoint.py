"""Checkpoint folders: ``DIR/checkpoints/step_<N>/`` written to a temporary folder and renamed, then the
``latest`` marker (a text file naming the newest complete checkpoint) written last, atomically; and what
resuming one needs the user's consent for.

Only safe formats are read back: safetensors for weights (the TPM file format is ``tpdm_rl/training/tpm_file.py``),
``torch.load(weights_only=True)`` for optimiser state, JSON/YAML for the rest.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import torch

from tpdm_rl.algorithm.policy import TimePredictionModule
from tpdm_rl.core.config import Config, ConfigError
from tpdm_rl.core.config_io import config_changes
from tpdm_rl.core.console import disk_full, warn
from tpdm_rl.core.files import replace_folder, write_text_atomic
from tpdm_rl.training.tpm_file import TPM_FILE, CheckpointError, load_tpm, save_tpm

STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
LATEST = "latest"


def save_checkpoint(ckpt_root: Path, iteration: int, policy: TimePredictionModule, optimizer_state: dict | None,
                    trainer_state: dict, config_yaml: str, keep_last: int = 3,
                    extra_files: dict[str, bytes] | None = None, tpm_meta: dict | None = None) -> Path:
    """Write ``step_<iteration>`` completely, then point ``latest`` at it, then rotate old ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{iteration}"
    final = ckpt_root / name
    for stale in ckpt_root.glob(".step_*.tmp*"):  # half-written by a writer that was killed; never read
        shutil.rmtree(stale, ignore_errors=True)
    try:
        with replace_folder(final) as tmp:
            save_tpm(policy, tmp / TPM_FILE, {"iteration": iteration, **(tpm_meta or {})})
            if optimizer_state is not None:
                torch.save(optimizer_state, tmp / OPTIM_FILE)
            (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
            (tmp / CONFIG_FILE).write_text(config_yaml)
            for fname, data in (extra_files or {}).items():
                (tmp / fname).write_bytes(data)
    except (OSError, RuntimeError) as exc:  # ``latest`` still names the previous complete checkpoint
        if disk_full(exc) is not None or _no_space(ckpt_root):  # torch reports ENOSPC as "unexpected pos N vs M"
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from None
        raise
    write_text_atomic(ckpt_root / LATEST, name + "\n")
    steps = sorted((int(d.name.split("_", 1)[1]), d) for d in ckpt_root.iterdir()
                   if d.is_dir() and d.name.startswith("step_") and d.name.split("_", 1)[1].isdigit())
    for _, d in steps[:-keep_last]:
        if d != final:
            shutil.rmtree(d, ignore_errors=True)
    return final


def _no_space(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    marker = ckpt_root / LATEST
    if not marker.is_file():
        return None
    name = marker.read_text().strip()
    path = ckpt_root / name
    if not name or not path.is_dir():
        raise CheckpointError(f"{str(marker)!r} names {name!r}, which is not a checkpoint directory")
    if path.resolve().parent != ckpt_root.resolve():  # "../../other_run/checkpoints/step_5" or a symlink out
        raise CheckpointError(f"{str(marker)!r} names {name!r}, which resolves to {str(path.resolve())!r} outside "
                              f"this run's {str(ckpt_root)!r}; expected a step_N folder of this run (pass "
                              "--resume PATH to resume from another run's checkpoint on purpose)")
    return path


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint folder; returns dict(policy, optimizer, state, config_yaml, path)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a directory")
    for f in (TPM_FILE, STATE_FILE):
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {f} is missing")
    policy = load_tpm(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{str(path / STATE_FILE)!r} is corrupt: {exc}") from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int) or state["iteration"] < 0:
        raise CheckpointError(f"{str(path / STATE_FILE)!r} is corrupt: expected a JSON object with a non-negative "
                              f"integer 'iteration', got {type(state).__name__}")
    optim = None
    if (path / OPTIM_FILE).is_file():
        try:
            optim = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt pickle/zip of any kind
            # torch's own text advises weights_only=False, i.e. running the file's code: never pass that on
            what = ("holds pickled objects other than tensors (nothing in it was run)" if "Weights only load failed"
                    in str(exc) else "is corrupt or not a torch optimizer state")
            raise CheckpointError(f"{str(path / OPTIM_FILE)!r} {what}; expected the optimizer state tpdm-rl "
                                  "writes (tensors and numbers only): restore it from a backup, or delete it and "
                                  "pass --fresh-optimizer") from None
    cfg = (path / CONFIG_FILE).read_text() if (path / CONFIG_FILE).is_file() else ""
    return {"policy": policy, "optimizer": optim, "state": state, "config_yaml": cfg, "path": path}


def resume_consent(ckpt: dict | None, cfg: Config, allow_config_change: list[str] | tuple[str, ...] = (),
                   fresh_optimizer: bool = False) -> dict[str, tuple]:
    """The config changes of resuming ``ckpt`` with ``cfg``, once the user has accepted each one that matters.

    Why: a resumed run should match an uninterrupted one. A missing optimizer state needs ``--fresh-optimizer``
    and a changed objective or trajectory key needs ``--allow-config-change KEY``; anything else is refused with
    one line that names the flag (``RESUME_FREE_KEYS`` in config_io.py may change freely).
    """
    if ckpt is None:
        return {}
    if ckpt["optimizer"] is None:
        if not fresh_optimizer:
            raise CheckpointError(f"checkpoint {str(ckpt['path'])!r} has no optimizer.pt: resuming it would "
                                  "start a fresh optimizer and the weights would differ from an uninterrupted "
                                  "run; pass --fresh-optimizer to accept that")
        warn(f"resuming {ckpt['path']} with a fresh optimizer (--fresh-optimizer): the run will not match an "
             "uninterrupted one")
    changes = config_changes(ckpt["config_yaml"], cfg)
    refused = {k: v for k, v in changes.items() if k not in allow_config_change}
    if refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"config error: resuming {str(ckpt['path'])!r} with a different objective or "
                          f"trajectories ({listed}); pass --allow-config-change {' '.join(refused)} to accept")
    return changes
