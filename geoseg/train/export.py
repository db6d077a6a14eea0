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

from ..errors import ConfigError
from ..models.fullres import FullResolution
from ..models.onnx_runtime import OPSET, to_onnx


def export_model(backend: Any, output: str | Path, fmt: str = "onnx", *, opset: int = OPSET,
                 size: int | None = None) -> Path:
    """Write ``output`` (.onnx / .pt) and its card; returns the model path."""
    if not hasattr(backend, "module"):
        raise ConfigError("only torch models can be exported; this one is already ONNX")
    card = backend.card
    s = size or card.tile_size
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        out = to_onnx(backend.module, card.in_channels, s, out.with_suffix(".onnx"), opset=opset)
    elif fmt == "torchscript":
        out = out.with_suffix(".pt")
        module = FullResolution(backend.module.float().cpu().eval()).eval()
        with torch.no_grad():
            torch.jit.trace(module, torch.zeros(1, card.in_channels, s, s)).save(str(out))
    else:
        raise ConfigError(f"unknown export format {fmt!r}; use onnx or torchscript")
    replace(card, fixed_size=False).save(out.with_suffix(".yaml"))
    return out
