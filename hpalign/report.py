"""What the user sees of a run: metrics.jsonl, TensorBoard / Weights & Biases, the final plot and
summary.json. Only rank 0 writes; other ranks get a logger that does nothing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

logger = logging.getLogger("hpalign")

KNOWN_REPORTERS = ("none", "wandb", "tensorboard")


class MetricsLogger:
    """Append-only metrics sink; `log(step, metrics)` writes a jsonl line and forwards to trackers."""

    def __init__(self, run_dir: Path, *, report_to: list[str], config: dict[str, Any], enabled: bool,
                 run_name: str, resumed_step: int = 0):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        self._wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            # A resumed run logs the steps after its checkpoint again: TensorBoard drops its older copies.
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                              purge_step=resumed_step + 1 if resumed_step else None)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as error:
                raise ValueError("--report_to wandb needs the wandb package: pip install wandb "
                                 "(set WANDB_MODE=offline without network)") from error
            self._wandb = wandb.init(project="hpalign", name=run_name, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tensorboard is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], *, step: int) -> None:
        """A table of rows (PPO's samples) to W&B; the caller keeps its own file copy."""
        if self.enabled and self._wandb is not None:
            import wandb

            self._wandb.log({name: wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    """A JSON value: tensors become floats, NaN and infinities `null` (JSON has no NaN token)."""
    value = float(value) if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_training(metrics_path: Path, out_png: Path, *, series: tuple[str, ...] = (
        "train/loss", "train/rewards/margins", "train/rewards/accuracies")) -> Path | None:
    """A PNG with one panel per series that was logged (loss, reward margins, accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if any(s in r for s in series)]
    present = [s for s in series if any(s in r for r in records)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(5 * len(present), 3.6), squeeze=False)
    for axis, name in zip(axes[0], present, strict=False):
        points = [(r["step"], r[name]) for r in records if name in r]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=".", linewidth=1)
        axis.set_title(name)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(_finite_or_null(summary), indent=2, default=str, allow_nan=False) + "\n")


def _finite_or_null(value: Any) -> Any:
    """`value` with every NaN or infinite float, however deep, replaced by None."""
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return _plain(value) if isinstance(value, float) or hasattr(value, "item") else value


def format_eval_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    """A small before/after table for the terminal."""
    names = sorted(after)
    if not names:
        return "no held-out metrics (no held-out data: see --val_dataset / --split_dataset_ratio)"
    width = max(len(n) for n in names) + 2
    lines = [f"{'held-out metric':<{width}}{'before':>10}{'after':>10}"]
    for name in names:
        old = f"{before[name]:.4f}" if before and name in before else "-"
        lines.append(f"{name:<{width}}{old:>10}{after[name]:>10.4f}")
    return "\n".join(lines)
