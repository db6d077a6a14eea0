"""One error tree for geoseg.

Every error a user can cause derives from :class:`GeosegError` and from the
builtin it resembles, so ``except ValueError`` keeps working for library
users while the CLI prints any ``GeosegError`` as one line with a non-zero
exit. Messages say what was received, what was expected and how to fix it.
"""

from __future__ import annotations


class GeosegError(Exception):
    """Root of every error geoseg raises on purpose."""


class InputNotFoundError(GeosegError, FileNotFoundError):
    """An input path does not exist."""


class NotARasterError(GeosegError, ValueError):
    """A path exists but GDAL cannot open it as a raster."""


class BandCountError(GeosegError, ValueError):
    """The raster's band count does not match the model's input channels."""


class OutputExistsError(GeosegError, FileExistsError):
    """An output would be overwritten without ``--overwrite``."""


class ModelCardError(GeosegError, ValueError):
    """A model card is missing, unreadable or inconsistent."""


class ModelNotFoundError(GeosegError, LookupError):
    """No model by that name or path."""


class ConfigError(GeosegError, ValueError):
    """An option or recipe value is invalid."""


class DeviceError(GeosegError, RuntimeError):
    """The requested compute device is not available."""


class PartialRunError(GeosegError, FileExistsError):
    """An earlier run into the same output was interrupted; resume it or start over."""

    def __init__(self, message: str, *, done: int = 0, total: int = 0):
        super().__init__(message)
        self.done, self.total = done, total
