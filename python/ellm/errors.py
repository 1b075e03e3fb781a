"""ellm's exceptions. Bad arguments raise the standard ValueError/TypeError/FileNotFoundError."""


class EllmError(Exception):
    """Base class of ellm's own exceptions."""


class BackendUnavailableError(EllmError, RuntimeError):
    """The Rust backend was asked for but `ellm._lowlevel` could not be imported."""


class ModelFormatError(EllmError, ValueError):
    """A model file or folder that is truncated, corrupt or of an unsupported kind."""


class BackendWarning(UserWarning):
    """Emitted once when ellm falls back from Rust to NumPy."""


class ModelBusyError(EllmError, RuntimeError):
    """A model asked to run while the same thread is already running it: a second generation
    interleaved with an unfinished one, or a call from inside one of its own hooks."""


class StageFailedError(EllmError, RuntimeError):
    """A pipeline stage of a model split over machines died or stopped answering; the model cannot
    run again (its other stages' KV caches no longer match)."""
