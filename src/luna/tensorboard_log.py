"""TensorBoard curves of a training run under the book's tag names (``loss/all``, ``pr/f1_score``, ``roc/auc``,
...), one writer for training rows and one for selection rows, step = training samples seen, so runs of the book's
code and of luna sit side by side in one TensorBoard."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TB_TAGS = {
    "loss_all": "loss/all", "loss_neg": "loss/neg", "loss_pos": "loss/pos",
    "correct_all": "correct/all", "correct_neg": "correct/neg", "correct_pos": "correct/pos",
    "precision": "pr/precision", "recall": "pr/recall", "f1": "pr/f1_score", "auc": "roc/auc",
}
HISTOGRAM_BINS = [x / 50.0 for x in range(51)]


class TensorBoardLog:
    """``<folder>/<time>-trn_cls<suffix>`` and ``<time>-val_cls<suffix>``, opened at the first row (no folder
    when nothing is logged); ``folder`` None logs nothing."""

    def __init__(self, folder: Path | None, time_str: str, comment: str = "") -> None:
        self.folder = folder
        self.time_str = time_str
        self.suffix = f"-{comment}" if comment else ""
        self.writers: dict[str, Any] = {}

    @property
    def run_names(self) -> list[str]:
        """The two run folders' names (what model.pt records, so a curve can be matched to its model)."""
        return [f"{self.time_str}-{name}_cls{self.suffix}" for name in ("trn", "val")]

    def check_available(self) -> None:
        """Raise ImportError now, not after the first epoch, when TensorBoard logging is on and the
        ``tensorboard`` package is missing."""
        if self.folder is not None:
            importlib.import_module("torch.utils.tensorboard")

    def remove_earlier_runs(self, keep: Sequence[str] = ()) -> list[Path]:
        """Delete the run folders of earlier trainings (``*-trn_cls*``, ``*-val_cls*``) but those named in ``keep``
        from the folder, so that it shows this model's curves only; returns what was removed."""
        if self.folder is None or not self.folder.is_dir():
            return []
        removed = []
        for path in sorted(self.folder.iterdir()):
            if path.name in keep:
                continue
            if path.is_dir() and ("-trn_cls" in path.name or "-val_cls" in path.name):
                shutil.rmtree(path)
                removed.append(path)
        return removed

    def log(self, step: int, train: tuple[np.ndarray, np.ndarray, dict[str, Any]],
            selection: tuple[np.ndarray, np.ndarray, dict[str, Any]] | None) -> None:
        """Scalars, a PR curve and the book's is_neg/is_pos histograms for each (labels, probabilities, row)."""
        if self.folder is None:
            return
        if not self.writers:
            from torch.utils.tensorboard import SummaryWriter

            for name, run in zip(("trn", "val"), self.run_names):
                self.writers[name] = SummaryWriter(log_dir=str(self.folder / run))
        runs = [(self.writers["trn"], *train)]
        if selection is not None:
            runs.append((self.writers["val"], *selection))
        for writer, labels, probs, row in runs:
            for key, tag in TB_TAGS.items():
                writer.add_scalar(tag, float(row[key]), step)
            writer.add_pr_curve("pr", labels, probs, step)
            neg = (labels == 0) & (probs > 0.01)
            pos = (labels == 1) & (probs < 0.99)
            if neg.any():
                writer.add_histogram("is_neg", probs[neg], step, bins=HISTOGRAM_BINS)
            if pos.any():
                writer.add_histogram("is_pos", probs[pos], step, bins=HISTOGRAM_BINS)
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
