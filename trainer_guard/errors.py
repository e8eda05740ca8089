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
