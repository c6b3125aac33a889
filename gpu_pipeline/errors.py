"""The one exception root of the project and its few specific subclasses.

Every message says what was wrong and what to do about it.  Bad *records* never
raise: they become dead letters.  These exceptions are for bad options, broken
environments and failing services.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error gpu-pipeline raises on purpose."""


class ConfigError(PipelineError):
    """A bad option value; the message names the option."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"option {option!r}: {message}")


class EngineUnavailableError(PipelineError):
    """The requested engine (GPU, the CPU kernel build) cannot run here."""


class KernelError(PipelineError):
    """A kernel failed to build, to load, or reported an error (for example a full table)."""


class SourceError(PipelineError):
    """A source cannot be read (missing file, unreachable broker)."""


class SinkError(PipelineError):
    """A sink rejected a write or cannot be reached."""


class CheckpointError(PipelineError):
    """A checkpoint directory is unreadable, corrupt or belongs to another job."""


class JobConflictError(PipelineError):
    """A run would mix its output with another job's, or write rows a second time."""
