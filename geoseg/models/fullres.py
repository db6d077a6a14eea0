"""A model wrapped so that its logits come out at the input's height and width (for export)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class FullResolution(nn.Module):
    """Wraps a model so its logits come out at the input's height and width.

    A head that predicts at a stride (YOLO-style models predict at H/8) is
    upsampled bilinearly inside the graph, so an exported model gives
    blendable logits at full resolution, as the predict engine expects.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
