"""The training recipe: a YAML file loaded into these frozen dataclasses.

Relative paths in a recipe resolve against the recipe's folder. Every key can
be overridden on the command line, e.g. ``geoseg train r.yaml train.epochs=5``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .augment import AugmentConfig


@dataclass(frozen=True)
class ModelSection:
    architecture: str = "geoseg-n-sem"
    name: str = "geoseg-model"
    init: str | None = None  # safetensors weights to start from (same architecture)


@dataclass(frozen=True)
class DataSection:
    dataset: str = ""  # dataset YAML
    imgsz: int = 384  # training crop side (pixels, multiple of 32)
    batch: int = 8
    input_scale: float = 1 / 255
    mean: tuple[float, ...] | None = None  # None: computed once from the training split
    std: tuple[float, ...] | None = None
    bands: tuple[str, ...] | None = None
    colors: tuple[str, ...] | None = None
    gsd: float | None = None  # metres per pixel of the training imagery (goes into the card)
    extra_datasets: tuple[str, ...] = ()  # more dataset YAMLs (same classes), train split only
    extra_share: float = 0.25  # share of the training samples drawn from extra_datasets
    class_balance: float = 0.0  # share of crops aimed at a class drawn uniformly (see train.data.balanced)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    min_lr_ratio: float = 0.02  # cosine decays to lr * min_lr_ratio


@dataclass(frozen=True)
class TrainSection:
    epochs: int = 50
    steps_per_epoch: int = 50
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # fp16 autocast + grad scaling on CUDA (ignored on CPU)
    ema_decay: float = 0.999
    class_weights: bool = False  # inverse-log-frequency class weights
    dice: float = 1.0
    aux: float = 0.4
    val_every: int = 1  # epochs between validations; 0 = never
    val_tile: int = 512
    val_overlap: int = 64
    output: str = "runs/train"
    max_steps: int | None = None  # stop early (smoke runs, time-boxed runs)


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
