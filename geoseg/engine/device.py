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
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..geometry.grid import Layout
from ..geometry.units import NODATA
from .blocks import BlockOut, Source, fold_histogram
from .options import RunOptions
from .schedule import frontier

PHASES = ("capture", "read_wait", "load", "forward", "finish", "write_wait", "writers_busy")


@dataclass
class Transfers:
    """Bytes that crossed between host and device, forward passes run, and where the driver's time went.

    ``seconds`` holds the driver thread's wall time in each phase, none
    counted twice (capturing the CUDA graph, waiting for reads, moving
    blocks in, queueing forward passes, resolving blocks, waiting for the
    writers; device work is asynchronous, so it shows where the driver had
    to wait for it) and the writers' busy time summed over
    their threads.
    """

    h2d_bytes: int = 0
    d2h_bytes: int = 0
    batches: int = 0
    tiles: int = 0
    padded_tiles: int = 0
    cuda_graph: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def as_dict(self) -> dict[str, Any]:
        return {"h2d_bytes": self.h2d_bytes, "d2h_bytes": self.d2h_bytes, "batches": self.batches,
                "tiles": self.tiles, "padded_tiles": self.padded_tiles, "cuda_graph": self.cuda_graph,
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


@contextmanager
def _timed(stats: Transfers, phase: str, lock: threading.Lock | None = None) -> Iterator[None]:
    t = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t
        if lock is None:
            stats.seconds[phase] += dt
        else:
            with lock:
                stats.seconds[phase] += dt


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
                  writers: int = 2, done: frozenset[tuple[int, int]] = frozenset(),
                  graph: bool | None = None) -> Transfers:
    """Compute every block of ``layout`` on ``backend``'s device and hand each to ``sink`` once.

    ``backend`` needs ``card``, ``device`` and ``forward_tensor(x) -> logits``
    (a (B, C, T, T) float32 device tensor in, (B, K, T, T) float32 out, see
    :class:`geoseg.models.backends.TorchBackend`). ``sink(ij, block)`` runs
    on writer threads, at most ``writers`` at once, with numpy blocks;
    ``readers`` threads read up to ``prefetch`` blocks ahead. ``done``
    blocks (a resumed run) are skipped, except those whose strips a
    remaining block needs (see :func:`geoseg.engine.schedule.frontier`),
    which run without reaching the sink. ``graph`` (default: on CUDA)
    replays the forward pass as one CUDA graph of the fixed batch shape,
    captured while the first blocks are read. Returns the transfer counters.
    """
    import torch

    run = _DeviceRun(source, backend, layout, opts, sink, writers, done, graph)
    with ThreadPoolExecutor(readers, thread_name_prefix="geoseg-read") as rpool, \
            ThreadPoolExecutor(writers, thread_name_prefix="geoseg-write") as wpool, torch.inference_mode():
        try:
            run.loop(rpool, wpool, prefetch)
        except BaseException:
            run.cancel()
            raise
    return run.stats


class _DeviceRun:
    """The state of one device run: blocks in flight, the tile queue, strips, pending reads and writes."""

    def __init__(self, source: Source, backend: Any, layout: Layout, opts: RunOptions,
                 sink: Callable[[tuple[int, int], BlockOut], Any], writers: int,
                 done: frozenset[tuple[int, int]] = frozenset(), graph: bool | None = None):
        import torch

        self.source, self.backend, self.layout, self.opts, self.sink = source, backend, layout, opts, sink
        self.dev = torch.device(backend.device)
        self.cuda = self.dev.type == "cuda"
        self.stream: Any = torch.cuda.current_stream(self.dev) if self.cuda else None
        self.lock = threading.Lock()
        self.use_graph = self.cuda if graph is None else bool(graph and self.cuda)
        self.graph: Any = None
        self.static_in: Any = None
        self.static_out: Any = None
        self.ones = torch.ones(0, dtype=torch.int64, device=self.dev)
        card = backend.card
        self.k = card.num_classes
        self.batch = max(1, opts.batch_size)
        self.max_written = 2 * writers
        self.stats = Transfers()
        self.window = torch.from_numpy(opts.window()).to(self.dev)
        c = card.in_channels
        std = torch.tensor(card.std if card.std is not None else [1.0] * c, dtype=torch.float64)
        mean = torch.tensor(card.mean if card.mean is not None else [0.0] * c, dtype=torch.float64)
        # the same float32 factors as ModelCard.normalize, so the input is bit-identical
        self.scale = (card.input_scale / std).to(torch.float32).view(-1, 1, 1).to(self.dev)
        self.offset = (mean / std).to(torch.float32).view(-1, 1, 1).to(self.dev)
        again = frontier(layout, done) if done else set()
        self.done = done
        self.order = [ij for ij in layout.iter_blocks() if ij not in done or ij in again]
        self.runset = set(self.order)
        self.next = 0
        self.strips: dict[tuple[int, int, int], Any] = {}
        self.active: deque[_Block] = deque()
        self.queue: deque[tuple[_Block, int, int]] = deque()
        self.reads: deque[Future[Any]] = deque()
        self.written: deque[Future[Any]] = deque()

    def loop(self, rpool: ThreadPoolExecutor, wpool: ThreadPoolExecutor, prefetch: int) -> None:
        def fill() -> None:
            while self.next < len(self.order) and len(self.reads) < prefetch:
                ij = self.order[self.next]
                self.reads.append(rpool.submit(_read, self.source, self.layout, ij, self.cuda))
                self.next += 1

        fill()
        if self.use_graph:  # captured while the first blocks are read
            with _timed(self.stats, "capture"):
                self.capture()
        while True:
            fill()
            if not (self.reads or self.queue or self.active):
                break
            while self.reads and len(self.queue) < self.batch:  # batches fill across blocks
                ij = self.order[self.next - len(self.reads)]
                with _timed(self.stats, "read_wait"):
                    read = self.reads.popleft().result()
                with _timed(self.stats, "load"):
                    self.load(ij, read)
                fill()
                self.finish_ready(wpool)  # blocks with nothing to run (nodata) do not pile up on the device
            if self.queue:
                with _timed(self.stats, "forward"):
                    self.run_batch()
            self.finish_ready(wpool)
        for f in self.written:
            f.result()

    def finish_ready(self, wpool: ThreadPoolExecutor) -> None:
        """Finish the blocks at the front whose tiles have all run (blocks finish in row-major order)."""
        while self.active and self.active[0].pending == 0:
            with _timed(self.stats, "finish"):
                out = self.finish(self.active.popleft())
            if out is None:
                continue
            with _timed(self.stats, "write_wait"):
                while len(self.written) >= self.max_written:  # bound the blocks waiting for the writer
                    self.written.popleft().result()
            self.written.append(wpool.submit(self.write, *out))

    def cancel(self) -> None:
        for f in (*self.reads, *self.written):
            f.cancel()

    def load(self, ij: tuple[int, int], read: tuple[Any, Any, np.ndarray]) -> None:
        """Move a read block to the device, normalise it and queue its tiles."""
        import torch

        data, valid, tile_mask = read
        self.stats.h2d_bytes += data.numel() * data.element_size() + valid.numel()
        x = data.to(self.dev, non_blocking=True).to(torch.float32)
        v = valid.to(self.dev, non_blocking=True)
        x = x * self.scale - self.offset  # out of place: on CPU a float32 read would be changed in place
        x.masked_fill_(~v, 0.0)
        rows, cols = self.layout.block_extent(*ij)
        t = self.layout.tile
        origins = [(r - rows.start, q - cols.start) for r, q in self.layout.block_tiles(*ij)]
        todo = [(r, q) for r, q in origins if tile_mask[r : r + t, q : q + t].any()]
        acc = torch.zeros((self.k + 1, *x.shape[1:]), dtype=torch.float32, device=self.dev)
        blk = _Block(ij, rows, cols, x, v, acc, todo, len(origins) - len(todo), len(todo))
        self.active.append(blk)
        self.queue.extend((blk, r, q) for r, q in todo)

    def weighted(self, xb: Any) -> Any:
        """(B, K + 1, T, T): the window-weighted logits, then the window (one add per tile accumulates both)."""
        import torch

        lg = self.backend.forward_tensor(xb)
        return torch.cat([lg * self.window, self.window.expand(lg.shape[0], 1, *self.window.shape)], dim=1)

    def capture(self) -> None:
        """Capture :meth:`weighted` at the fixed batch shape as a CUDA graph (eager if capture fails)."""
        import torch

        t = self.layout.tile
        self.static_in = torch.zeros((self.batch, self.backend.card.in_channels, t, t), device=self.dev)
        # On the run's device, with its stream current afterwards even if capture fails: torch's
        # graph context does not restore the stream when capture_end raises, and the events
        # that guard the host copies are recorded on self.stream.
        with torch.cuda.device(self.dev), torch.cuda.stream(self.stream):
            try:
                side = torch.cuda.Stream(self.dev)
                side.wait_stream(self.stream)
                with torch.cuda.stream(side):  # warm-up (cuDNN's choices, the allocator) off the capture
                    for _ in range(2):
                        self.weighted(self.static_in)
                self.stream.wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                capture = torch.cuda.Stream(self.dev)  # on self.dev, not on whichever device is current
                with torch.cuda.graph(graph, stream=capture, capture_error_mode="thread_local"):
                    self.static_out = self.weighted(self.static_in)  # readers pin memory meanwhile
                self.graph = graph
            except RuntimeError:  # an op that cannot be captured: run eagerly
                self.use_graph, self.static_out, self.graph = False, None, None
        self.stats.cuda_graph = self.graph is not None

    def run_batch(self) -> None:
        """One forward pass over the next ``batch`` queued tiles, whichever blocks they belong to."""
        import torch

        t = self.layout.tile
        batch = [self.queue.popleft() for _ in range(min(self.batch, len(self.queue)))]
        tiles = [b.x[:, r : r + t, q : q + t] for b, r, q in batch]
        pad = self.batch - len(batch) if self.cuda else 0  # one shape: cuDNN's plan (and the graph) reused
        if self.graph is not None:
            torch.stack(tiles, out=self.static_in[: len(batch)])
            if pad:
                self.static_in[len(batch) :].zero_()
            self.graph.replay()
            out = self.static_out
        else:
            xb = torch.stack(tiles)
            if pad:
                xb = torch.cat([xb, xb.new_zeros((pad, *xb.shape[1:]))])
            out = self.weighted(xb)
        self.stats.batches += 1
        self.stats.tiles += len(batch)
        self.stats.padded_tiles += pad
        for (b, r, q), o in zip(batch, out):
            b.acc[:, r : r + t, q : q + t] += o
            b.pending -= 1

    def finish(self, b: _Block) -> tuple[Any, ...] | None:
        """Add the neighbours' strips, keep this block's own, resolve it and start its copy to the host.

        Returns what :meth:`write` needs, or None for a block run again only for its strips.
        """
        import torch

        i, j = b.ij
        acc = b.acc
        for key in ((i - 1, j, 0), (i, j - 1, 1), (i - 1, j - 1, 2)):
            s = self.strips.pop(key, None)
            if s is not None:
                acc[:, : s.shape[1], : s.shape[2]] += s
        h, w = self.layout.grid.shape
        br, bc = self.layout.block_slices(i, j)
        bh, bw = br.stop - br.start, bc.stop - bc.start
        eh, ew = min(acc.shape[1], h - b.rows.start), min(acc.shape[2], w - b.cols.start)
        # strips only for blocks this run computes (on resume, finished blocks are skipped)
        for k, (rs, cs, keep) in enumerate(((slice(bh, eh), slice(0, bw), eh > bh),
                                            (slice(0, bh), slice(bw, ew), ew > bw),
                                            (slice(bh, eh), slice(bw, ew), eh > bh and ew > bw))):
            consumer = (i + (k != 1), j + (k != 0))
            if keep and consumer in self.runset:
                self.strips[i, j, k] = acc[:, rs, cs].clone()
        if b.ij in self.done:  # run again for its strips only
            return None
        classes, conf, unweighted = resolve_tensor(acc[:, :bh, :bw], b.valid[:bh, :bw],
                                                   confidence=self.opts.confidence)
        # not torch.bincount: on CUDA it reads the input's max back to the host, a sync per block
        if self.ones.numel() < classes.numel():
            self.ones = torch.ones(classes.numel(), dtype=torch.int64, device=self.dev)
        hist = torch.zeros(256, dtype=torch.int64, device=self.dev)
        hist.index_add_(0, classes.flatten().to(torch.int64), self.ones[: classes.numel()])
        host = [_to_host(a, self.cuda) for a in (classes, conf, hist, unweighted) if a is not None]
        self.stats.d2h_bytes += sum(a.numel() * a.element_size() for a in host)
        event = torch.cuda.Event(blocking=True) if self.cuda else None
        if event is not None:
            event.record(self.stream)
        return b.ij, host, len(b.tiles), b.skipped, event

    def write(self, ij: tuple[int, int], host: list[Any], run: int, skipped: int, event: Any) -> None:
        if event is not None:
            event.synchronize()
        with _timed(self.stats, "writers_busy", self.lock):
            if bool(host[-1].numpy()):
                raise RuntimeError("a valid pixel received no tile weight; the tiling is wrong")
            classes = host[0].numpy()
            conf = host[1].numpy() if self.opts.confidence else None
            self.sink(ij, BlockOut(classes, conf, fold_histogram(host[-2].numpy(), self.k), run, skipped))


def _to_host(a: Any, cuda: bool) -> Any:
    import torch

    if not cuda:
        return a.contiguous()
    out = torch.empty(a.shape, dtype=a.dtype, pin_memory=True)
    out.copy_(a, non_blocking=True)
    return out


def resolve_tensor(acc: Any, valid: Any, *, confidence: bool = False) -> tuple[Any, Any, Any]:
    """:func:`geoseg.engine.blend.resolve` on a torch accumulator (any device).

    Returns uint8 classes (``NODATA`` where not valid), with ``confidence``
    float32 max softmax (-1 where not valid, else None), and a 0-d bool
    tensor that is True when a valid pixel received no tile weight (checked
    by the caller on the host, so the device never waits for it). The
    argmax keeps the first maximum, as numpy's does.
    """
    import torch

    k = acc.shape[0] - 1
    weight = acc[k]
    unweighted = ((weight <= 0) & valid).any()
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
    return classes, conf, unweighted
