"""Model backends: torch ``nn.Module`` and ONNX Runtime, behind one protocol.

A backend maps float32 (B, C, H, W) input to float32 logits (B, K, H, W) at
the input's resolution: a head that predicts at a stride (YOLO-style models
predict at H/8) is upsampled bilinearly here, so blending happens on the
output grid.

At most ``streams`` forward passes run at once per process; other threads
read, normalise and blend meanwhile. On a GPU one stream keeps the device
busy. On CPU the cores are split between streams (``cores // streams``
intra-op threads each): a small network's forward pass does not scale
linearly over threads, and a thread-parallel forward stalls whenever
another thread (reading, blending) takes one of its cores, while
independent single-threaded streams do not. Two streams is the default;
on two cores it runs geoseg-n-sem 1.2-1.6x as fast as one stream on both.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DeviceError, ModelCardError
from .card import ModelCard


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; validates ``cuda:N``.

    Imports torch only where a GPU may be asked for and an NVIDIA driver is loaded.
    """
    from .onnx_runtime import gpu_visible

    d = (device or "auto").lower()
    if d == "cpu":
        return d
    if d == "auto":
        return "cuda" if gpu_visible() else "cpu"
    import torch

    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
        if ":" in d:
            idx = d.split(":", 1)[1]
            if not idx.isdigit() or int(idx) >= torch.cuda.device_count():
                raise DeviceError(
                    f"device {device!r} does not exist; {torch.cuda.device_count()} GPU(s) visible"
                )
        return d
    raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def available_cores() -> int:
    """CPU cores this process may run on (affinity and cgroup-pinned sets respected)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def cpu_streams(streams: int | None, device: str) -> tuple[int, int]:
    """(concurrent forward passes, intra-op threads each) for ``device``."""
    if not device.startswith("cpu"):
        return max(1, streams or 1), 0
    cores = available_cores()
    n = max(1, min(streams or 2, cores))
    return n, max(1, cores // n)


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Restore torch's process-wide intra-op thread count on exit (CPU streams change it)."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def auto_batch_size(device: str, tile: int, in_channels: int, *, bytes_per_pixel: int = 6000) -> int:
    """Tiles per forward pass that fit the device.

    On CUDA the batch is sized to half the free memory, assuming
    ``bytes_per_pixel`` of activations per input pixel (a conservative figure
    for the YOLO-style family in fp16). On CPU a batch of one 512² tile is as
    fast as a larger one and holds a quarter of its activations, so a batch
    is about 512² pixels: one 512² tile, four 256² tiles (where the cost of
    each call starts to count). Measured on 2 cores (docs/benchmarks.md):
    geoseg-n-sem at 512², batch 1 against 4: 7 % faster, 30 % less peak
    memory; the ukis-csmask U-Net at 256², batch 4 against 1: 7 % faster.
    """
    if device.startswith("cuda"):
        free = cuda_free_bytes(device)
        if free is None:  # nothing can tell: a batch that fits any data-centre GPU at 512² tiles
            return UNKNOWN_GPU_BATCH
        per_tile = tile * tile * max(bytes_per_pixel, in_channels * 4)
        return int(max(1, min(64, (free // 2) // per_tile)))
    return int(max(1, min(8, (512 * 512) // max(1, tile * tile))))


#: The batch on a GPU whose free memory cannot be queried.
UNKNOWN_GPU_BATCH = 16


def cuda_free_bytes(device: str) -> int | None:
    """Free memory of a CUDA device, or None where neither torch nor NVML can tell.

    torch answers when it is loaded (a torch model) and built with CUDA;
    otherwise (an ONNX model on onnxruntime-gpu, beside a CPU build of torch
    or none) NVML does, through ``pynvml`` (``pip install nvidia-ml-py``)
    where it is installed. NVML numbers devices by PCI bus: only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` is ``cuda:N`` known to be NVML's
    device N (mapped through ``CUDA_VISIBLE_DEVICES``); otherwise the
    least free memory among the visible devices is taken.
    """
    import os
    import sys

    index = int(device.split(":", 1)[1]) if ":" in device else 0
    torch = sys.modules.get("torch")  # importing torch for this alone would cost more than it tells
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except Exception:  # noqa: BLE001 - a CUDA build that cannot reach the driver: ask NVML
            pass
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        n = pynvml.nvmlDeviceGetCount()
        visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        if visible and not all(v.isdigit() for v in visible):
            return None  # UUIDs or MIG instances: not worth guessing
        devices = [int(v) for v in visible if int(v) < n] if visible else list(range(n))
        if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
            devices = devices[index : index + 1]
        free = [int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(d)).free) for d in devices]
        return min(free) if free else None
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def _upsample(logits: Any, size: tuple[int, int]) -> Any:
    from torch.nn import functional as F

    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class Backend:
    """Common protocol: ``card``, ``device`` and ``__call__(x) -> logits``."""

    card: ModelCard
    device: str = "cpu"
    streams: int = 1  # forward passes that may run at once
    threads: int = 0  # intra-op threads per stream on CPU (0: the runtime's default)

    def _set_streams(self, streams: int | None) -> None:
        self.streams, self.threads = cpu_streams(streams, self.device)
        self._slots = threading.BoundedSemaphore(self.streams)

    def set_streams(self, streams: int) -> None:
        """Run ``streams`` forward passes at once from now on (CPU: ``cores // streams`` threads each)."""
        self._set_streams(streams)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 (B, C, H, W) -> float32 logits (B, K, H, W)."""
        with self._slots:
            return self._forward(x)

    def _forward(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class TorchBackend(Backend):
    """Runs an ``nn.Module`` in eval mode; AMP (fp16 autocast) on CUDA.

    On CPU, torch's intra-op thread count is process-wide: a forward pass
    sets it to :attr:`threads` (``predict`` and ``infer`` restore it after).
    """

    def __init__(self, module: Any, card: ModelCard, *, device: str = "auto", amp: bool | None = None,
                 streams: int | None = None, precision: str = "auto"):
        self.card = card
        self.device = resolve_device(device)
        self._set_streams(streams)
        cuda = self.device.startswith("cuda")
        self.amp = cuda if amp is None else bool(amp and cuda)
        if precision not in ("auto", "fp16", "bf16", "fp32"):
            raise DeviceError(f"unknown precision {precision!r}; use auto, fp16, bf16 or fp32")
        if precision == "fp32":
            self.amp = False
        self.precision = ("fp16" if precision == "auto" else precision) if self.amp else "fp32"
        self.module = module.to(self.device).eval()
        if cuda:  # convolutions run fastest on NHWC tensors on recent GPUs
            import torch

            self.module = self.module.to(memory_format=torch.channels_last)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if self.device.startswith("cuda"):
            t = t.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            y = self.forward_tensor(t)
        return y.cpu().numpy()

    def forward_tensor(self, x: Any) -> Any:
        """float32 (B, C, H, W) tensor on :attr:`device` -> float32 logits (B, K, H, W) on the device.

        Runs under autocast at :attr:`precision` on a GPU; a head that
        predicts at a stride is upsampled (bilinear) to the input size.
        """
        import torch

        cuda = self.device.startswith("cuda")
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        # no cast-weight cache: a CUDA graph captured around this must not keep the cache's buffers
        with torch.autocast("cuda", dtype=dtype, enabled=self.amp and cuda, cache_enabled=False):
            y = self.module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return _upsample(y.float(), tuple(x.shape[-2:])).contiguous()


class OnnxBackend(Backend):
    """Runs an ONNX graph with ONNX Runtime (CUDA provider when on a GPU)."""

    def __init__(self, path: str | Path, card: ModelCard, *, device: str = "auto", streams: int | None = None):
        import onnxruntime as ort

        self.card = card
        self.path = Path(path)
        available = ort.get_available_providers()
        want = (device or "auto").lower()
        if want.startswith("cuda") and "CUDAExecutionProvider" not in available:
            raise DeviceError(
                f"device {device!r} requested but onnxruntime has no CUDA provider; "
                "install onnxruntime-gpu or use --device cpu"
            )
        use_cuda = "CUDAExecutionProvider" in available and want != "cpu"
        self.device = (want if want.startswith("cuda") else "cuda") if use_cuda else "cpu"
        providers: list[Any] = ["CPUExecutionProvider"]
        if use_cuda:
            dev_id = int(want.split(":")[1]) if ":" in want else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": dev_id}))
        self._providers = providers
        self._sessions: dict[int, Any] = {}
        self._set_streams(streams)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        c, h, w = inp.shape[1:4]
        if isinstance(c, int) and c != card.in_channels:
            raise ModelCardError(
                f"{self.path.name} takes {c} channels but its card says in_channels={card.in_channels}"
            )
        self.fixed_size = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        if self.fixed_size and self.fixed_size != (card.tile_size, card.tile_size):
            raise ModelCardError(
                f"{self.path.name} has a fixed input of {h}x{w} but its card says "
                f"tile_size={card.tile_size}; set tile_size: {h} in the card"
            )

    @property
    def session(self) -> Any:
        """The session for the current thread count (one per count, made when first needed)."""
        import onnxruntime as ort

        n = self.threads or available_cores()
        if n not in self._sessions:
            so = ort.SessionOptions()
            so.intra_op_num_threads = n
            try:
                self._sessions[n] = ort.InferenceSession(str(self.path), sess_options=so, providers=self._providers)
            except Exception as e:  # onnxruntime raises its own untyped errors
                raise ModelCardError(
                    f"{self.path} is not a loadable ONNX model: {str(e).splitlines()[0]}; export it again"
                ) from None
        return self._sessions[n]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        y = self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]
        if y.shape[-2:] != x.shape[-2:]:  # a graph whose logits come out at a stride (torch only then)
            import torch

            y = _upsample(torch.from_numpy(y), tuple(x.shape[-2:])).numpy()
        return np.asarray(y, dtype=np.float32)
