"""How post-processing tasks run: in this process, in worker processes that die with it, or on a cluster.

Polygonizing holds the GIL, so locally its blocks run in forked worker
processes; with a dask.distributed client they go to the cluster's workers
through ``client.get_executor()``, like the blocks of the prediction.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any


def _worker_init(parent: int | None = None) -> None:
    """In each polygonizing process: die with the parent, and leave Ctrl-C to it.

    Without this, a parent killed with SIGKILL leaves its workers running
    until they finish their task (minutes on large rasters), or waiting for
    one for ever, and Ctrl-C in a terminal, which reaches the whole process
    group, prints a traceback from every worker. A parent that died between
    the fork and this call sends no signal: then the worker sees another
    parent (``parent`` is the pid it was forked from) and leaves at once.
    """
    import os
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        except OSError:  # pragma: no cover - a libc without prctl
            pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def release_free_memory() -> None:
    """Hand the pages glibc keeps of freed memory back to the system (``malloc_trim``; elsewhere a no-op)."""
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # pragma: no cover - not glibc
            pass


class Runner:
    """Runs tasks in this process (one worker), in a pool of worker processes, or on an executor.

    Results are yielded as tasks finish, with at most two tasks per worker in
    flight, so the caller writes while the workers polygonize and memory stays
    bounded. An ``executor`` (e.g. a dask.distributed ``client.get_executor()``)
    is used as given and not shut down: on a cluster the tasks spread over its
    workers.
    """

    def __init__(self, num_workers: int, executor: Any = None):
        self.num_workers = num_workers
        self.pool: Any = executor
        self.owned = executor is None
        if executor is None and num_workers > 1:
            from ..io.preload import wait_preloaded

            wait_preloaded()  # no import lock held by another thread at the fork
            release_free_memory()  # the workers are forked: they should not start with the heap's freed pages
            import multiprocessing
            import os
            import sys
            from concurrent.futures import ProcessPoolExecutor

            # fork on Linux: the children only read and polygonize, and unlike spawn or
            # forkserver it does not re-run the caller's script (no __main__ guard needed)
            ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else None)
            # the parent's pid lets a forked worker see that its parent died before the death signal was set
            parent = os.getpid() if ctx.get_start_method() == "fork" else None
            self.pool = ProcessPoolExecutor(max_workers=num_workers, mp_context=ctx, initializer=_worker_init,
                                            initargs=(parent,))

    def map(self, func: Callable[..., Any], args: Sequence[tuple[Any, ...]]) -> Iterator[Any]:
        if self.pool is None:
            for a in args:
                yield func(*a)
            return
        import warnings
        from concurrent.futures import FIRST_COMPLETED, wait

        pending: set[Any] = set()
        todo = iter(args)
        with warnings.catch_warnings():  # Python >= 3.12 warns about fork beside threads
            warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
            while True:
                for a in itertools.islice(todo, 2 * self.num_workers - len(pending)):
                    pending.add(self.pool.submit(func, *a))
                if not pending:
                    return
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    yield f.result()

    def close(self) -> None:
        if self.pool is not None and self.owned:
            self.pool.shutdown(cancel_futures=True)
