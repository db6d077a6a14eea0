"""Loss: cross-entropy (ignore 255) + soft Dice + 0.4 x auxiliary cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from .metrics import IGNORE


def soft_dice(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean over classes of the soft Dice score; ignored pixels do not count."""
    k = logits.shape[1]
    valid = (target != IGNORE).unsqueeze(1).float()
    prob = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=k - 1).long(), k).permute(0, 3, 1, 2).float() * valid
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor], target: torch.Tensor,
                      *, class_weights: torch.Tensor | None = None, dice: float = 1.0,
                      aux: float = 0.4) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts. Logits at a stride are upsampled bilinearly to the mask first."""
    main, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
    size = target.shape[-2:]
    main = F.interpolate(main, size=size, mode="bilinear", align_corners=False)
    t = target.long()
    ce = F.cross_entropy(main, t, weight=class_weights, ignore_index=IGNORE)
    d = soft_dice(main, t) if dice else main.new_zeros(())
    total = ce + dice * d
    parts = {"ce": float(ce.detach()), "dice": float(d.detach())}
    if aux_logits is not None and aux:
        a = F.interpolate(aux_logits, size=size, mode="bilinear", align_corners=False)
        a_ce = F.cross_entropy(a, t, weight=class_weights, ignore_index=IGNORE)
        total = total + aux * a_ce
        parts["aux_ce"] = float(a_ce.detach())
    if torch.isnan(total):
        raise FloatingPointError("loss is NaN; lower the learning rate or check the masks")
    parts["loss"] = float(total.detach())
    return total, parts


def inverse_log_frequency(counts: np.ndarray) -> np.ndarray:
    """Class weights 1 / ln(1.02 + frequency), normalised to mean 1 (ENet's scheme)."""
    freq = counts / max(counts.sum(), 1)
    w = 1.0 / np.log(1.02 + freq)
    return (w / w.mean()).astype(np.float32)
