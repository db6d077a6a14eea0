"""Device-resident blocks: everything after the read runs where the model runs.

For a torch model on a GPU, moving full-resolution float logits to the host
and blending them there costs far more than the forward pass (a stride-8
head's logits are upsampled 64-fold). This engine keeps a block's input,
its accumulator and the strips passed between neighbouring blocks on the
device; only uint8 classes (and, when asked, float32 confidence) and a
256-bin histogram come back.

One driver thread owns the device and walks the blocks in row-major order,
which is a valid order for the wavefront: blocks (i - 1, j), (i, j - 1) and
(i - 1, j - 1) are always finished before block (i, j), so their strips are
waiting when it resolves. Tiles are taken from a queue that spans blocks,
so every forward pass has ``batch_size`` tiles whatever the block holds
(on CUDA the last batch is padded to the same shape, so cuDNN's choice is
reused). Reader threads fill (pinned) host buffers ahead of the device and
the writer runs on threads of its own.

The same code runs on CPU tensors, which is how it is tested: its classes
equal :func:`geoseg.engine.blocks.predict_array`'s.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..geometry.grid import Layout
from .blocks import NODATA, BlockOut, Source
from .options import RunOptions


@dataclass
class Transfers:
    """Bytes that crossed between host and device, and forward passes run."""

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    batches: int = 0
    tiles: int = 0
    padded_tiles: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes, "batches": self.batches,
                "tiles": self.tiles, "padded_tiles": self.padded_tiles}


@dataclass
class _Block:
    ij: tuple[int, int]
    rows: slice
    cols: slice
    x: Any  # (C, h, w) normalised input on the device (invalid pixels 0)
    valid: Any  # (h, w) bool on the device
    acc: Any  # (K + 1, h, w) float32 on the device
    tiles: list[tuple[int, int]]  # local origins still to run
    skipped: int
    pending: int = 0


def _read(source: Source, layout: Layout, ij: tuple[int, int], pin: bool) -> tuple[Any, Any, Any]:
    import torch

    rows, cols = layout.block_extent(*ij)
    data, ok = source.read(rows, cols)
    h, w = layout.grid.shape
    inside = (np.arange(rows.start, rows.stop) < h)[:, None] & (np.arange(cols.start, cols.stop) < w)[None, :]
    t = torch.from_numpy(np.ascontiguousarray(data))
    v = torch.from_numpy(np.ascontiguousarray(ok))
    if pin:
        t, v = t.pin_memory(), v.pin_memory()
    return t, v, ok & inside


def run_on_device(source: Source, backend: Any, layout: Layout, opts: RunOptions,
                  sink: Callable[[tuple[int, int], BlockOut], Any], *, readers: int = 4, prefetch: int = 6,
                  writers: int = 2) -> Transfers:
    """Compute every block of ``layout`` on ``backend``'s device and hand each to ``sink`` once.

    ``backend`` needs ``card``, ``device`` and ``forward_tensor(x) -> logits``
    (a (B, C, T, T) float32 device tensor in, (B, K, T, T) float32 out, see
    :class:`geoseg.models.backends.TorchBackend`). ``sink(ij, block)`` runs
    on writer threads, at most ``writers`` at once, with numpy blocks.
    Returns the transfer counters.
    """
    import torch

    dev = torch.device(backend.device)
    cuda = dev.type == "cuda"
    card = backend.card
    k = card.num_classes
    t = layout.tile
    bs = max(1, opts.batch_size)
    stats = Transfers()
    window = torch.from_numpy(opts.window()).to(dev)
    c = card.in_channels
    std = torch.tensor(card.std if card.std is not None else [1.0] * c, dtype=torch.float64)
    mean = torch.tensor(card.mean if card.mean is not None else [0.0] * c, dtype=torch.float64)
    scale = (card.input_scale / std).to(torch.float32).view(-1, 1, 1).to(dev)
    offset = (mean / std).to(torch.float32).view(-1, 1, 1).to(dev)
    order = list(layout.iter_blocks())
    strips: dict[tuple[int, int, int], Any] = {}
    active: deque[_Block] = deque()
    queue: deque[tuple[_Block, int, int]] = deque()
    reads: deque[tuple[tuple[int, int], Future[Any]]] = deque()
    written: deque[Future[Any]] = deque()
    nxt = 0

    def load(pool: ThreadPoolExecutor) -> None:
        nonlocal nxt
        ij, fut = reads.popleft()
        while nxt < len(order) and len(reads) < prefetch:
            reads.append((order[nxt], pool.submit(_read, source, layout, order[nxt], cuda)))
            nxt += 1
        data, valid, tile_mask = fut.result()
        stats.h2d_bytes += data.numel() * data.element_size() + valid.numel()
        x = data.to(dev, non_blocking=True).to(torch.float32)
        v = valid.to(dev, non_blocking=True)
        x.mul_(scale).sub_(offset)
        x.masked_fill_(~v, 0.0)
        rows, cols = layout.block_extent(*ij)
        origins = [(r - rows.start, q - cols.start) for r, q in layout.block_tiles(*ij)]
        todo = [(r, q) for r, q in origins if tile_mask[r : r + t, q : q + t].any()]
        acc = torch.zeros((k + 1, *x.shape[1:]), dtype=torch.float32, device=dev)
        blk = _Block(ij, rows, cols, x, v, acc, todo, len(origins) - len(todo), len(todo))
        active.append(blk)
        queue.extend((blk, r, q) for r, q in todo)

    def run_batch() -> None:
        batch = [queue.popleft() for _ in range(min(bs, len(queue)))]
        xb = torch.stack([b.x[:, r : r + t, q : q + t] for b, r, q in batch])
        pad = bs - len(batch) if cuda else 0
        if pad:
            xb = torch.cat([xb, xb.new_zeros((pad, *xb.shape[1:]))])
        logits = backend.forward_tensor(xb)
        stats.batches += 1
        stats.tiles += len(batch)
        stats.padded_tiles += pad
        for (b, r, q), lg in zip(batch, logits):
            region = b.acc[:, r : r + t, q : q + t]
            region[:k].addcmul_(lg, window)
            region[k].add_(window)
            b.pending -= 1

    def finish(b: _Block, pool: ThreadPoolExecutor) -> None:
        i, j = b.ij
        acc = b.acc
        for key in ((i - 1, j, 0), (i, j - 1, 1), (i - 1, j - 1, 2)):
            s = strips.pop(key, None)
            if s is not None:
                acc[:, : s.shape[1], : s.shape[2]] += s
        h, w = layout.grid.shape
        br, bc = layout.block_slices(i, j)
        bh, bw = br.stop - br.start, bc.stop - bc.start
        eh, ew = min(acc.shape[1], h - b.rows.start), min(acc.shape[2], w - b.cols.start)
        if eh > bh:
            strips[i, j, 0] = acc[:, bh:eh, :bw].clone()
        if ew > bw:
            strips[i, j, 1] = acc[:, :bh, bw:ew].clone()
        if eh > bh and ew > bw:
            strips[i, j, 2] = acc[:, bh:eh, bw:ew].clone()
        classes, conf = resolve_tensor(acc[:, :bh, :bw], b.valid[:bh, :bw], confidence=opts.confidence)
        hist = torch.bincount(classes.flatten().to(torch.int64), minlength=256)
        host = [_to_host(a, cuda) for a in (classes, conf, hist) if a is not None]
        stats.d2h_bytes += sum(a.numel() * a.element_size() for a in host)
        event = torch.cuda.Event() if cuda else None
        if event is not None:
            event.record()
        skipped = b.skipped
        ntiles = len(b.tiles)

        def write() -> None:
            if event is not None:
                event.synchronize()
            cls = host[0].numpy()
            cf = host[1].numpy() if opts.confidence else None
            hh = host[-1].numpy()
            hist_k = np.concatenate([hh[:k], hh[NODATA : NODATA + 1]]).astype(np.int64)
            sink((i, j), BlockOut(cls, cf, hist_k, ntiles, skipped))

        while len(written) >= 2 * writers:  # bound the blocks waiting for the writer
            written.popleft().result()
        written.append(pool.submit(write))

    with ThreadPoolExecutor(readers, thread_name_prefix="geoseg-read") as rpool, \
            ThreadPoolExecutor(writers, thread_name_prefix="geoseg-write") as wpool, torch.inference_mode():
        try:
            while nxt < len(order) and len(reads) < prefetch:
                reads.append((order[nxt], rpool.submit(_read, source, layout, order[nxt], cuda)))
                nxt += 1
            while reads or queue or active:
                while reads and len(queue) < bs:
                    load(rpool)
                if queue:
                    run_batch()
                while active and active[0].pending == 0:
                    finish(active.popleft(), wpool)
            for f in written:
                f.result()
        except BaseException:
            for _, f in reads:
                f.cancel()
            for f in written:
                f.cancel()
            raise
    return stats


def _to_host(a: Any, cuda: bool) -> Any:
    import torch

    if not cuda:
        return a.contiguous()
    out = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
    out.copy_(a, non_blocking=True)
    return out


def resolve_tensor(acc: Any, valid: Any, *, confidence: bool = False) -> tuple[Any, Any]:
    """:func:`geoseg.engine.blend.resolve` on a torch accumulator (any device).

    Returns uint8 classes (``NODATA`` where not valid) and, with
    ``confidence``, float32 max softmax (-1 where not valid). The argmax
    keeps the first maximum, as numpy's does.
    """
    import torch

    k = acc.shape[0] - 1
    weight = acc[k]
    if bool((weight[valid] <= 0).any()):
        raise RuntimeError("a valid pixel received no tile weight; the tiling is wrong")
    best = acc[0].clone()
    classes = torch.zeros(best.shape, dtype=torch.uint8, device=acc.device)
    for c in range(1, k):
        better = acc[c] > best
        torch.maximum(best, acc[c], out=best)
        classes.masked_fill_(better, c)
    conf = None
    if confidence:
        logits = acc[:k] / torch.clamp(weight, min=float(np.finfo(np.float32).tiny))
        logits -= logits.max(dim=0, keepdim=True).values
        conf = (1.0 / torch.exp(logits).sum(dim=0)).to(torch.float32)
        conf.masked_fill_(~valid, -1.0)
    classes.masked_fill_(~valid, NODATA)
    return classes, conf
