"""Find and load a model: a built-in name, an ONNX file, or safetensors + card.

Loading never unpickles: torch weights are read from safetensors only, and
the architecture is rebuilt from the card's ``architecture`` name through the
registry, so a checkpoint cannot execute code.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DeviceError, GeosegError, ModelCardError, ModelNotFoundError
from .backends import Backend, OnnxBackend, TorchBackend, resolve_device
from .card import ModelCard
from .onnx_runtime import RUNTIMES, cached_export, wants_onnx

WEIGHTS_PACKAGE = "geoseg.weights"


@dataclass(frozen=True)
class ModelSpec:
    """A picklable recipe for loading a model again in another process."""

    model: str
    card: str | None = None
    device: str = "auto"
    streams: int | None = None
    precision: str = "auto"
    runtime: str = "auto"

    def load(self) -> Backend:
        return load_model(self.model, card=self.card, device=self.device, streams=self.streams,
                          precision=self.precision, runtime=self.runtime)


_PROCESS_CACHE: dict[ModelSpec, Backend] = {}
_LOADING: dict[ModelSpec, threading.Lock] = {}
_LOADING_LOCK = threading.Lock()


def cached_model(spec: ModelSpec) -> Backend:
    """One loaded model per process and spec (used by dask.distributed workers, whose threads share it)."""
    if spec in _PROCESS_CACHE:
        return _PROCESS_CACHE[spec]
    with _LOADING_LOCK:
        lock = _LOADING.setdefault(spec, threading.Lock())
    with lock:  # the first thread loads; the others wait for its model instead of loading their own
        if spec not in _PROCESS_CACHE:
            _PROCESS_CACHE[spec] = spec.load()
    return _PROCESS_CACHE[spec]


def builtin_models() -> dict[str, Path]:
    """Built-in model names -> card paths shipped inside the package."""
    try:
        root = resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        return {}
    out = {}
    for entry in root.iterdir():
        p = Path(str(entry))
        if p.suffix == ".yaml" and p.with_suffix(".safetensors").exists():
            out[p.stem] = p
    return dict(sorted(out.items()))


def _card_beside(path: Path, card: str | Path | ModelCard | None) -> ModelCard:
    if isinstance(card, ModelCard):
        return card
    if card is not None:
        return ModelCard.load(card)
    beside = path.with_suffix(".yaml")
    if not beside.is_file():
        raise ModelCardError(
            f"no model card for {path.name}: expected {beside.name} beside it; "
            "pass --card PATH to the card YAML"
        )
    return ModelCard.load(beside)


def load_model(
    model: Any,
    *,
    card: str | Path | ModelCard | None = None,
    device: str = "auto",
    amp: bool | None = None,
    streams: int | None = None,
    precision: str = "auto",
    runtime: str = "auto",
) -> Backend:
    """Load a model the predict engine can run.

    ``model`` is a built-in name (see ``geoseg models``), a path to an
    ``.onnx`` file or a ``.safetensors`` checkpoint (card: the ``.yaml`` with
    the same stem beside it, or ``card``), a directory holding one of those,
    a ``torch.nn.Module`` (``card`` required) or an already loaded backend.
    ``streams``
    is how many forward passes may run at once (CPU default 2, each on
    ``cores // streams`` threads; GPU 1). ``runtime`` is how a
    ``.safetensors`` checkpoint runs: ``torch``, ``onnx`` (a cached ONNX export
    run by ONNX Runtime) or ``auto`` (ONNX Runtime on CPU, torch on a GPU;
    see :mod:`geoseg.models.onnx_runtime`).
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use {', '.join(RUNTIMES)}")
    if isinstance(model, Backend):
        return model
    if not isinstance(model, (str, Path)):
        if card is None:
            raise ModelCardError("a torch module needs a card: load_model(module, card=ModelCard(...))")
        c = card if isinstance(card, ModelCard) else ModelCard.load(card)
        return TorchBackend(model, c, device=device, amp=amp, streams=streams, precision=precision)

    spec = ModelSpec(str(model), None if card is None or isinstance(card, ModelCard) else str(card), device,
                     streams, precision, runtime)
    path = Path(model)
    builtins = builtin_models()
    if not path.exists() and str(model) in builtins:
        path = builtins[str(model)].with_suffix(".safetensors")
    if path.is_dir():
        found = sorted(path.glob("*.onnx")) + sorted(path.glob("*.safetensors"))
        if not found:
            raise ModelNotFoundError(f"{path} holds no .onnx or .safetensors model; pass the model file itself")
        path = found[0]
    if not path.exists():
        names = ", ".join(builtins) or "none installed"
        raise ModelNotFoundError(
            f"model {str(model)!r} is neither a file nor a built-in model; pass a .onnx or .safetensors "
            f"path, or a built-in name ({names})"
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        backend: Backend = OnnxBackend(path, _card_beside(path, card), device=device, streams=streams)
        _check_onnx_classes(backend, path)
    elif suffix == ".safetensors":
        c = _card_beside(path, card)
        note = None
        if wants_onnx(runtime, device, precision):
            on_onnx, note = _checkpoint_on_onnx(path, c, device=device, streams=streams, required=runtime == "onnx")
            if on_onnx is not None:
                on_onnx.spec = spec  # type: ignore[attr-defined]
                return on_onnx
        backend = _load_safetensors(path, c, device=device, amp=amp, streams=streams, precision=precision)
        backend.runtime_note = note  # type: ignore[attr-defined]
    elif suffix in (".pt", ".pth", ".ckpt", ".pkl"):
        raise ModelCardError(
            f"{path.name} is a pickled checkpoint, which can execute code when loaded; save its weights with "
            "safetensors.torch.save_file(model.state_dict(), ...), put a card beside them and load that"
        )
    else:
        raise ModelNotFoundError(f"{path.name}: unknown model format {suffix!r}; use .onnx or .safetensors")
    backend.spec = spec  # type: ignore[attr-defined]
    return backend


def _checkpoint_on_onnx(path: Path, card: ModelCard, *, device: str, streams: int | None,
                        required: bool) -> tuple[Backend | None, str | None]:
    """Checkpoint ``path`` as an ONNX Runtime backend over its cached export, or (None, why not)."""
    check_safetensors(path)
    if not card.architecture:
        raise ModelCardError(
            f"card for {path.name} has no 'architecture'; add e.g. 'architecture: geoseg-n-sem'"
        )
    def build() -> Any:
        return _load_safetensors(path, card, device="cpu", amp=None, streams=1).module  # type: ignore[attr-defined]

    # runtime="auto" chose ONNX Runtime because no GPU is visible; "onnx" keeps the device asked for
    onnx_device = resolve_device(device) if required else "cpu"
    backend: Backend | None = None
    failure: Exception | None = None
    for fresh in (False, True):
        try:
            onnx = cached_export(path, card, build, fresh=fresh)
        except GeosegError:
            raise  # the checkpoint does not match its card: the user's to fix, whatever the runtime
        except Exception as e:  # an unwritable cache, or a module the exporter cannot trace
            failure = e
            break
        try:
            backend = OnnxBackend(onnx, card, device=onnx_device, streams=streams)
            break
        except DeviceError:
            raise
        except ModelCardError as e:
            failure = e
            if fresh or _intact(onnx):  # ONNX Runtime refuses a whole file: exporting it again will not help
                break
            # a cached file cut short (a full disk, say): export it again, once
    if backend is None:
        text = str(failure).splitlines()[0] if failure is not None and str(failure) else ""
        why = f"no ONNX export of {path.name} ({type(failure).__name__}: {text})"
        if required:
            raise ConfigError(f"{why}; run it with --runtime torch") from None
        return None, f"{why}; ran in torch"
    backend.checkpoint = path  # type: ignore[attr-defined]
    return backend, None


def _intact(path: Path) -> bool:
    """Whether ``path`` parses as an ONNX model (a truncated or corrupt file does not)."""
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf's DecodeError, or an unreadable file
        return False
    return True


def _load_safetensors(path: Path, card: ModelCard, *, device: str, amp: bool | None,
                      streams: int | None, precision: str = "auto") -> Backend:
    from safetensors.torch import load_file

    from .registry import create_model

    check_safetensors(path)
    if not card.architecture:
        raise ModelCardError(
            f"card for {path.name} has no 'architecture'; add e.g. 'architecture: geoseg-n-sem'"
        )
    module = create_model(card.architecture, num_classes=card.num_classes, in_channels=card.in_channels)
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own untyped errors
        raise ModelCardError(f"{path.name} is not a valid safetensors file ({str(e).splitlines()[0]}); "
                             "save the weights again with safetensors.torch.save_file") from None
    own = module.state_dict()
    _check_card_matches_weights(path, card, own, state)
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelCardError(
            f"{path.name} does not match architecture {card.architecture!r} with "
            f"{card.num_classes} classes and {card.in_channels} bands: {str(e).splitlines()[0]}"
        ) from None
    return TorchBackend(module, card, device=device, amp=amp, streams=streams, precision=precision)


def check_safetensors(path: Path) -> None:
    """Refuse a file that is not safetensors (a renamed pickle, a zip, an empty file) before reading it.

    A safetensors file starts with the length of its JSON header (8 bytes,
    little-endian), then the header itself, which starts with ``{``.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) == 9 and 0 < n <= size - 8 and head[8:9] == b"{":
        return
    if not head:
        what = "it is empty"
    elif head[:1] == b"\x80":
        what = "it is a pickle, which can execute code when loaded"
    elif head[:4] == b"PK\x03\x04":
        what = "it is a zip archive (a torch.save checkpoint, which can execute code when loaded)"
    else:
        what = "its header is not a safetensors header"
    raise ModelCardError(
        f"{path.name} is not a safetensors file: {what}; save the weights with "
        "safetensors.torch.save_file(model.state_dict(), ...) and load that file"
    )


def _conv_weights(state: dict[str, Any]) -> list[str]:
    return [k for k, v in state.items() if getattr(v, "ndim", 0) == 4]


def _check_card_matches_weights(path: Path, card: ModelCard, own: dict[str, Any], state: dict[str, Any]) -> None:
    """The card's bands and class count against the first convolution and the class heads of the weights.

    A class head is a convolution that, built from the card, has one output
    channel per class; the first of them whose saved weights have another
    count names the model's real number of classes.
    """
    convs = [k for k in _conv_weights(own) if k in state and getattr(state[k], "ndim", 0) == 4]
    if not convs:
        return
    first = convs[0]
    got = int(state[first].shape[1])
    if got != int(own[first].shape[1]):
        raise ModelCardError(
            f"card for {path.name} says in_channels={card.in_channels} but the weights take {got} bands "
            f"(first convolution {first}); set in_channels (or bands) to {got} in the card"
        )
    for k in convs:
        got = int(state[k].shape[0])
        if int(own[k].shape[0]) == card.num_classes and got != card.num_classes:
            raise ModelCardError(
                f"card for {path.name} lists {card.num_classes} classes but the weights predict {got} "
                f"(convolution {k}); list {got} class names in the card"
            )


def _check_onnx_classes(backend: Backend, path: Path) -> None:
    """The card's class count against the ONNX graph's output channels, when the graph fixes them."""
    session = getattr(backend, "session", None)
    if session is None:
        return
    shape = session.get_outputs()[0].shape
    k = shape[1] if len(shape) == 4 else None
    if isinstance(k, int) and k != backend.card.num_classes:
        raise ModelCardError(
            f"card for {path.name} lists {backend.card.num_classes} classes but the model outputs {k} "
            f"channels; list {k} class names in the card"
        )


def default_model() -> str:
    """The built-in model ``geoseg predict`` uses when ``--model`` is not given."""
    found = builtin_models()
    if not found:
        raise ModelNotFoundError(
            "no built-in model is installed; pass --model PATH to a .onnx or .safetensors model"
        )
    return "geoseg-landcover-n" if "geoseg-landcover-n" in found else next(iter(found))
