"""Export a model to ONNX or TorchScript: logits [B, K, H, W], dynamic batch and size.

The exported graph includes the bilinear upsampling from the head's stride
to the input size, so consumers get blendable logits at full resolution
(never an argmax). The card is written beside the file with the same stem.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError


class FullResolution(nn.Module):
    """Wraps a model so its logits come out at the input's height and width."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def export_model(backend: Any, output: str | Path, fmt: str = "onnx", *, opset: int = 17,
                 size: int | None = None) -> Path:
    """Write ``output`` (.onnx / .pt) and its card; returns the model path."""
    if not hasattr(backend, "module"):
        raise ConfigError("only torch models can be exported; this one is already ONNX")
    card = backend.card
    module = FullResolution(backend.module.float().cpu().eval()).eval()
    s = size or card.tile_size
    x = torch.zeros(1, card.in_channels, s, s)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        out = out.with_suffix(".onnx")
        torch.onnx.export(
            module, (x,), str(out), input_names=["input"], output_names=["logits"], opset_version=opset,
            dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                          "logits": {0: "batch", 2: "height", 3: "width"}},
            dynamo=False,
        )
    elif fmt == "torchscript":
        out = out.with_suffix(".pt")
        with torch.no_grad():
            torch.jit.trace(module, x).save(str(out))
    else:
        raise ConfigError(f"unknown export format {fmt!r}; use onnx or torchscript")
    replace(card, fixed_size=False).save(out.with_suffix(".yaml"))
    return out
