"""Torch checkpoints run through ONNX Runtime on CPU: a cached export, made once per checkpoint.

On a CPU, ONNX Runtime runs the geoseg-n-sem graph about 1.5x as fast as
torch does (fused convolutions and activations, a layout chosen for the
CPU), and a process that never imports torch starts 2-3 s sooner. So with
``runtime="auto"`` (the default), a ``.safetensors`` checkpoint loaded for
the CPU is exported to ONNX once — logits at full resolution, the same
graph ``geoseg export`` writes — cached, and run by ONNX Runtime from then
on. A GPU keeps torch (the device-resident engine needs the module).

The cache file is keyed by the checkpoint's content, the card fields that
shape the graph and this package's and torch's versions, so a retrained checkpoint or a
new release exports again, and a cache hit needs no torch at all. It lives
in ``~/.cache/geoseg/onnx`` (``GEOSEG_CACHE`` overrides the folder), which
keeps the 16 most recently used exports; where that cannot be written, or
the export fails, the checkpoint runs in torch and the reason is kept on the
backend (``runtime_note``, shown in run.json). A cached file that ONNX
Runtime cannot load (truncated by a full disk, say) is exported again once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .card import ModelCard

RUNTIMES = ("auto", "torch", "onnx")
OPSET = 17
KEEP = 16  #: exports kept in the cache, the most recently used
STALE_TMP_S = 3600  #: a partial export this old was left by a killed process
_EXPORT_LOCK = threading.Lock()  # torch.onnx.export is not thread-safe; one export at a time per process


def cache_dir() -> Path:
    root = os.environ.get("GEOSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "geoseg")
    return Path(root) / "onnx"


def gpu_visible() -> bool:
    """Whether torch would see a CUDA GPU, without importing torch where no GPU driver is loaded."""
    drivers = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, ROCm
    if "torch" not in sys.modules and not any(os.path.exists(p) for p in drivers):
        return False
    import torch

    return bool(torch.cuda.is_available())


def wants_onnx(runtime: str, device: str, precision: str) -> bool:
    """Whether a torch checkpoint should run through ONNX Runtime (see the module docstring)."""
    if runtime not in RUNTIMES:
        from ..errors import ConfigError

        raise ConfigError(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
    if runtime != "auto":
        return runtime == "onnx"
    d = (device or "auto").lower()
    cpu = d == "cpu" or (d == "auto" and not gpu_visible())
    if not cpu or precision not in ("auto", "fp32"):
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_key(weights: Path, card: ModelCard) -> str:
    """Content hash of what the exported graph depends on (torch's version too: it does the tracing)."""
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    h = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    h.update(f"|{card.architecture}|{card.num_classes}|{card.in_channels}|{__version__}|{OPSET}|"
             f"{torch_version}".encode())
    return h.hexdigest()[:20]


def to_onnx(module: Any, in_channels: int, size: int, out: Path, *, opset: int = OPSET) -> Path:
    """Export ``module`` with its logits upsampled to the input size; dynamic batch, height and width."""
    import torch

    from .fullres import FullResolution

    wrapped = FullResolution(module.float().cpu().eval()).eval()
    x = torch.zeros(1, in_channels, size, size)
    torch.onnx.export(
        wrapped, (x,), str(out), input_names=["input"], output_names=["logits"], opset_version=opset,
        dynamic_axes={"input": {0: "batch", 2: "height", 3: "width"},
                      "logits": {0: "batch", 2: "height", 3: "width"}},
        dynamo=False,
    )
    return out


def cached_export(weights: Path, card: ModelCard, build: Any, *, fresh: bool = False) -> Path:
    """The cached ONNX graph of checkpoint ``weights``; ``build()`` gives its torch module on a miss.

    ``fresh=True`` replaces a cached file (one that ONNX Runtime could not
    load). Threads of one process export one at a time and a second one finds
    the first one's file; processes write under unique temporary names and
    rename, so each sees a whole file or none. Raises OSError where the cache
    cannot be written, and whatever the exporter raises for a module it
    cannot trace.
    """
    folder = cache_dir()
    path = folder / f"{card.architecture or 'model'}-{cache_key(weights, card)}.onnx"
    if not fresh and path.is_file():
        with contextlib.suppress(OSError):
            os.utime(path)  # last used now: pruning keeps it
        return path
    with _EXPORT_LOCK:
        if not fresh and path.is_file():  # another thread exported it while this one waited
            return path
        folder.mkdir(parents=True, exist_ok=True)
        # a name no other thread or process uses; the exporter creates it with the usual permissions
        tmp = folder / f".{path.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            to_onnx(build(), card.in_channels, card.tile_size, tmp)
            os.replace(tmp, path)  # atomic: a concurrent process sees the whole file or none
        finally:
            tmp.unlink(missing_ok=True)
        prune(folder, keep=KEEP)
    return path


def prune(folder: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recently used exports (each training run's checkpoints add one),
    and partial exports that killed processes left behind."""
    def used(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:
            return 0.0

    for old in sorted(folder.glob("*.onnx"), key=used, reverse=True)[keep:]:
        with contextlib.suppress(OSError):  # another process may be pruning too
            old.unlink()
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        if now - used(tmp) > STALE_TMP_S:
            with contextlib.suppress(OSError):
                tmp.unlink()
