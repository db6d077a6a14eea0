"""``geoseg batch``: many scenes in one job on a dask.distributed cluster (see ``docs/cluster.md``).

Each scene is one task that runs :func:`geoseg.workflow.predict.predict`
into ``<root>/<scene id>/`` on a worker, with the worker's one loaded copy
of the model (:func:`~geoseg.models.loading.cached_model`); a scene larger
than ``Cluster.large_scene`` pixels runs from the client, its blocks spread
over the workers. Every path is made absolute in the client before anything
is sent. ``<root>/batch.json`` records each scene as it finishes; a second
run skips complete scenes, continues interrupted ones from their finished
blocks and runs failed ones again. The job outputs are written at the end
(see :mod:`.stac`).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..errors import ConfigError, DeviceError
from ..io.staging import check_output_dir
from ..io.vector import vector_format
from ..models.backends import OnnxBackend, available_cores, resolve_device
from ..models.loading import ModelSpec, load_model
from ..models.onnx_runtime import wants_onnx
from .plan import check_scheduler, probe_scheduler, split_options
from .scene_task import note_attempt, one_line_error, permanent, predict_resuming, result_path, run_scene
from .sources import Scene, absolute, expand_sources, model_file, scene_pixels
from .stac import Finished, Manifest, now, verified, write_job_outputs

MANIFEST = "batch.json"
#: per-scene attempt logs (one line per attempt: time, worker, process id)
LOGS = ".geoseg-batch"
#: scenes above this many pixels run from the client with their blocks spread over the workers
LARGE_SCENE = 16384 * 16384
#: predict options the batch job sets itself
_OWN = ("scheduler", "num_workers", "resume", "progress", "output", "outputs", "compute", "tiling")

Progress = Callable[[int, int, int, int], None]  # (scenes done, scenes, pixels done, pixels)


@dataclass(frozen=True)
class Cluster:
    """Where and how the scenes run.

    ``scheduler`` is a dask scheduler address (default: a local cluster of
    ``workers`` processes with ``threads_per_worker`` threads each);
    ``retries`` how often a failed scene is tried again; ``timeout`` the
    seconds without any worker after which the job stops.
    """

    scheduler: str | None = None
    workers: int | None = None
    threads_per_worker: int = 1
    retries: int = 2
    large_scene: int = LARGE_SCENE
    timeout: float = 120.0

    def __post_init__(self) -> None:
        check_scheduler(self.scheduler, without="a local cluster of worker processes")
        for name, flag, low in (("workers", "--workers", 1), ("threads_per_worker", "--threads-per-worker", 1),
                                ("retries", "--retries", 0), ("large_scene", "--large-scene", 1)):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < low):
                raise ConfigError(f"{flag} must be a whole number >= {low}, got {v!r}")
        if not self.timeout > 0:
            raise ConfigError(f"--timeout must be a number of seconds > 0, got {self.timeout!r}")


@dataclass
class BatchResult:
    """The manifest's scenes, the job outputs and how the job ended."""

    root: Path
    scenes: list[dict[str, Any]]
    outputs: dict[str, Path]
    dashboard: str | None = None
    stopped: str | None = None
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [s for s in self.scenes if s["status"] != "done"]

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None

    def summary(self) -> str:
        """One line: how many scenes were done, reused, failed or left unfinished, and the first failure."""
        done = [s for s in self.scenes if s["status"] == "done"]
        reused = sum(1 for s in done if s.get("reused"))
        unfinished = [s for s in self.failed if str(s.get("error") or "").startswith("not finished")]
        failed = [s for s in self.failed if s not in unfinished]
        line = f"{len(done)} of {len(self.scenes)} scenes done ({reused} already complete)"
        if failed:
            line += f", {len(failed)} failed: {failed[0]['id']} ({failed[0].get('error') or 'failed'})"
            line += f" and {len(failed) - 1} more" if len(failed) > 1 else ""
        if self.stopped:
            line += f", {len(unfinished)} not finished: {self.stopped}"
        return f"{line}; see {self.root / MANIFEST}"


# --- in the client ----------------------------------------------------------------------------------------------


def _local_cluster(workers: int | None, threads: int, device: str) -> Any:
    """A cluster of nanny-managed worker processes on this machine (one GPU each with ``cuda``)."""
    from distributed import Nanny, Scheduler, SpecCluster
    from distributed.system import MEMORY_LIMIT

    gpus: list[str] = []
    if device.startswith("cuda"):
        import torch

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    n = workers or (len(gpus) if gpus else max(1, available_cores() // threads))
    spec = {f"worker-{i}": {"cls": Nanny, "options": {
        "nthreads": threads, "memory_limit": MEMORY_LIMIT // n, "host": "127.0.0.1", "silence_logs": logging.WARN,
        "resources": {"GPU": 1} if gpus else None,
        "env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {}}} for i in range(n)}
    return SpecCluster(workers=spec, silence_logs=logging.WARN,
                       scheduler={"cls": Scheduler, "options": {"host": "127.0.0.1", "dashboard_address": ":0"}})


def connect(cluster: Cluster, device: str) -> tuple[Any, Any, str | None]:
    """(client, local cluster to close or None, dashboard link); a bad scheduler is a one-line ConfigError."""
    from distributed import Client

    local = None
    if cluster.scheduler:
        try:
            client = Client(cluster.scheduler, timeout=f"{min(cluster.timeout, 20.0)}s")
        except (OSError, TimeoutError, ValueError) as e:
            raise ConfigError(f"cannot reach dask scheduler {cluster.scheduler}: {str(e).splitlines()[0]}; "
                              "is it running?") from None
    else:
        local = _local_cluster(cluster.workers, cluster.threads_per_worker, device)
        client = Client(local)
    try:
        return client, local, client.dashboard_link or None
    except Exception:  # a scheduler without a dashboard service
        return client, local, None


def _worker_count(client: Any, gpu: bool = False) -> int:
    """Workers that can run a scene (with ``gpu``: those that offer a ``GPU`` resource)."""
    if client.status != "running":
        return 0
    try:
        if not gpu:
            return len(client.nthreads())
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # distributed before 2025: every worker is listed
            workers = client.scheduler_info()["workers"]
        return sum(1 for w in workers.values() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    except Exception:  # the scheduler is gone or restarting: no worker either
        return 0


def _here(device: str) -> bool:
    """Whether ``device`` exists in this process."""
    try:
        return bool(resolve_device(device))
    except DeviceError:
        return False


def _host_threads(client: Any) -> dict[str, int]:
    hosts = [(urlparse(addr).hostname or "", int(n)) for addr, n in client.nthreads().items()]
    return {host: sum(n for h, n in hosts if h == host) for host, _ in hosts}


def _outcome(what: Any, log: Path) -> tuple[dict[str, Any] | None, BaseException | None]:
    """(result, error) of a finished scene: a dask future, or ("ok" | "error", value) from the client.

    A task's result is read from the file it wrote, not gathered from its
    worker, which may be gone by now (gathering would then wait for a rerun).
    """
    if isinstance(what, tuple):
        return (what[1], None) if what[0] == "ok" else (None, what[1])
    if what.status == "finished":
        try:
            return json.loads(result_path(log).read_text()), None
        except (OSError, ValueError):
            return what.result(timeout=60), None
    if what.status == "cancelled":
        return None, RuntimeError("cancelled")
    try:
        return None, what.exception(timeout=60)
    except TimeoutError:
        return None, RuntimeError(f"the scheduler lost the task ({what.status})")


@dataclass
class _State:
    done_px: int = 0
    partial: dict[str, int] = field(default_factory=dict)  # pixels done of large scenes in progress
    lost_since: float | None = None
    seen_worker: bool = False
    stopping: bool = False


class Job:
    """One batch job: its scenes, model and options, all resolved and checked in the client."""

    def __init__(self, sources: Sequence[str | Path], root: str | Path, *, model: str | Path,
                 card: str | Path | None = None, asset: str | None = None, cluster: Cluster | None = None,
                 **options: Any):
        self.cluster = cluster or Cluster()
        if bad := sorted(set(options) & set(_OWN)):
            raise ConfigError(f"option {bad[0]!r} is set by the batch job itself; leave it out")
        if options.get("zones") is not None:
            options["zones"] = absolute(options["zones"])
        _, compute, outputs = split_options({k: v for k, v in options.items() if k != "bands"})
        self.root = Path(root).resolve()
        check_output_dir(self.root)
        self.scenes = expand_sources(sources, asset=asset)
        self.model, self.card_path = str(absolute(model)), absolute(card)
        if not self.cluster.scheduler:
            resolve_device(compute.device)  # a missing GPU is refused before a local cluster starts
        # refuses a bad model before any work (and makes the CPU runtime's ONNX export once, for every worker)
        runtime = compute.runtime if wants_onnx(compute.runtime, compute.device, compute.precision) else "torch"
        net = load_model(self.model, card=self.card_path, device="cpu", runtime=runtime)
        self.card = net.card
        path, fmt = model_file(self.model)
        fmt = "onnx" if isinstance(net, OnnxBackend) and not hasattr(net, "checkpoint") else fmt
        self.model_info = {"href": str(path) if path else None, "format": fmt,
                           "media_type": f"application/octet-stream; application={fmt}"}
        self.device = compute.device
        self.spec = ModelSpec(self.model, self.card_path, compute.device, compute.streams, compute.precision,
                              compute.runtime)
        self.options = options
        self.task_options = {k: v for k, v in options.items() if k not in ("device", "streams", "precision",
                                                                          "runtime", "overwrite")}
        self.names = [n for n in outputs.names() if n != "classes.tif.aux.xml"]
        self.vector_suffix = vector_format(outputs.vector_format)[1] if outputs.polygons else None
        self.logs = self.root / LOGS
        self.sizes: dict[str, int | None] = {}
        self.state = _State()

    def run(self, progress: Progress | None = None,
            on_connect: Callable[[str | None], None] | None = None) -> BatchResult:
        """Run every scene that is not complete yet, then write the job outputs."""
        t0 = time.perf_counter()
        if self.cluster.scheduler:
            probe_scheduler(self.cluster.scheduler)  # before the job folder or its manifest is written
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        old = Manifest.previous(self.root / MANIFEST)
        entries, todo = self._triage(old)
        self.manifest = Manifest(self.root / MANIFEST, self._header(), entries)
        self.manifest.write(force=True)
        stopped = dash = None
        if todo:
            client, local, dash = connect(self.cluster, self.device)
            try:
                if on_connect is not None:
                    on_connect(dash)
                stopped = self._execute(client, todo, {s.id for s in todo if s.id in old}, progress)
            finally:
                self.manifest.write(force=True)
                self.state.stopping = True
                client.close(timeout=10)
                if local is not None:
                    local.close(timeout=10)
        self.manifest.header["finished"] = now()
        outputs = self._job_outputs()
        self.manifest.header["outputs"] = sorted(outputs)
        self.manifest.write(force=True)
        return BatchResult(self.root, list(entries.values()), outputs, dash, stopped, time.perf_counter() - t0)

    def _header(self) -> dict[str, Any]:
        c = self.cluster
        return {"geoseg_batch": 1, "root": str(self.root), "model": self.model, "card": self.card_path,
                "options": self.options, "cluster": {"scheduler": c.scheduler, "workers": c.workers,
                                                     "threads_per_worker": c.threads_per_worker,
                                                     "retries": c.retries, "large_scene": c.large_scene},
                "started": now(), "finished": None}

    def _entry(self, sc: Scene) -> dict[str, Any]:
        return {**sc.to_dict(), "status": "running", "attempts": 0, "workers": [], "pixels": None,
                "timings": {}, "outputs": [], "error": None, "reused": False, "resumed": False, "large": False}

    def _triage(self, old: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], list[Scene]]:
        """Manifest entries of every scene, and the scenes to run (those not complete and verified)."""
        from .plan import ALL_OUTPUTS

        entries: dict[str, dict[str, Any]] = {}
        todo: list[Scene] = []
        for sc in self.scenes:
            prev = old.get(sc.id) or {}
            out = self.root / sc.id
            names = sorted(set(self.names) | set(prev.get("outputs") or []))
            if verified(out, sc.href, self.model, names):
                e = {**self._entry(sc), **prev} if prev.get("status") == "done" else self._entry(sc)
                e.update(status="done", reused=True, error=None,
                         outputs=e.get("outputs") or [n for n in ALL_OUTPUTS if (out / n).exists()])
                entries[sc.id] = e
            else:
                entries[sc.id] = self._entry(sc)
                todo.append(sc)
        return entries, todo

    def _execute(self, client: Any, todo: list[Scene], rerun: set[str], progress: Progress | None) -> str | None:
        with ThreadPoolExecutor(8) as pool:
            self.sizes.update(zip([s.id for s in todo], pool.map(scene_pixels, [s.href for s in todo])))
        # a large scene's plan loads the model here too: without the GPU asked for, it runs as one task
        big = self.cluster.large_scene if _here(self.device) else float("inf")
        large = [s for s in todo if (self.sizes.get(s.id) or 0) > big]
        small = [s for s in todo if s not in large]
        for s in large:
            self.manifest.entries[s.id]["large"] = True
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        futures = self._submit(client, small, rerun, events)
        if large:
            threading.Thread(target=self._run_large, args=(client, large, rerun, events), daemon=True,
                             name="geoseg-large-scenes").start()
        return self._collect(client, {s.id for s in todo}, events, futures, progress)

    def _log(self, sid: str) -> Path:
        log = self.logs / f"{sid}.attempts"
        log.unlink(missing_ok=True)
        result_path(log).unlink(missing_ok=True)
        return log

    def _attempts(self, sid: str) -> tuple[int, list[str]]:
        try:
            lines = [ln.split("\t") for ln in (self.logs / f"{sid}.attempts").read_text().splitlines() if ln]
        except OSError:
            return 0, []
        return len(lines), list(dict.fromkeys(ln[1] for ln in lines if len(ln) > 1))

    def _submit(self, client: Any, scenes: list[Scene], rerun: set[str],
                events: queue.Queue[tuple[str, Any]]) -> dict[str, Any]:
        from uuid import uuid4

        host_threads = _host_threads(client)
        resources = {"GPU": 1} if self.device.startswith("cuda") else None
        overwrite = bool(self.options.get("overwrite"))
        futures = {}
        for sc in scenes:
            self.manifest.entries[sc.id]["timings"] = {"submitted": now()}
            fut = client.submit(run_scene, sc.to_dict(), str(self.root / sc.id), self.spec, self.task_options,
                                overwrite or sc.id in rerun, str(self._log(sc.id)), host_threads, self.names,
                                key=f"geoseg-scene-{sc.id}-{uuid4().hex[:8]}", retries=self.cluster.retries,
                                resources=resources, pure=False)
            fut.add_done_callback(lambda f, sid=sc.id: events.put((sid, f)))
            futures[sc.id] = fut
        return futures

    def _run_large(self, client: Any, scenes: list[Scene], rerun: set[str],
                   events: queue.Queue[tuple[str, Any]]) -> None:
        """Large scenes, one after another from this process, their blocks spread over the workers."""
        for sc in scenes:
            log = self._log(sc.id)
            for attempt in range(self.cluster.retries + 1):
                if self.state.stopping:
                    return
                try:
                    res = self._predict_large(client, sc, log, bool(self.options.get("overwrite")) or sc.id in rerun)
                except Exception as e:
                    if attempt == self.cluster.retries or self.state.stopping or permanent(e, sc.href):
                        events.put((sc.id, ("error", e)))
                        break
                else:
                    events.put((sc.id, ("ok", res)))
                    break
                finally:
                    self.state.partial.pop(sc.id, None)

    def _predict_large(self, client: Any, sc: Scene, log: Path, overwrite: bool) -> dict[str, Any]:
        import contextlib

        import dask

        started, worker = now(), note_attempt(str(log))
        total = self.sizes.get(sc.id) or 0

        def blocks_done(done: int, n: int) -> None:
            self.state.partial[sc.id] = total * done // max(n, 1)

        gpu = dask.annotate(resources={"GPU": 1}) if self.device.startswith("cuda") else contextlib.nullcontext()
        t0 = time.perf_counter()
        with gpu:
            res, resumed = predict_resuming(sc.href, self.root / sc.id, model=self.model, card=self.card_path,
                                            scheduler=client, progress=blocks_done,
                                            **{**self.options, "overwrite": overwrite})
        return {"outputs": sorted(res.files), "pixels": res.pixels, "started": started, "finished": now(),
                "worker": worker, "resumed": resumed, "timings": {"seconds": time.perf_counter() - t0, **res.timings}}

    def _collect(self, client: Any, remaining: set[str], events: queue.Queue[tuple[str, Any]],
                 futures: dict[str, Any], progress: Progress | None) -> str | None:
        """Record scenes as they finish; stop when no worker is left for ``timeout`` seconds."""
        self._report(progress)
        self._watch(client)  # whether workers are there from the start
        watched = time.monotonic()
        while remaining:
            try:
                sid, what = events.get(timeout=1.0)
            except queue.Empty:
                self.manifest.flush()
            else:
                self._finish(sid, what)
                fut = futures.pop(sid, None)
                if fut is not None:
                    fut.release()
                remaining.discard(sid)
            self._report(progress)
            if time.monotonic() - watched >= 1.0:
                watched = time.monotonic()
                stop = self._watch(client)
                if stop is not None:
                    self._stop(remaining, stop)
                    return stop
        return None

    def _stop(self, remaining: set[str], why: str) -> None:
        """Scenes left when the job stops: done if their outputs are complete after all, else not finished."""
        self.state.stopping = True
        for sid in remaining:
            n, workers = self._attempts(sid)
            e = self.manifest.entries[sid]
            if verified(self.root / sid, e["href"], self.model, self.names):
                e.update(status="done", attempts=n, workers=workers, outputs=sorted(
                    p.name for p in (self.root / sid).iterdir()), timings={**e["timings"], "finished": now()})
            else:
                e.update(status="failed", attempts=n, workers=workers, error=f"not finished: {why}")

    def _watch(self, client: Any) -> str | None:
        gpu = self.device.startswith("cuda")
        if _worker_count(client, gpu):
            self.state.seen_worker, self.state.lost_since = True, None
            return None
        now = time.monotonic()
        self.state.lost_since = self.state.lost_since or now
        if now - self.state.lost_since < self.cluster.timeout:
            return None
        where = self.cluster.scheduler or "the local cluster"
        kind = "dask workers with a GPU resource" if gpu else "dask workers"
        if not self.state.seen_worker:
            fix = "; start them with: dask worker ADDRESS --resources GPU=1" if gpu else ""
            return f"no {kind[:-1]} joined {where} within {self.cluster.timeout:g} s{fix}; the job stopped"
        return f"all {kind} of {where} were lost and none came back within {self.cluster.timeout:g} s; the job stopped"

    def _finish(self, sid: str, what: Any) -> None:
        e = self.manifest.entries[sid]
        res, err = _outcome(what, self.logs / f"{sid}.attempts")
        e["attempts"], e["workers"] = self._attempts(sid)
        refused = res is not None and "error" in res  # a scene that geoseg refused, with its one-line reason
        if res is not None and not refused:
            timings = {**e.get("timings", {}), "started": res["started"], "finished": res["finished"],
                       **res["timings"]}
            e.update(status="done", outputs=res["outputs"], pixels=res["pixels"], error=None,
                     resumed=res["resumed"], timings=timings)
        else:
            why = res["error"] if res is not None else one_line_error(err) if err is not None else "failed"
            when = {"started": res["started"], "finished": res["finished"]} if res is not None else {"finished": now()}
            e.update(status="failed", error=why, timings={**e.get("timings", {}), **when})
        self.state.done_px += self.sizes.get(sid) or e.get("pixels") or 0
        self.manifest.write()

    def _report(self, progress: Progress | None) -> None:
        if progress is None:
            return
        entries = self.manifest.entries.values()
        finished = sum(1 for e in entries if e["status"] != "running")
        reused_px = sum(e.get("pixels") or 0 for e in entries if e.get("reused"))
        total_px = reused_px + sum(v or 0 for v in self.sizes.values())
        done_px = reused_px + self.state.done_px + sum(self.state.partial.values())
        progress(finished, len(self.manifest.entries), done_px, total_px)

    def _job_outputs(self) -> dict[str, Path]:
        done = [Finished(e["id"], self.root / e["id"], e["source"], e["href"], e.get("datetime"),
                         (e.get("timings") or {}).get("finished"))
                for e in self.manifest.entries.values() if e["status"] == "done"]
        if not done:
            return {}
        return write_job_outputs(self.root, done, self.card, model=self.model_info, vector_suffix=self.vector_suffix)


def run_batch(sources: Sequence[str | Path], root: str | Path, *, model: str | Path, card: str | Path | None = None,
              asset: str | None = None, cluster: Cluster | None = None, progress: Progress | None = None,
              on_connect: Callable[[str | None], None] | None = None, **options: Any) -> BatchResult:
    """Segment every scene of ``sources`` into ``root/<scene id>/`` on a dask cluster; see the module doc.

    ``options`` are :func:`~geoseg.workflow.predict.predict`'s (``device``,
    ``polygons``, ``confidence``, ``min_area`` …). Failed scenes do not stop
    the job: check :attr:`BatchResult.ok`.
    """
    return Job(sources, root, model=model, card=card, asset=asset, cluster=cluster, **options).run(progress,
                                                                                                    on_connect)
