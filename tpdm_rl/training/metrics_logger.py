"""Per-iteration metrics out: one JSON line per iteration (``metrics.jsonl``), TensorBoard events, optional W&B.

The keys and their units: ``metrics.py``; reading a run's ``metrics.jsonl``: ``metrics_reader.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsLogger:
    """Writes ``DIR/metrics.jsonl`` (flushed every line), ``DIR/tb/`` events and optionally W&B.

    On resume from iteration k every sink drops what was logged for iterations >= k (they are redone):
    the lines of ``metrics.jsonl``, TensorBoard's points (``purge_step=k``), and W&B continues the same
    run (``wandb_id``, stored in the checkpoint) instead of starting a new one.
    """

    def __init__(self, output: Path, tensorboard: bool = True, wandb_project: str = "", config: dict | None = None,
                 resume_from_iteration: int | None = None, wandb_id: str | None = None) -> None:
        self.path = Path(output) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_iteration is not None and self.path.exists():
            # drop lines of iterations that the checkpoint does not cover (they will be redone)
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("iteration", -1) < resume_from_iteration:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(k + "\n" for k in kept))
        elif resume_from_iteration is None and self.path.exists():
            self.path.unlink()
        self._fh = open(self.path, "a")
        self._tb = None
        if tensorboard:
            self._tb = SummaryWriter(str(Path(output) / "tb"), purge_step=resume_from_iteration)
        self._wandb = None
        self.wandb_id = wandb_id
        if wandb_project:
            import wandb  # optional dependency (the [wandb] extra)

            self.wandb_id = wandb_id or wandb.util.generate_id()
            self._wandb = wandb.init(project=wandb_project, config=config or {}, id=self.wandb_id, resume="allow")

    def log(self, metrics: dict) -> None:
        rec = {k: _clean(v) for k, v in metrics.items()}
        self._fh.write(json.dumps(rec, sort_keys=False) + "\n")
        self._fh.flush()
        it = int(metrics["iteration"])
        if self._tb is not None:
            for k, v in metrics.items():
                if k != "iteration" and isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self._tb.add_scalar(k, float(v), it)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "iteration"}, step=it)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
