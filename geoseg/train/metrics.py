"""Segmentation metrics from a confusion matrix (pure numpy).

``cm[t, p]`` counts pixels of ground-truth class ``t`` predicted as ``p``;
pixels whose ground truth is the ignore value (255) are not counted, and
predictions that are nodata (255) count as wrong for their true class.

* IoU of class c = cm[c, c] / (row_c + col_c − cm[c, c])
* mIoU averages IoU over the classes present in the ground truth
* pixel accuracy = trace / total
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

IGNORE = 255


@dataclass
class ConfusionMatrix:
    num_classes: int

    def __post_init__(self) -> None:
        # one extra column collects predictions outside 0..K-1 (nodata)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), np.int64)

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        """Accumulate integer maps of equal shape; ``target == 255`` is ignored."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground truth shape {target.shape}")
        k = self.num_classes
        t = target.ravel().astype(np.int64)
        p = pred.ravel().astype(np.int64)
        keep = t != IGNORE
        t, p = t[keep], p[keep]
        if t.size and (t.min() < 0 or t.max() >= k):
            raise ValueError(f"ground truth has class ids outside 0..{k - 1} (and not {IGNORE})")
        p = np.where((p >= 0) & (p < k), p, k)
        self.matrix += np.bincount(t * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        self.matrix += other.matrix

    @property
    def square(self) -> np.ndarray:
        return self.matrix[:, : self.num_classes]

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN for classes absent from both ground truth and prediction."""
        tp = np.diag(self.square).astype(np.float64)
        gt = self.matrix.sum(axis=1)
        pr = self.square.sum(axis=0)
        denom = gt + pr - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)

    def present(self) -> np.ndarray:
        return self.matrix.sum(axis=1) > 0

    def miou(self) -> float:
        """Mean IoU over the classes present in the ground truth."""
        present = self.present()
        return float(np.mean(self.iou()[present])) if present.any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(np.trace(self.square) / total) if total else float("nan")

    def summary(self, names: list[str]) -> dict[str, Any]:
        iou = self.iou()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, iou)},
            "present": [n for n, p in zip(names, self.present()) if p],
            "pixels": int(self.matrix.sum()),
        }

    def to_csv(self, path: Path, names: list[str]) -> None:
        head = "truth\\pred," + ",".join(names) + ",nodata\n"
        rows = "".join(f"{n}," + ",".join(map(str, r)) + "\n" for n, r in zip(names, self.matrix))
        Path(path).write_text(head + rows)

    def to_png(self, path: Path, names: list[str]) -> None:
        """Row-normalised confusion matrix as an image."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        m = self.square.astype(np.float64)
        norm = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("ground truth")
        for i in range(len(names)):
            for j in range(len(names)):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center",
                        color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
        ax.set_title(f"mIoU {self.miou():.3f}, pixel accuracy {self.pixel_accuracy():.3f}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
