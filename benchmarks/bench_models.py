"""The model family table: parameters, GFLOPs at 640², CPU ms per 512² tile.

    python benchmarks/bench_models.py

GFLOPs count multiply and add separately (2 x MACs, the convention of the
YOLO papers); parameters include the training-only auxiliary head.
"""

from __future__ import annotations

import time

import torch
from common import machine, table
from torch.utils.flop_counter import FlopCounterMode

from geoseg.models.registry import create_model, list_models


def main() -> None:
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    for name in list_models():
        m = create_model(name, num_classes=5, in_channels=3).eval()
        params = sum(p.numel() for p in m.parameters())
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            m(torch.zeros(1, 3, 640, 640))
        x = torch.zeros(1, 3, 512, 512)
        with torch.inference_mode():
            m(x)
            reps, t = 0, time.perf_counter()
            while reps < 3 or time.perf_counter() - t < 2.0:
                m(x)
                reps += 1
        ms = (time.perf_counter() - t) / reps * 1000
        rows.append({"model": name, "params (M)": f"{params / 1e6:.2f}",
                     "GFLOPs @640²": f"{fc.get_total_flops() / 1e9:.1f}",
                     "CPU ms / 512² tile": f"{ms:.0f}"})
    print(f"machine: {machine()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
