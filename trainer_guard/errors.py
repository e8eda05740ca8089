"""The one error family every trainer_guard guard raises.

Catch :class:`TrainerGuardError` to handle any guard's complaint; the subclasses say which guard spoke.

Example:
    >>> from trainer_guard.errors import TrainerGuardError, ConfigError
    >>> issubclass(ConfigError, TrainerGuardError)
    True
"""

from __future__ import annotations

__all__ = [
    "TrainerGuardError",
    "ConfigError",
    "TiedWeightsError",
    "ChecksumError",
    "IntegrityError",
    "ResumeMismatchError",
    "EmbeddingLRError",
    "DtypeMismatchError",
    "UntrainedTokensError",
    "HeadMissingError",
    "LoadError",
    "UpdateAuditError",
    "ReplicaDivergenceError",
    "UsageError",
]


class TrainerGuardError(Exception):
    """Base class of every error trainer_guard raises on purpose."""


class ConfigError(TrainerGuardError, ValueError):
    """A guard option or a YAML config is invalid; the message lists every problem and the valid choices."""


class UsageError(TrainerGuardError):
    """Unusable input given to a function or the CLI (missing path, foreign file, ...)."""


class TiedWeightsError(TrainerGuardError):
    """Tied (shared-storage) parameters cannot be saved or restored safely."""


class ChecksumError(TrainerGuardError):
    """A checksum could not be computed (unsupported tensor, backend unavailable, unreadable file)."""


class IntegrityError(TrainerGuardError):
    """Saved or loaded tensors do not match their manifest."""


class ResumeMismatchError(TrainerGuardError):
    """The trainable set changed between a checkpoint and the run that continues it."""


class EmbeddingLRError(TrainerGuardError):
    """Embedding / output-head learning rates cannot be applied as asked."""


class DtypeMismatchError(TrainerGuardError):
    """Parameters carry a dtype different from the model's dominant floating dtype."""


class UntrainedTokensError(TrainerGuardError):
    """Training data uses embedding rows that were never trained."""


class HeadMissingError(TrainerGuardError):
    """A causal-LM checkpoint carries no output head and declares no tie."""


class LoadError(TrainerGuardError):
    """Weights cannot be loaded into a model (missing/unexpected keys, shape or dtype mismatch)."""


class UpdateAuditError(TrainerGuardError):
    """Trainable parameters that did not change, or frozen parameters that did."""


class ReplicaDivergenceError(TrainerGuardError):
    """Data-parallel replicas hold different weights."""


# ------------------------------------------------------------------------------------------ manifest errors
# Raised by :func:`trainer_guard.checkpoint.manifest.read_manifest` and importable from there too; kept out of
# ``__all__`` (and of ``trainer_guard.__all__``) as before: the public API catches them as :class:`UsageError`.


class MalformedManifestError(UsageError):
    """A manifest file that is unreadable as one (corrupted, hand-edited, not JSON): ``path``, and ``what`` is wrong.

    Not raised for a manifest of another format (:class:`ForeignManifestError`) or a newer version.
    """

    def __init__(self, path: str, what: str) -> None:
        super().__init__(self.named(path, what))
        self.path, self.what = path, what

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable with its two arguments
        return type(self), (self.path, self.what)

    @staticmethod
    def named(name: str, what: str) -> str:
        """The message, naming the manifest as ``name`` (a full path, or just the file name in a report)."""
        return f"{name}: malformed manifest ({what}); delete it or re-save the checkpoint"


class ForeignManifestError(UsageError):
    """A ``trainer_guard_manifest.json`` that is JSON but not a trainer_guard manifest (another tool's file)."""


# ------------------------------------------------------------------------------------------ internal errors
# Not in ``__all__`` (not part of the public API): each is turned into one of the public errors above, by the
# module that calls the code raising it, before it reaches a user.


class DamagedFileError(IntegrityError, ValueError):
    """A JSON file of a checkpoint (a trainer_guard record, ``trainer_state.json``) that does not parse: truncated,
    emptied or garbled. ``str(error)`` names the ``path`` and what to do; ``reason`` is the parser's message.
    Raised by :func:`trainer_guard.core.io.read_json`; caught as :class:`IntegrityError`."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: damaged, not valid JSON ({reason}): the file was truncated, emptied or edited "
                         f"after it was written; restore it from a copy, or resume from an earlier checkpoint")
        self.path, self.reason = path, reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable with its two arguments
        return type(self), (self.path, self.reason)


class SafetensorsFormatError(TrainerGuardError, ValueError):
    """A ``.safetensors`` file or shard index that is unreadable, truncated, padded or foreign
    (:mod:`trainer_guard.formats.safetensors`).

    ``str(error)`` names the full ``path`` and the fix; ``brief`` says the same for a report that lists files by
    name (``trainer-guard doctor``); ``kind`` is a stable word for what is wrong (``"short"``, ``"length"``,
    ``"json"``, ``"object"``, ``"entry"``, ``"dtype"``, ``"shape"``, ``"offsets"``, ``"size"``, ``"truncated"``,
    ``"tiling"``, ``"padded"``, ``"unreadable"``, ``"index"``).
    """

    def __init__(self, path: str, kind: str, message: str, brief: str | None = None) -> None:
        super().__init__(message)
        self.path, self.kind, self.brief = path, kind, brief or message

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:  # picklable with its arguments
        return type(self), (self.path, self.kind, str(self), self.brief)
