"""Checkpoints: safetensors weights + the model card, never pickles.

``save_model`` writes ``<stem>.safetensors`` and ``<stem>.yaml`` (the card,
with training provenance under ``provenance``). Training state for
``--resume`` (raw weights, EMA, optimizer moments, step counters, RNG
states) goes to ``<stem>.state.safetensors`` + ``<stem>.state.json``: plain
tensors and JSON, so resuming cannot execute code either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .card import ModelCard


def save_model(module: torch.nn.Module, card: ModelCard, path: str | Path, *, half: bool = False) -> Path:
    """Weights (optionally fp16) + card beside them; returns the .safetensors path."""
    p = Path(path).with_suffix(".safetensors")
    p.parent.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        state[k] = v.half() if half and v.is_floating_point() else v
    tmp = p.with_name(f".{p.name}.part")
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": card.architecture or ""})
    tmp.replace(p)
    card.save(p.with_suffix(".yaml"))
    return p


def save_state(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    p = Path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              str(p.with_suffix(".state.safetensors")))
    p.with_suffix(".state.json").write_text(json.dumps(meta, indent=1))


def load_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    p = Path(path)
    return load_file(str(p.with_suffix(".state.safetensors"))), json.loads(
        p.with_suffix(".state.json").read_text()
    )


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Flatten an optimizer's state into tensors + JSON (param groups, scalar entries)."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                      meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
