"""The public Python API: load a model, then ``infer``, ``segment`` or ``predict`` with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .engine.infer import infer as _infer
from .engine.lazy import segment as _segment
from .models.backends import Backend
from .models.card import ModelCard
from .models.loading import load_model as _load_backend
from .workflow.predict import PredictResult
from .workflow.predict import predict as _predict


class Model:
    """A loaded model and what can be done with it.

    ``model(x)`` runs one float32 (B, C, H, W) batch (logits out);
    :meth:`infer`, :meth:`segment` and :meth:`predict` run the tiling and
    blending engine on an in-memory image, a lazy array or a file.
    """

    def __init__(self, backend: Backend):
        self.backend = backend

    @property
    def card(self) -> ModelCard:
        return self.backend.card

    @property
    def spec(self) -> Any:
        return getattr(self.backend, "spec", None)

    def __call__(self, x: Any) -> Any:
        return self.backend(x)

    def __getattr__(self, name: str) -> Any:
        # the backend's own attributes (``device``, ``streams``, ``module``, ``session`` …)
        if name == "backend":
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __repr__(self) -> str:
        return f"Model({self.card.name!r}, device={self.device!r})"

    def infer(self, image: Any, **kwargs: Any) -> tuple[Any, Any]:
        """See :func:`geoseg.infer`."""
        return _infer(self.backend, image, **kwargs)

    def segment(self, x: Any, **kwargs: Any) -> Any:
        """See :func:`geoseg.segment`."""
        return _segment(x, self.backend, **kwargs)

    def predict(self, src: str | Path, output: str | Path | None = None, **kwargs: Any) -> PredictResult:
        """See :func:`geoseg.predict`."""
        return _predict(src, output, model=self.backend, **kwargs)


def load_model(model: Any, *, card: str | Path | ModelCard | None = None, device: str = "auto",
               amp: bool | None = None, streams: int | None = None, precision: str = "auto",
               runtime: str = "auto") -> Model:
    """Load a model: a built-in name, an ``.onnx`` or ``.safetensors`` path, a directory, or a
    ``torch.nn.Module`` with its ``card`` (see :func:`geoseg.models.loading.load_model`).

    On CPU a ``.safetensors`` checkpoint runs through ONNX Runtime (a cached
    export) unless ``runtime="torch"``, which keeps the torch module
    (``model.module``)."""
    if isinstance(model, Model):
        return model
    return Model(_load_backend(model, card=card, device=device, amp=amp, streams=streams, precision=precision,
                               runtime=runtime))


def infer(image: Any, model: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Classes and confidence of an image that fits in memory (array, DataArray or path)."""
    return _infer(_backend(model), image, **kwargs)


def segment(x: Any, model: Any, **kwargs: Any) -> Any:
    """Lazily segment a (band, y, x) DataArray or dask array; see :mod:`geoseg.engine.lazy`."""
    return _segment(x, _backend(model), **kwargs)


def predict(src: Any, output: str | Path | None = None, *, model: Any, **kwargs: Any) -> PredictResult:
    """Segment a raster file of any size into a folder of outputs; see :mod:`geoseg.workflow.predict`."""
    if isinstance(model, Model):
        model = model.backend
    return _predict(src, output, model=model, **kwargs)


def _backend(model: Any) -> Any:
    if isinstance(model, Model):
        return model.backend
    if isinstance(model, Backend) or hasattr(model, "card"):
        return model
    return _load_backend(model)
