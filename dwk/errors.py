"""dwk's own error types (a leaf module: it imports nothing from dwk).

Only these become user errors in the CLI (a message, no traceback unless ``-v``); anything else is a
bug or an environment failure and keeps its traceback.
"""
from __future__ import annotations


class DwkError(Exception):
    """Base of every error dwk raises on purpose, with a message that says what to do.

    ``exit_code`` is the CLI's exit status for it: 2 (a user error) unless a subclass says otherwise.
    """

    exit_code = 2


class ConfigError(DwkError, ValueError):
    """A run config that cannot be used as written."""


class MissingInputError(DwkError, FileNotFoundError):
    """A file or folder the user named does not exist (a config file, a store, a run folder)."""


class CheckpointError(DwkError, RuntimeError):
    """A checkpoint cannot be loaded for a reason retrying will not fix (bad input, not a transient fault).

    The flows record it with the checkpoint's id and go on with the other checkpoints.
    """

    def __init__(self, ckpt_id: str, reason: str):
        super().__init__(f"checkpoint {ckpt_id!r}: {reason}")
        self.ckpt_id = ckpt_id
        self.reason = reason

    def __reduce__(self):  # picklable across Dask workers and Prefect result storage
        return type(self), (self.ckpt_id, self.reason)


class TransientError(CheckpointError):
    """A checkpoint failed for a reason retrying may fix: the network, an overloaded server.

    The one retry layer (``dwk.retry``: Prefect's task retries, or ``dwk.retry.call`` without
    Prefect) retries it; every other ``CheckpointError`` is final.
    """


class NoDepthwiseError(DwkError, ValueError):
    """The model or file holds no depthwise convolution: nothing to analyse."""


class StoreError(DwkError, RuntimeError):
    """The kernel store is damaged or was written by an incompatible dwk (names what and where)."""


class StoreSchemaError(StoreError, ValueError):
    """A store written with another schema version (a ``ValueError`` too, as before it had a class)."""


class StoreDamageError(StoreError):
    """Stored data differs from what was written: a missing array, a missing, truncated or altered chunk.

    ``array`` and ``chunk`` (index along the kernel axis) are None when the damage is not about one.
    """

    def __init__(self, ckpt_id: str, array: str | None, chunk: int | None, problem: str, hint: str = ""):
        where = f"checkpoint {ckpt_id!r}" + (f", array {array}" if array else "") + (
            f", chunk {chunk}" if chunk is not None else "")
        super().__init__(f"{where}: {problem}" + (f". {hint}" if hint else ""))
        self.ckpt_id, self.array, self.chunk, self.problem, self.hint = ckpt_id, array, chunk, problem, hint

    def __reduce__(self):  # picklable across Dask workers
        return type(self), (self.ckpt_id, self.array, self.chunk, self.problem, self.hint)


class CheckpointsFailedError(DwkError, RuntimeError):
    """No checkpoint of a run could be extracted (or analysed): nothing to go on with.

    Its exit status is 1, as for a partial failure: the checkpoints failed, not the command line.
    """

    exit_code = 1

    def __init__(self, failed: list[dict], stage: str = "extracted"):
        self.failed = failed
        self.stage = stage
        lines = "; ".join(f"{f['id']}: {f['error']}" for f in failed)
        super().__init__(f"no checkpoint could be {stage} ({len(failed)} failed): {lines}")

    def __reduce__(self):
        return type(self), (self.failed, self.stage)


class TrackingError(DwkError, RuntimeError):
    """The MLflow tracking store cannot be used (unreachable server, unwritable database folder)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or SIGINT) asked dwk to stop: raised in the main thread by the CLI's signal handler.

    A ``KeyboardInterrupt``, so no ``except Exception`` (dwk's, Prefect's, a library's) swallows it or
    retries; ``signum`` gives the CLI its exit status, 128 + signum.
    """

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum

    def __reduce__(self):
        return type(self), (self.signum,)
