"""Confusion matrices and IoU scores."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from utils.floats import sum_in_order


UPDATE_CHUNK = 1 << 22  # pixels


class ConfusionMatrix:
    """Accumulates an (n_class, n_class) count matrix, rows = truth, columns = prediction,
    on the device of the predictions."""

    def __init__(self, n_class: int) -> None:
        self.n_class = n_class
        self.matrix: Tensor = torch.zeros(n_class, n_class, dtype=torch.int64)

    def update(self, prediction: Tensor, label: Tensor) -> None:
        """prediction, label: integer class maps of the same shape."""
        if prediction.shape != label.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} differ in shape")
        if self.matrix.device != prediction.device:
            self.matrix = self.matrix.to(prediction.device)
        label, prediction = label.reshape(-1), prediction.reshape(-1)
        # In chunks, so that the int64 temporaries stay small on huge images.
        for start in range(0, label.numel(), UPDATE_CHUNK):
            chunk = slice(start, start + UPDATE_CHUNK)
            index = label[chunk].long() * self.n_class + prediction[chunk].long()
            self.matrix += torch.bincount(index, minlength=self.n_class**2).view(self.n_class, self.n_class)

    def iou(self) -> list[float]:
        """Per-class TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
        m = self.matrix.double().cpu()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return (tp / union).tolist()

    def miou(self, ignore: Sequence[int] = ()) -> float:
        """Mean IoU over the classes not in `ignore`, NaN counted as 0 (DeepGlobe's score)."""
        scores = [0.0 if s != s else s for c, s in enumerate(self.iou()) if c not in set(ignore)]
        return sum_in_order(scores) / len(scores) if scores else float("nan")
