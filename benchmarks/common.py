"""Helpers for the benchmarks: real-imagery mosaics, peak RSS of a child process, tables."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from xml.sax.saxutils import escape

import rasterio

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "benchmarks" / "out"


def need(path: Path) -> Path:
    if not path.exists():
        sys.exit(f"{path} is missing: the benchmarks need the shared data folder beside the repo")
    return path


def mosaic_vrt(src: Path, dst: Path, size: int, bands: list[int]) -> Path:
    """A size x size VRT tiling ``src`` (real imagery) edge to edge, georeferenced in its CRS.

    Nothing is copied: GDAL reads the source through the VRT, so a 32k x 32k
    scene costs a few MB of XML and reads real pixels everywhere.
    """
    with rasterio.open(src) as ds:
        h, w, crs, t = ds.height, ds.width, ds.crs, ds.transform
        dtype = ds.dtypes[0]
        ci = [ds.colorinterp[b - 1].name.capitalize() for b in bands]
    gdal_type = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "float32": "Float32"}[dtype]
    parts = [f'<VRTDataset rasterXSize="{size}" rasterYSize="{size}">',
             f"  <SRS>{escape(crs.to_wkt())}</SRS>",
             f"  <GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>"]
    for k, b in enumerate(bands, 1):
        parts.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{k}"><ColorInterp>{ci[k - 1]}</ColorInterp>')
        for r0 in range(0, size, h):
            for c0 in range(0, size, w):
                sh, sw = min(h, size - r0), min(w, size - c0)
                parts.append(
                    f"    <SimpleSource><SourceFilename relativeToVRT=\"0\">{src}</SourceFilename>"
                    f"<SourceBand>{b}</SourceBand><SrcRect xOff=\"0\" yOff=\"0\" xSize=\"{sw}\" ySize=\"{sh}\"/>"
                    f"<DstRect xOff=\"{c0}\" yOff=\"{r0}\" xSize=\"{sw}\" ySize=\"{sh}\"/></SimpleSource>"
                )
        parts.append("  </VRTRasterBand>")
    parts.append("</VRTDataset>")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("\n".join(parts))
    return dst


def run_measured(cmd: list[str], *, sample: bool = True) -> tuple[float, float]:
    """Run a command; return (wall seconds, its peak RSS in MiB).

    The peak is the larger of the biggest single process's ``ru_maxrss``
    (exact) and the sampled sum of PSS over the command's process tree, so
    worker processes count too, and pages a forked worker shares with its
    parent count once rather than twice. Sampling PSS makes the kernel walk
    every mapping of every process (about 35 ms for a 1 GB process), which
    on a 2-core machine takes a large share of a core: runs that are timed
    pass ``sample=False`` and report ``ru_maxrss`` alone.
    """
    import psutil

    t = time.perf_counter()
    # A fresh interpreter per measurement so ru_maxrss is this command's own peak.
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r.returncode)")
    p = subprocess.Popen([sys.executable, "-c", wrapper, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    tree_peak = 0
    parent = psutil.Process(p.pid)
    while sample and p.poll() is None:
        try:
            tree_peak = max(tree_peak, sum(c.memory_full_info().pss for c in parent.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.02)
    _, err = p.communicate()
    wall = time.perf_counter() - t
    if p.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{err[-2000:]}")
    kb = int(err.strip().splitlines()[-1].split()[-1])
    return wall, max(kb * 1024, tree_peak) / 2**20


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__}, GDAL {rasterio.__gdal_version__}")


def table(rows: list[dict[str, object]]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return "\n".join(lines)
