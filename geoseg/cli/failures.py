"""Known failures of the libraries underneath, as one line: what was wrong; how to fix it.

:func:`explain` turns an exception raised while a command ran into the text
after ``Error:`` — for geoseg's own errors their message, for GDAL
(rasterio), OGR (pyogrio), the operating system, dask.distributed and
memory exhaustion a sentence that names the cause and the fix — or returns
``None`` for an exception it does not know. See ``docs/errors.md``.

Nothing here imports the libraries it explains: exceptions are recognised
by their class names and modules, so explaining costs no import.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterator

#: How much of a library message is quoted.
MAX_DETAIL = 240


def one_line(text: str) -> str:
    """``text`` with its line breaks folded into spaces (an error is printed as one line)."""
    return re.sub(r"\s*\n\s*", " ", str(text).strip())


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__name__}" for c in type(exc).__mro__}


def _from(exc: BaseException, package: str) -> bool:
    return any(n.startswith(package + ".") for n in _names(exc))


def _detail(exc: BaseException) -> str:
    text = one_line(str(exc)) or type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 1] + "…"


def _geoseg(exc: BaseException) -> str | None:
    from ..errors import GeosegError

    return str(exc) if isinstance(exc, GeosegError) else None


def _memory(exc: BaseException) -> str | None:
    for e in chain(exc):
        names = {n.rsplit(".", 1)[1] for n in _names(e)}
        if isinstance(e, MemoryError) or names & {"CPLE_OutOfMemoryError", "OutOfMemoryError"}:
            where = " on the GPU" if "cuda" in str(e).lower() else ""
            return (f"out of memory{where}; lower --batch-size or --tile-size, use fewer --workers, "
                    "or run on a machine with more memory")
    return None


_DISK_FULL_TEXT = ("no space left on device", "free disk space", "disk quota exceeded")


def _disk_full(exc: BaseException) -> str | None:
    for e in chain(exc):
        text = str(e).lower()
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in _DISK_FULL_TEXT):
            name = getattr(e, "filename", None)
            where = f" while writing {name}" if name else ""
            return (f"the disk is full (no space left on device{where}); free some space or choose "
                    "another --output on a disk with room")
    return None


_DASK_FIX = ("check that the dask scheduler and its workers are running and reachable, "
             "or leave out --scheduler to run locally")


def _dask(exc: BaseException) -> str | None:
    names = {n.rsplit(".", 1)[1] for n in _names(exc)}
    distributed = _from(exc, "distributed")
    if distributed and "KilledWorker" in names:
        return ("every dask worker that ran a block died (most often out of memory); give the workers "
                "more memory, or lower --batch-size or --tile-size, and run again")
    if distributed and "CommClosedError" in names:
        return f"the connection to the dask cluster closed ({_detail(exc)}); {_DASK_FIX}"
    text = str(exc).lower()
    if (distributed and "CancelledError" in names) or "workers lost" in text or "connection-lost" in text:
        return f"the dask cluster lost its workers or scheduler ({_detail(exc)}); {_DASK_FIX}, then run again"
    if isinstance(exc, TimeoutError):
        return f"the dask cluster did not answer in time ({_detail(exc)}); {_DASK_FIX}"
    return None


_BLOCK = re.compile(r"^(?P<file>.+?), band \d+: ")
_READ_TEXT = ("read failed", "ireadblock", "tiffread", "tifffill", "read error", "decode", "corrupt",
              "truncated", "unexpected end")
_WRITE_TEXT = ("write failed", "writeblock", "cannot write", "attempt to create", "failed to write")


def _gdal(exc: BaseException) -> str | None:
    errors = [e for e in chain(exc) if _from(e, "rasterio")]
    if not errors:
        return None
    messages = [_detail(e) for e in errors]
    details = [m for m in messages if "see previous exception" not in m.lower()] or messages
    text = " ".join(messages).lower()
    if any(t in text for t in _WRITE_TEXT):
        return (f"GDAL could not write ({details[-1]}); check that the --output folder is writable "
                "and its disk has room")
    if "no such file or directory" in text:
        missing = next(m for m in details if "no such file" in m.lower())
        return (f"a file the raster refers to is missing ({missing}); restore it, or rebuild the VRT "
                "with gdalbuildvrt from files that exist")
    if any(t in text for t in _READ_TEXT):
        found = next((m for m in (_BLOCK.match(d) for d in details) if m), None)
        what = f"{found['file']} is truncated or damaged" if found else "the raster is truncated or damaged"
        return (f"{what}: GDAL could not read it ({details[-1]}); download or export it again "
                "(gdalinfo -checksum finds damaged files)")
    if "CRSError" in {n.rsplit(".", 1)[1] for n in _names(errors[0])}:
        return f"invalid CRS ({details[-1]}); assign a valid one with gdal_edit.py -a_srs EPSG:XXXX"
    return (f"GDAL failed: {details[0]}; check the file with gdalinfo (or run again with --debug "
            "for the traceback)")


def _ogr(exc: BaseException) -> str | None:
    if not _from(exc, "pyogrio"):
        return None
    name = type(exc).__name__
    detail = _detail(exc).split("; It might help")[0]
    if name == "DataSourceError":
        return (f"cannot open the vector file ({detail}); pass a GeoPackage, GeoJSON, "
                "shapefile or another file ogrinfo can open")
    if name == "FieldError":
        return f"a field of the vector file cannot be read ({detail}); check its fields with ogrinfo -so"
    return f"cannot read the vector data ({detail}); check the file with ogrinfo"


def _os(exc: BaseException) -> str | None:
    if not isinstance(exc, OSError):
        return None
    name = exc.filename or "a path"
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return (f"permission denied: {name}; choose a --output folder you can write to, or fix "
                "the permissions of the file")
    if code == errno.EROFS:
        return f"{name} is on a read-only file system; choose another --output"
    if code == errno.ENOTDIR:
        return f"part of the path {name} is a file, not a folder; choose another path or --output"
    if code == errno.EEXIST:
        return f"{name} exists and is a file, not a folder; choose another path or --output"
    if code == errno.EISDIR:
        return f"{name} is a folder where a file was expected; pass a file path"
    if code == errno.ENOENT:
        return f"{name} does not exist; check the path"
    if code in (errno.EMFILE, errno.ENFILE):
        return "too many open files; use fewer --workers or raise the limit (ulimit -n)"
    return f"system error: {_detail(exc)}; check the paths and the disk, or run again with --debug"


#: The rules, in order: the first that recognises an exception explains it.
RULES: tuple[Callable[[BaseException], str | None], ...] = (
    _geoseg, _memory, _disk_full, _dask, _gdal, _ogr, _os,
)


def explain(exc: BaseException) -> str | None:
    """One line ``what was wrong; how to fix it`` for a known failure, else ``None``."""
    for rule in RULES:
        msg = rule(exc)
        if msg:
            return one_line(msg)
    return None


def unexpected(exc: BaseException) -> str:
    """The line for an exception no rule knows (a bug, most likely)."""
    return (f"unexpected {type(exc).__name__}: {_detail(exc)}; run again with --debug (or GEOSEG_DEBUG=1) "
            "for the traceback, and report it")


def usage(exc: BaseException, command: str = "geoseg") -> str:
    """One line for a click usage error (bad option value, unknown option, missing argument)."""
    fmt = getattr(exc, "format_message", None)
    text = one_line(fmt() if callable(fmt) else str(exc)).rstrip(".")
    return f"{text}; see '{command} --help'"
