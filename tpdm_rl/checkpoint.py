"""Checkpoints: ``DIR/checkpoints/step_<N>/`` written to a temporary folder and renamed, then the
``latest`` marker (a text file naming the newest complete checkpoint) written last, atomically.

Only safe formats are read back: safetensors for weights, ``torch.load(weights_only=True)`` for
optimiser state, JSON/YAML for the rest.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .console import disk_full
from .policy import TimePredictionModule, TPMSpec

TPM_FILE = "tpm.safetensors"
STATE_FILE = "trainer_state.json"
OPTIM_FILE = "optimizer.pt"
CONFIG_FILE = "config.yaml"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt (one-line message naming the path)."""


def save_tpm(policy: TimePredictionModule, path: str | os.PathLike, extra_meta: dict | None = None) -> None:
    """TPM weights + a self-describing spec (which blocks, sizes) in the safetensors metadata."""
    meta = {"format": "tpdm-rl/tpm", "tpm_spec": json.dumps(policy.spec.to_dict())}
    for k, v in (extra_meta or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    tensors = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    make_shareable(path)


def make_shareable(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary ``open`` would (0644 under umask 022).

    Why: safetensors writes its files with mode 0600, so a checkpoint or export could not be shared with
    the group like every other file of a run."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_tpm_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"TPM weights {str(p)!r} do not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"TPM weights {str(p)!r} are corrupt or not safetensors ({exc})") from None
    if "tpm_spec" not in meta:
        raise CheckpointError(f"TPM weights {str(p)!r} carry no tpm_spec metadata: not a tpdm-rl TPM file")
    return tensors, meta


def load_tpm(path: str | os.PathLike, device: str | torch.device = "cpu") -> TimePredictionModule:
    """Rebuild a TPM from a ``tpm.safetensors`` file or a checkpoint/export folder containing one."""
    p = Path(path)
    if p.is_dir():
        p = p / TPM_FILE
    tensors, meta = read_tpm_file(p)
    spec = TPMSpec.from_dict(json.loads(meta["tpm_spec"]))
    policy = TimePredictionModule(spec)
    try:
        policy.load_state_dict(tensors)
    except RuntimeError as exc:
        raise CheckpointError(f"TPM weights {str(p)!r} do not match their spec: {str(exc).splitlines()[0]}") from None
    return policy.to(device)


def read_tpm_meta(path: str | os.PathLike) -> dict[str, str]:
    p = Path(path)
    return read_tpm_file(p / TPM_FILE if p.is_dir() else p)[1]


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, iteration: int, policy: TimePredictionModule, optimizer_state: dict | None,
                    trainer_state: dict, config_yaml: str, keep_last: int = 3,
                    extra_files: dict[str, bytes] | None = None, tpm_meta: dict | None = None) -> Path:
    """Write ``step_<iteration>`` completely, then point ``latest`` at it, then rotate old ones."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{iteration}"
    final = ckpt_root / name
    tmp = ckpt_root / f".{name}.tmp{os.getpid()}"
    for stale in ckpt_root.glob(".step_*.tmp*"):  # half-written by a writer that was killed; never read
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        save_tpm(policy, tmp / TPM_FILE, {"iteration": iteration, **(tpm_meta or {})})
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / OPTIM_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_FILE).write_text(config_yaml)
        for fname, data in (extra_files or {}).items():
            (tmp / fname).write_bytes(data)
    except (OSError, RuntimeError) as exc:  # ``latest`` still names the previous complete checkpoint
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc) is not None or _no_space(ckpt_root):  # torch reports ENOSPC as "unexpected pos N vs M"
            raise OSError(errno.ENOSPC, "No space left on device", str(final)) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
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
