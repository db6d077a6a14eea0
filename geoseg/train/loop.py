"""``geoseg train``: the training loop.

AdamW with linear warm-up then cosine decay, AMP on CUDA, EMA weights,
cross-entropy + soft Dice + 0.4 × auxiliary CE, D4 / scale / colour
augmentation, seeded, resumable (``--resume`` restarts from ``last`` with
weights, EMA, optimizer moments, counters and RNG states). Each epoch
appends to ``metrics.csv`` and redraws ``curves.png``; validation runs the
EMA model through the predict engine and keeps ``best`` by mIoU.
"""

from __future__ import annotations

import copy
import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..config import to_dict
from ..errors import ConfigError
from ..models.backends import TorchBackend, resolve_device
from ..models.card import ModelCard
from ..models.checkpoint import (
    load_state,
    optimizer_tensors,
    restore_optimizer,
    save_model,
    save_state,
)
from ..models.registry import create_model
from .augment import augment_sample
from .data import (
    DatasetSpec,
    MixedDataset,
    balanced,
    image_shape,
    load_dataset_spec,
    open_dataset,
    read_mask,
    split_images,
)
from .evaluate import evaluate_dataset
from .losses import inverse_log_frequency, segmentation_loss
from .recipe import Recipe


class ModelEMA:
    """Exponential moving average of weights; decay ramps up over the first updates."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / 200))
        msd = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(msd[k].detach(), alpha=1 - d)
            else:
                v.copy_(msd[k])


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to ``base`` over ``warmup`` steps, then cosine to ``base * min_ratio``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def _card(recipe: Recipe, spec: DatasetSpec, in_channels: int, mean: list[float], std: list[float],
          provenance: dict[str, Any]) -> ModelCard:
    d = recipe.data
    if d.colors and len(d.colors) != len(spec.names):
        raise ConfigError(f"the recipe's data.colors has {len(d.colors)} colours for the dataset's "
                          f"{len(spec.names)} classes; give {len(spec.names)}, or data.colors=null for defaults")
    return ModelCard(
        name=recipe.model.name, classes=tuple(spec.names), in_channels=in_channels,
        bands=d.bands, colors=d.colors, input_scale=d.input_scale, mean=tuple(mean), std=tuple(std),
        tile_size=max(recipe.train.val_tile, d.imgsz), pad_multiple=32, gsd=d.gsd,
        architecture=recipe.model.architecture, extra={"provenance": provenance},
    )


def _band_stats(ds: Any, scale: float) -> tuple[list[float], list[float]]:
    """Per-band mean/std after ``input_scale``, over the whole training split (computed once)."""
    if hasattr(ds, "band_stats"):
        m, s = ds.band_stats()
        return [v * scale for v in m], [v * scale for v in s]
    tot = tot2 = 0.0
    count = 0
    for img, _ in ds.items:
        x = img.reshape(img.shape[0], -1).astype(np.float64) * scale
        tot = tot + x.sum(axis=1)
        tot2 = tot2 + (x * x).sum(axis=1)
        count += x.shape[1]
    mean = np.asarray(tot) / count
    std = np.sqrt(np.maximum(np.asarray(tot2) / count - mean**2, 1e-12))
    return [float(v) for v in mean], [float(v) for v in std]


def _batch(ds: Any, rng: np.random.Generator, recipe: Recipe, card: ModelCard,
           value_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ms = [], []
    sample = balanced(ds.sample, card.num_classes, recipe.data.class_balance)
    for _ in range(recipe.data.batch):
        img, mask = augment_sample(rng, sample, recipe.data.imgsz, recipe.data.augment, value_range)
        xs.append(card.normalize(img))
        ms.append(mask)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ms).astype(np.int64))


@dataclass
class _Data:
    """The training data and the card it implies."""

    spec: DatasetSpec
    main: Any  # the training split of the recipe's dataset
    train: Any  # what batches are drawn from: ``main``, or mixed with the extra datasets
    card: ModelCard
    provenance: dict[str, Any]
    value_range: float


@dataclass
class _Optim:
    """The model and everything that updates it."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: Any
    ema: ModelEMA
    weights: torch.Tensor | None
    device: str
    use_amp: bool


def train(recipe: Recipe, *, recipe_dir: Path = Path("."), resume: bool = False,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train from a recipe; returns the final summary (also in ``summary.yaml``)."""
    tr = recipe.train
    out, wdir = _output_folder(recipe, recipe_dir, resume)
    torch.manual_seed(tr.seed)
    rng = np.random.default_rng(tr.seed)
    device = resolve_device(tr.device)
    data = _open_data(recipe, recipe_dir)  # every check passes before the run's folder is made
    st = _optim(recipe, recipe_dir, data, device)
    total = tr.epochs * tr.steps_per_epoch if tr.max_steps is None else min(
        tr.max_steps, tr.epochs * tr.steps_per_epoch)
    wdir.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(to_dict(recipe), sort_keys=False))
    step, start_epoch, best = 0, 0, -1.0
    if resume:
        step, start_epoch, best = _restore(wdir / "last", st, rng)
        if step >= total or start_epoch >= tr.epochs:
            log(f"the run in {out} is complete (epoch {start_epoch}, step {step}); nothing to resume")
            done = out / "summary.yaml"
            return (yaml.safe_load(done.read_text()) if done.exists() else None) or {}
        log(f"resumed at epoch {start_epoch}, step {step}")
    csv_path, fields = _metrics_csv(out, data.spec, resume)
    has_val = "val" in data.spec.splits
    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, tr.epochs):
        if step >= total:
            break
        t0 = time.perf_counter()
        sums, n, step = _epoch(recipe, st, data, rng, epoch, step, total)
        row: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": st.opt.param_groups[0]["lr"]}
        row.update({k: v / max(n, 1) for k, v in sums.items()})
        score = None
        if has_val and tr.val_every > 0 and (
            (epoch + 1) % tr.val_every == 0 or epoch + 1 == tr.epochs or step >= total
        ):
            score = _validate(recipe, st, data, row)
        row["seconds"] = time.perf_counter() - t0
        with csv_path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k)) for k in fields])
        best = _checkpoint(wdir, st, data, rng, epoch, step, best, score)
        plot_curves(csv_path, out / "curves.png")
        log(f"epoch {epoch + 1}: loss {row.get('loss', float('nan')):.4f}"
            + (f", val mIoU {score:.4f}" if score is not None else "") + f" ({row['seconds']:.0f} s)")
        summary = {"epoch": epoch + 1, "step": step, "best_val_miou": best if best >= 0 else None,
                   "last": str(wdir / "last.safetensors"),
                   "best": str(wdir / "best.safetensors") if best >= 0 else None}  # none without validation
    (out / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _output_folder(recipe: Recipe, recipe_dir: Path, resume: bool) -> tuple[Path, Path]:
    """The run's folder and its ``weights`` folder, checked and created; the recipe saved in it."""
    tr, d = recipe.train, recipe.data
    if d.imgsz % 32:
        raise ConfigError(f"data.imgsz {d.imgsz} must be a multiple of 32")
    if not 0 <= d.class_balance <= 1:
        raise ConfigError(f"data.class_balance must be in [0, 1], got {d.class_balance}")
    out = (recipe_dir / tr.output).resolve() if not Path(tr.output).is_absolute() else Path(tr.output)
    wdir = out / "weights"
    if not resume and (wdir / "last.safetensors").exists():
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or set train.output")
    if resume and not (wdir / "last.state.json").exists():
        raise ConfigError(f"{out} holds no run to resume; drop --resume to start one, or set train.output")
    return out, wdir


def _open_data(recipe: Recipe, recipe_dir: Path) -> _Data:
    d = recipe.data
    spec = load_dataset_spec(recipe_dir / d.dataset)
    main_ds = open_dataset(spec, "train")
    if recipe.train.val_every > 0 and "val" in spec.splits and spec.kind == "masks":
        for p in split_images(spec, "val"):  # a bad validation image fails now, not epochs later
            read_mask(spec, p, image_shape(p))
    in_ch = main_ds.in_channels
    mean, std = (list(d.mean), list(d.std)) if d.mean and d.std else _band_stats(
        main_ds, d.input_scale)
    train_ds: Any = main_ds
    if d.extra_datasets:
        extras = [open_dataset(load_dataset_spec(recipe_dir / x), "train") for x in d.extra_datasets]
        train_ds = MixedDataset(main_ds, extras, d.extra_share)
    value_range = 1.0 / d.input_scale if d.input_scale else 255.0
    provenance = {"recipe": to_dict(recipe), "dataset": str(spec.root),
                  "train_images": [p.name for p in train_ds.paths], "torch": str(torch.__version__)}
    card = _card(recipe, spec, in_ch, mean, std, provenance)
    return _Data(spec, main_ds, train_ds, card, provenance, value_range)


def _optim(recipe: Recipe, recipe_dir: Path, data: _Data, device: str) -> _Optim:
    """The model (from the recipe's ``init`` weights if any), AdamW, the AMP scaler, EMA, class weights."""
    tr, o = recipe.train, recipe.optim
    model = create_model(recipe.model.architecture, num_classes=data.spec.num_classes,
                         in_channels=data.card.in_channels)
    if recipe.model.init:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(recipe_dir / recipe.model.init)))
    model.to(device)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.lr)
    use_amp = tr.amp and device.startswith("cuda")
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ema = ModelEMA(model, tr.ema_decay)
    weights = None
    if tr.class_weights and hasattr(data.main, "class_pixels"):
        weights = torch.from_numpy(inverse_log_frequency(data.main.class_pixels())).to(device)
    return _Optim(model, opt, scaler, ema, weights, device, use_amp)


def _restore(last: Path, st: _Optim, rng: np.random.Generator) -> tuple[int, int, float]:
    """Weights, EMA, optimizer moments and RNG states from ``last``: (step, next epoch, best score)."""
    tensors, meta = load_state(last)
    st.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    st.ema.module.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    st.ema.updates = meta["ema_updates"]
    restore_optimizer(st.opt, tensors, meta["optimizer"])
    rng.bit_generator.state = meta["rng"]
    torch.set_rng_state(tensors["rng.torch"])
    return meta["step"], meta["epoch"] + 1, meta["best"]


def _metrics_csv(out: Path, spec: DatasetSpec, resume: bool) -> tuple[Path, list[str]]:
    """``metrics.csv`` (started with its header unless a resumed run has one) and its columns."""
    csv_path = out / "metrics.csv"
    fields = ["epoch", "step", "lr", "loss", "ce", "dice", "aux_ce", "val_miou", "val_pixel_acc",
              *[f"iou_{n}" for n in spec.names], "seconds"]
    if not resume or not csv_path.exists():
        with csv_path.open("w", newline="") as f:
            csv.writer(f).writerow(fields)
    return csv_path, fields


def _epoch(recipe: Recipe, st: _Optim, data: _Data, rng: np.random.Generator, epoch: int, step: int,
           total: int) -> tuple[dict[str, float], int, int]:
    """One epoch of optimizer steps (fewer where ``total`` is reached): (summed loss parts, steps, step)."""
    from rich.progress import Progress

    tr, o = recipe.train, recipe.optim
    st.model.train()
    sums: dict[str, float] = {}
    n = 0
    import sys
    import time

    piped = not sys.stderr.isatty()  # no live bar in a pipe or a log file: a plain line now and then
    last = time.monotonic()
    with Progress(transient=True, disable=piped) as bar:
        task = bar.add_task(f"epoch {epoch + 1}/{tr.epochs}", total=tr.steps_per_epoch)
        for _ in range(tr.steps_per_epoch):
            if step >= total:
                break
            for g in st.opt.param_groups:
                g["lr"] = lr_at(step, total, o.lr, o.warmup_steps, o.min_lr_ratio)
            x, y = _batch(data.train, rng, recipe, data.card, data.value_range)
            x, y = x.to(st.device, non_blocking=True), y.to(st.device, non_blocking=True)
            with torch.autocast("cuda", enabled=st.use_amp):
                outputs = st.model(x)
            loss, parts = segmentation_loss(
                tuple(t.float() for t in outputs) if isinstance(outputs, tuple) else outputs.float(),
                y, class_weights=st.weights, dice=tr.dice, aux=tr.aux)
            st.opt.zero_grad(set_to_none=True)
            st.scaler.scale(loss).backward()
            st.scaler.unscale_(st.opt)
            torch.nn.utils.clip_grad_norm_(st.model.parameters(), 10.0)
            st.scaler.step(st.opt)
            st.scaler.update()
            st.ema.update(st.model)
            step += 1
            n += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.update(task, advance=1, description=f"epoch {epoch + 1}/{tr.epochs} loss {parts['loss']:.3f}")
            if piped and time.monotonic() - last >= 30:
                last = time.monotonic()
                print(f"epoch {epoch + 1}/{tr.epochs} step {n}/{tr.steps_per_epoch} loss {parts['loss']:.3f}",
                      file=sys.stderr, flush=True)
    return sums, n, step


def _validate(recipe: Recipe, st: _Optim, data: _Data, row: dict[str, Any]) -> float:
    """The EMA model through the predict engine on the validation split; scores into ``row``; mIoU."""
    tr = recipe.train
    backend = TorchBackend(st.ema.module, data.card, device=st.device, streams=1)
    cm = evaluate_dataset(backend, data.spec, "val", tile=tr.val_tile, overlap=tr.val_overlap)
    score = cm.miou()
    row.update({"val_miou": score, "val_pixel_acc": cm.pixel_accuracy()})
    row.update({f"iou_{nm}": v for nm, v in zip(data.spec.names, cm.iou())})
    st.ema.module.eval()
    return score


def _checkpoint(wdir: Path, st: _Optim, data: _Data, rng: np.random.Generator, epoch: int, step: int,
                best: float, score: float | None) -> float:
    """Save ``last`` (and ``best`` when ``score`` beats it) and the state to resume from; the best score."""
    metrics = {"epoch": epoch + 1, "step": step, "val_miou": score}
    card_now = replace(data.card, extra={"provenance": data.provenance, "metrics": metrics})
    save_model(st.ema.module, card_now, wdir / "last")
    if score is not None and score > best:
        best = score
        save_model(st.ema.module, card_now, wdir / "best")
    otensors, ometa = optimizer_tensors(st.opt)
    tensors = {f"model.{k}": v for k, v in st.model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in st.ema.module.state_dict().items()})
    tensors.update(otensors)
    tensors["rng.torch"] = torch.get_rng_state()
    save_state(wdir / "last", tensors, {
        "epoch": epoch, "step": step, "best": best, "ema_updates": st.ema.updates,
        "optimizer": ometa, "rng": rng.bit_generator.state,
    })
    return best


def _fmt(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def plot_curves(csv_path: Path, png: Path) -> None:
    """Loss and validation curves from metrics.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    ep = [int(r["epoch"]) for r in rows]

    def col(k: str) -> list[float]:
        return [float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows]

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for k in ("loss", "ce", "dice", "aux_ce"):
        a.plot(ep, col(k), marker="o" if len(ep) == 1 else None, label=k)  # one epoch: a point
    a.set_xlabel("epoch")
    a.set_title("training loss")
    a.legend()
    for k in ("val_miou", "val_pixel_acc"):
        b.plot(ep, col(k), marker="o", label=k)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.set_title("validation")
    b.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
