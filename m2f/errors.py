"""User-facing errors.

Everything that is the user's input being wrong (a missing file, a checkpoint of another model, an image size
that is not a multiple of 32, ...) raises :class:`M2FError` with a message that names the problem and the fix.
The CLI prints such errors as one line (``m2f: error: ...``) and exits with status 2, without a traceback.
"""
from __future__ import annotations


class M2FError(Exception):
    """An error caused by the user's input; its message is a complete, one-line explanation."""


class CheckpointError(M2FError):
    """A checkpoint cannot be read, or does not fit the model it is loaded into."""


class InputError(M2FError):
    """An input file or tensor is missing, unreadable or of the wrong shape."""


class BackendUnavailableError(M2FError):
    """The requested kernel backend cannot run here (no GPU, no Triton, no TensorRT, ...)."""


class ConfigError(M2FError):
    """A model configuration (``m2f_config.json``, an HF ``config.json``, a preset override) is invalid."""


class OutputError(M2FError):
    """An output cannot be written where asked: disk full, read-only file system, no permission, a file in the
    way of a directory, ..."""
