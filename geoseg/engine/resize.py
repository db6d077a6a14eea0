"""Bilinear resizing of float32 (B, C, H, W) batches through ONNX Runtime, as torch resizes them.

The ground-resolution adapter resamples every tile and its logits. With a
torch model that runs in torch, on the model's device; a model on ONNX
Runtime gets the same resizing from ONNX Runtime's ``Resize`` operator, so a
CPU run never imports torch (1.5 s and about 300 MB). ``half_pixel``
coordinates with ``exclude_outside=1`` are torch's ``align_corners=False``
(the antialiased filter's weights renormalised over the taps inside the
image), and the two agree to float rounding (tested).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=16)
def _session(antialias: bool, threads: int) -> Any:
    import onnxruntime as ort
    from onnx import TensorProto, helper

    dims: list[Any] = [None, None, None, None]
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                            coordinate_transformation_mode="half_pixel", antialias=int(antialias),
                            exclude_outside=int(antialias))
    graph = helper.make_graph([node], "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims),
                                                 helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8  # what every supported ONNX Runtime reads
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def resize(x: np.ndarray, size: tuple[int, int], *, antialias: bool = False, threads: int = 1) -> np.ndarray:
    """``x`` (B, C, H, W) resized to ``size``, as ``F.interpolate(x, size, mode="bilinear",
    align_corners=False, antialias=antialias)`` does it; ``threads`` intra-op threads."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    sizes = np.array([*x.shape[:2], *size], np.int64)
    return np.asarray(_session(bool(antialias), max(1, int(threads))).run(None, {"x": x, "sizes": sizes})[0])
